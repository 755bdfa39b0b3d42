"""LwF on LoRA adapters (nlora's LoRA version of Learning without Forgetting, Li & Hoiem, ECCV 2016): from the
second task on, the loss adds

    λ · T² · KL( softmax(z_teacher / T) ‖ softmax(z / T) )      averaged over the loss items,

where the items are the answer tokens (seq2seq; decoder, each logit against the token it predicts, as the objective
shifts them) or the examples (encoder, over each example's options: the scores are -inf off them), z the trained
model's logits on the current task's batch, and z_teacher the logits of the model as it stood when the task began,
on the same batch, with no gradient and dropout off.

The teacher, with no copy of the base model:
- `lwf_base inc-lora` (a new adapter per task, earlier ones frozen and summed): the same model with the current
  adapter inactive, one no-grad forward per micro-batch (folded or not: the frozen sum is the same);
- `lwf_base seq-lora` (one shared adapter): a frozen copy of the shared adapter taken before the task trains (a
  second, inactive PEFT adapter, active only in the teacher's pass). It is taken from the adapter as saved after
  the previous task, so a resumed run takes the same copy and the method keeps no state of its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import MethodOptions, option
from .base import Method
from .passes import auxiliary_outputs
from .registry import register

TEACHER = "lwf_teacher"  # the frozen copy of the shared adapter (lwf_base seq-lora)


@dataclass
class LwFOptions(MethodOptions):
    lwf_lambda: float = option("weight λ of the distillation loss λ·T²·KL(p_teacher ‖ p)", default=1.0,
                               minimum=0)
    lwf_temperature: float = option("temperature T of both distributions", default=2.0, above=0)
    lwf_base: str = option("inc-lora (a new adapter per task; teacher: the model without it) or seq-lora (one "
                           "shared adapter; teacher: its copy from before the task)", default="inc-lora",
                           choices=("inc-lora", "seq-lora"))


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) of each row (items × classes), in float64: near the teacher
    the KL is a small difference of large terms (log-probabilities of a vocabulary), which float32 rounds to a
    few per cent. Entries where the teacher's logit is not finite (an encoder's scores off the example's options)
    are outside both distributions: they add nothing and get no gradient."""
    inside = torch.isfinite(teacher)
    log_q = (teacher.double() / temperature).log_softmax(-1).masked_fill(~inside, 0)
    log_p = (student.double() / temperature).log_softmax(-1).masked_fill(~inside, 0)
    q = log_q.exp().masked_fill(~inside, 0)
    return (q * (log_q - log_p)).sum(-1)


@register
class LwF(Method):
    name = "lwf"
    description = ("IncLoRA (or SeqLoRA, lwf_base) + lwf_lambda * T^2 * KL(teacher || model) on the answer tokens "
                   "(LwF, LoRA version)")
    Options = LwFOptions
    smoke_options = {"lwf_lambda": 10.0, "lwf_base": "seq-lora"}

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.adapter_layout = "snapshot" if self.options.lwf_base == "seq-lora" else "stacked"

    def teacher(self, ctx) -> list[str]:
        """The adapters active in the teacher's pass."""
        if self.adapter_layout == "snapshot":
            return [TEACHER]
        return [n for n in ctx.adapters.names if n != ctx.adapters.current]

    def before_task(self, k, ctx):
        if k > 0 and self.adapter_layout == "snapshot":  # the shared adapter as it was after task k-1
            ctx.adapters.copy_frozen(ctx.adapters.current, TEACHER)

    def batch_loss(self, k, batch, out, ctx):
        if k == 0:  # no earlier model to distil from
            return None
        teacher = auxiliary_outputs(ctx, self.teacher(ctx), batch)
        if not torch.equal(teacher.item_mask, out.item_mask):
            raise RuntimeError("lwf: the teacher's pass has other loss items than the training pass")
        kl = distillation_kl(out.item_logits, teacher.item_logits, self.options.lwf_temperature)
        return (self.options.lwf_lambda * self.options.lwf_temperature ** 2 * kl.sum()).to(out.loss.dtype)
