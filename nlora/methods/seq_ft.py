"""Full fine-tuning baselines of the O-LoRA / N-LoRA papers' table: every base parameter trains, no LoRA.

- `seq-ft` (SeqFT): the tasks one after another, θ ← argmin L_CE(θ; D_k) from the model after task k-1; no
  regulariser. The model is evaluated as it is (no task id).
- `mtl-ft`: every base parameter trained once on the union of all tasks' training sets (the papers' MTL row,
  full FT on mixed data); like `mtl`, its accuracy matrix has only the last row.

The engine side (every parameter trainable, the phase's model saved whole, checkpoints, resume) is
nlora.full_model; these methods only declare `trains = "base"`. Options: keep every task's model
(`seqft_save_every_task`; by default only the latest is kept, the final model at the end) and bitsandbytes' 8-bit
AdamW (`seqft_optimizer adamw8bit`), whose two moments take 1 byte each per parameter instead of 4 (float32)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..errors import NloraError
from ..options import MethodOptions, option
from .base import Method
from .bounds import MultiTask
from .registry import register

OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class FullFineTuningOptions(MethodOptions):
    seqft_save_every_task: bool = option(
        "keep the full model saved after every task (adapters/<k>-<task>/, one model's size each); off: only the "
        "latest is kept, so a finished run holds the final model", default=False)
    seqft_optimizer: str = option(
        "adamw (torch's; moments in the weights' dtype) or adamw8bit (bitsandbytes' 8-bit AdamW, 2 bytes of "
        "moments per parameter; needs bitsandbytes)", default="adamw", choices=OPTIMIZERS)

    def check(self, run) -> None:
        if self.seqft_optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise NloraError("option 'seqft_optimizer': adamw8bit needs bitsandbytes, which is not installed "
                             "(pip install bitsandbytes, or \"nlora[qlora]\"); use adamw")


class FullFineTuning(Method):
    """What both full fine-tuning methods share: the base trains, one model through every phase."""

    trains = "base"
    adapter_layout = "snapshot"
    Options = FullFineTuningOptions

    def keeps_saved(self) -> bool:
        return self.options.seqft_save_every_task

    def optimizer(self, params, config):
        if self.options.seqft_optimizer == "adamw8bit":
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
        return super().optimizer(params, config)


@register
class SeqFT(FullFineTuning):
    name = "seq-ft"
    description = "full fine-tuning of every base parameter, task after task (no LoRA; the forgetting baseline)"


@register
class MultiTaskFT(FullFineTuning):
    name = "mtl-ft"
    description = "every base parameter trained once on the union of all tasks (full-parameter MTL; not continual)"
    phases = MultiTask.phases
    training_examples = MultiTask.training_examples
