from __future__ import annotations

from dataclasses import dataclass

from ..options import MethodOptions, option
from ..train.regularization import LossTerm
from .base import Method
from .penalties import l2_norms, l2_squared, olora_orthogonality
from .registry import register

L2_FORMS = ("squared", "reference")


@dataclass
class OLoRAOptions(MethodOptions):
    orth_lambda: float = option("weight of the orthogonality loss |A_s A_t^T|", default=0.5, minimum=0)
    l2_lambda: float = option("weight of the L2 loss on the current adapter", default=0.0, minimum=0)
    orth_lambda_per_task: list[float] | None = option("one orth_lambda per task in training order (overrides "
                                                      "orth_lambda)", default=None, minimum=0,
                                                      per_task_of="orth_lambda")
    l2_lambda_per_task: list[float] | None = option("one l2_lambda per task in training order (overrides "
                                                    "l2_lambda)", default=None, minimum=0, per_task_of="l2_lambda")
    l2_form: str = option("squared (sum of |theta|^2) or reference (the public code's sum of unsquared norms "
                          "|theta|_2 of A and B)", default="squared", choices=L2_FORMS)


@register
class OLoRA(Method):
    """O-LoRA (arXiv 2310.14152): IncLoRA plus λ₁ · Σ_layers Σ_{s<t} Σ|A_s·A_tᵀ| (the current task's A kept
    orthogonal to every earlier task's A) plus λ₂ · ‖θ_t‖² on the current adapter (`l2_form reference`: the public
    code's Σ‖θ‖₂ over the current A and B, unsquared)."""

    name = "o-lora"
    description = "IncLoRA + orth_lambda * |A_s A_t^T| against earlier tasks + l2_lambda * |theta_t|^2"
    Options = OLoRAOptions
    smoke_options = {"orth_lambda": 1.0, "l2_lambda": 0.01}

    def lambdas(self, k: int) -> tuple[float, float]:
        """(λ₁, λ₂) of phase k: the per-task lists where given (O-LoRA's long-order script sets both per task)."""
        return self.options.at("orth_lambda", k), self.options.at("l2_lambda", k)

    def loss_terms(self, k):
        orth_lambda, l2_lambda = self.lambdas(k)
        l2 = l2_norms if self.options.l2_form == "reference" else l2_squared
        terms = [LossTerm("l2", l2_lambda, lambda f: l2([f.A, f.B]), option="l2_lambda")]
        if k > 0:  # against every earlier task's A in the layer (separate adapters or one folded past adapter)
            terms.append(LossTerm("orthogonality", orth_lambda, lambda f: olora_orthogonality(f.A, f.earlier_A),
                                  option="orth_lambda"))
        return terms
