from __future__ import annotations

from ..penalties import l2_norms, l2_squared, olora_orthogonality
from ..regularization import LossTerm
from .base import Method, register


@register
class OLoRA(Method):
    """O-LoRA (arXiv 2310.14152): IncLoRA plus λ₁ · Σ_layers Σ_{s<t} Σ|A_s·A_tᵀ| (the current task's A kept
    orthogonal to every earlier task's A) plus λ₂ · ‖θ_t‖² on the current adapter (`l2_form reference`: the public
    code's Σ‖θ‖₂ over the current A and B, unsquared)."""

    name = "o-lora"
    description = "IncLoRA + orth_lambda * |A_s A_t^T| against earlier tasks + l2_lambda * |theta_t|^2"
    options = ("orth_lambda", "l2_lambda", "orth_lambda_per_task", "l2_lambda_per_task", "l2_form")

    def lambdas(self, k: int) -> tuple[float, float]:
        """(λ₁, λ₂) of phase k: the per-task lists where given (O-LoRA's long-order script sets both per task)."""
        cfg = self.config
        orth = cfg.orth_lambda_per_task[k] if cfg.orth_lambda_per_task else cfg.orth_lambda
        l2 = cfg.l2_lambda_per_task[k] if cfg.l2_lambda_per_task else cfg.l2_lambda
        return orth, l2

    def loss_terms(self, k):
        orth_lambda, l2_lambda = self.lambdas(k)
        l2 = l2_norms if self.config.l2_form == "reference" else l2_squared
        terms = [LossTerm("l2", l2_lambda, lambda f: l2([f.A, f.B]))]
        if k > 0:  # against every earlier task's A in the layer (separate adapters or one folded past adapter)
            terms.append(LossTerm("orthogonality", orth_lambda, lambda f: olora_orthogonality(f.A, f.earlier_A)))
        return terms
