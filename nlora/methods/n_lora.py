from __future__ import annotations

import torch

from ..penalties import lora_l1
from .base import Method, register


@register
class NLoRA(Method):
    """N-LoRA (arXiv 2410.10179): IncLoRA plus λ · Σ_layers ‖ΔW_t‖₁ on the current task's adapter, so that tasks
    occupy different parameters. `penalty_form` picks how ‖ΔW_t‖₁ is taken (see nlora.penalties)."""

    name = "n-lora"
    description = "IncLoRA + lambda * L1 norm of the current task's update (sparse, non-colliding updates)"

    def regularizer(self, adapters, task_index):
        cfg = self.config
        if cfg.lambda_ == 0:
            return None
        terms = [lora_l1(cfg.penalty_form, f.A, f.B, f.scaling, chunk_size=cfg.penalty_chunk_size)
                 for f in adapters.factors(adapters.current)]
        return cfg.lambda_ * torch.stack(terms).sum()
