from __future__ import annotations

from ..penalties import l2_squared, olora_orthogonality
from ..regularization import LossTerm
from .base import Method, register


@register
class OLoRA(Method):
    """O-LoRA (arXiv 2310.14152): IncLoRA plus λ₁ · Σ_layers Σ_{s<t} Σ|A_s·A_tᵀ| (the current task's A kept
    orthogonal to every earlier task's A) plus λ₂ · ‖θ_t‖² on the current adapter."""

    name = "o-lora"
    description = "IncLoRA + orth_lambda * |A_s A_t^T| against earlier tasks + l2_lambda * |theta_t|^2"
    options = ("orth_lambda", "l2_lambda")

    def loss_terms(self, k):
        terms = [LossTerm("l2", self.config.l2_lambda, lambda f: l2_squared([f.A, f.B]))]
        if k > 0:  # against every earlier task's A in the layer (separate adapters or one folded past adapter)
            terms.append(LossTerm("orthogonality", self.config.orth_lambda,
                                  lambda f: olora_orthogonality(f.A, f.earlier_A)))
        return terms
