from __future__ import annotations

import torch

from ..penalties import l2_squared, olora_orthogonality
from .base import Method, register


@register
class OLoRA(Method):
    """O-LoRA (arXiv 2310.14152): IncLoRA plus λ₁ · Σ_layers Σ_{s<t} Σ|A_s·A_tᵀ| (the current task's A kept
    orthogonal to every earlier task's A) plus λ₂ · ‖θ_t‖² on the current adapter."""

    name = "o-lora"
    description = "IncLoRA + orth_lambda * |A_s A_t^T| against earlier tasks + l2_lambda * |theta_t|^2"
    options = ("orth_lambda", "l2_lambda")

    def regularizer(self, adapters, k):
        cfg = self.config
        current = adapters.factors(adapters.current)
        terms = []
        if cfg.orth_lambda > 0 and k > 0:
            earlier = adapters.earlier_A()  # every earlier task's A, concatenated: one matmul per layer
            orth = [olora_orthogonality(f.A, earlier[f.layer]) for f in current]
            terms.append(cfg.orth_lambda * torch.stack(orth).sum())
        if cfg.l2_lambda > 0:
            terms.append(cfg.l2_lambda * l2_squared([p for f in current for p in (f.A, f.B)]))
        return torch.stack(terms).sum() if terms else None
