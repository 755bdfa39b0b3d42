from __future__ import annotations

from ..penalties import lora_l1
from ..regularization import LossTerm
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

    def loss_terms(self, k):
        form, chunk_size = self.config.penalty_form, self.config.penalty_chunk_size or "auto"
        return [LossTerm("l1", self.lam(k), lambda f: lora_l1(form, f.A, f.B, f.scaling, chunk_size=chunk_size))]
