from __future__ import annotations

from dataclasses import dataclass

from ..errors import NloraError
from ..options import MethodOptions, option
from ..preflight import targeted_layers
from ..train.regularization import LossTerm
from .base import Method
from .penalties import PENALTY_FORMS, lora_l1
from .registry import register


@dataclass
class NLoRAOptions(MethodOptions):
    # 1e-5: the best dev λ of the `delta` form on MiniLM (benchmarks/RESULTS.md); 0.4, the public scripts' λ,
    # belongs to the `reference` form (an r x r sum, unscaled) and swamps the task loss under `delta`
    lambda_: float = option("weight of N-LoRA's L1 penalty (the scale depends on penalty_form: choose it on a "
                            "dev split)", default=1e-5, minimum=0, former_defaults=(0.4,))
    lambda_per_task: list[float] | None = option("one lambda per task in training order (overrides lambda)",
                                                 default=None, minimum=0, per_task_of="lambda_")
    penalty_form: str = option("delta (paper: |scaling*B*A|_1), reference (the public code's r x r product "
                               "|A*B|_1) or factors (|A|_1 + |B|_1)", default="delta", choices=PENALTY_FORMS)
    penalty_chunk_size: int | None = option("rows of the update computed at once by the delta penalty (unset: 256 "
                                            "on CPU, 1024 on a GPU)", default=None, minimum=1)


@register
class NLoRA(Method):
    """N-LoRA (arXiv 2410.10179): IncLoRA plus λ · Σ_layers ‖ΔW_t‖₁ on the current task's adapter, so that tasks
    occupy different parameters. `penalty_form` picks how ‖ΔW_t‖₁ is taken (see nlora.methods.penalties);
    `lambda_per_task` gives each task its own λ (the public scripts of some task orders do this)."""

    name = "n-lora"
    description = "IncLoRA + lambda * L1 norm of the current task's update (sparse, non-colliding updates)"
    Options = NLoRAOptions
    smoke_options = {"lambda": 0.01}

    def check_model(self, model, target_modules):
        """penalty_form 'reference' (the public code's |A @ B|_1, an r x r product) exists only for square layers."""
        if self.options.penalty_form != "reference":
            return
        rectangular = {n: s for n, s in targeted_layers(model, target_modules).items() if s[0] != s[1]}
        if rectangular:
            name, (d_out, d_in) = next(iter(rectangular.items()))
            more = f" (and {len(rectangular) - 1} more)" if len(rectangular) > 1 else ""
            raise NloraError(f"option 'penalty_form': 'reference' (the public code's |A @ B|_1) needs square "
                             f"layers (d_in == d_out), but layer {name} is {d_out} x {d_in} (d_out x d_in){more}; "
                             "use penalty_form delta (the paper's |scaling * B @ A|_1) or factors, or target "
                             "square layers only")

    def lam(self, k: int) -> float:
        return self.options.at("lambda_", k)

    def loss_terms(self, k):
        form, chunk_size = self.options.penalty_form, self.options.penalty_chunk_size or "auto"
        return [LossTerm("l1", self.lam(k), lambda f: lora_l1(form, f.A, f.B, f.scaling, chunk_size=chunk_size),
                         option="lambda")]
