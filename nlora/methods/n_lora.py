from __future__ import annotations

import torch

from ..penalties import lora_l1
from .base import Method, register


@register
class NLoRA(Method):
    """N-LoRA (arXiv 2410.10179): IncLoRA plus λ · Σ_layers ‖ΔW_t‖₁ on the current task's adapter, so that tasks
    occupy different parameters. `penalty_form` picks how ‖ΔW_t‖₁ is taken (see nlora.penalties);
    `lambda_per_task` gives each task its own λ (the public scripts of some task orders do this)."""

    name = "n-lora"
    description = "IncLoRA + lambda * L1 norm of the current task's update (sparse, non-colliding updates)"
    options = ("lambda", "lambda_per_task", "penalty_form", "penalty_chunk_size")

    def lam(self, k: int) -> float:
        per_task = self.config.lambda_per_task
        return per_task[k] if per_task else self.config.lambda_

    def regularizer(self, adapters, k):
        lam = self.lam(k)
        if lam == 0:
            return None
        cfg = self.config
        terms = [lora_l1(cfg.penalty_form, f.A, f.B, f.scaling, chunk_size=cfg.penalty_chunk_size)
                 for f in adapters.factors(adapters.current)]
        return lam * torch.stack(terms).sum()
