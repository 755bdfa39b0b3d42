"""The method contract: what a continual-learning method is, and everything it may do, in one class.

A method is one file: a subclass of `Method` registered with `@register`. The engine (nlora.runner, nlora.train.loop)
calls it at fixed points and never needs editing for a new method.

Declarations (read by the engine; the defaults give IncLoRA):
  trains ("adapters": LoRA adapters on a frozen base; "base": every base parameter, no adapter, the phase's model
  saved whole: nlora.full_model), phases, adapter_name, training_examples, active_for_training, active_for_eval,
  loss_terms (penalties on the trained adapter's factors, computed inside each LoRA layer's forward:
  nlora.train.regularization), train_factors, keeps_saved, optimizer,
  parameters (learnable tensors of its own), update_scales (a saved adapter's weight in the evaluated model).

Hooks (each gets the `MethodContext` of the run; each default does nothing):
  check_model(model, targets)       checks that need the loaded base model, before anything is written
  setup(ctx)                        once, with the model built, before the first phase (also on resume)
  init_adapter(k, ctx)              the phase's new adapter exists (PEFT's init); set its factors here
  before_task(k, ctx)               before phase k trains (re-run on resume, so keep it deterministic)
  batch_loss(k, batch, out, ctx)    an extra loss from the batch and the model's outputs, as a SUM over the
                                    batch's loss items (out.items: answer tokens, or examples for encoders); the
                                    loop normalises it like the task loss, so 1 and N processes and k x b
                                    accumulation against one batch of k*b give the same gradient
  transform_gradients(k, named, ctx)  after the gradients are whole (DDP all-reduce, FSDP2 reduction) and before
                                    clipping and the optimizer step
  after_step(k, ctx)                after each optimizer step
  after_task(k, ctx)                phase k trained, before its adapter and the method's state are saved

State: `state_dict()` returns tensors and plain values (JSON); it is saved atomically with the phase's adapter
(adapters/<k>-<task>/method_state.*) and in every mid-task checkpoint, and `load_state_dict` gets it back on resume.
Learnable tensors of the method itself (a scale per adapter, a gate) are returned by `parameters(k)`: they train
with the adapter, are saved in checkpoints, and belong in `state_dict`.

Options: a `MethodOptions` dataclass named in `Options` (nlora.options); the instance is `self.options`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..options import MethodOptions

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..adapters import ContinualAdapters
    from ..config import RunConfig
    from ..objectives import Objective, StepOutputs
    from ..tasks.data import Example, TaskData
    from ..train.regularization import LossTerm


@dataclass
class MethodContext:
    """What a hook sees of the run. `model` is the trained model as the loop runs it (DDP-wrapped where so
    launched); `adapters.model` is the same model unwrapped, for extra passes (nlora.methods.passes)."""
    config: "RunConfig"
    adapters: "ContinualAdapters"
    objective: "Objective"
    accelerator: "Accelerator"
    tasks: list["TaskData"]
    run_dir: Path | None = None
    model: torch.nn.Module | None = None
    scratch: dict[str, Any] = field(default_factory=dict)  # per-phase values a method keeps between hooks
    # this process's examples of the micro-batch being trained, in the batch's row order (set by the loop before
    # its forward; a process with no example of a short last batch runs the first one at weight 0)
    examples: list["Example"] | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Method:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # "adapters": LoRA adapters train on the frozen base (nlora.adapters); "base": every base parameter trains and
    # there is no adapter (nlora.full_model: adapters/<k>-<task>/ holds the whole model after phase k, in the base
    # model's own format). A method that trains the base uses the snapshot layout: one model through every phase.
    trains: ClassVar[str] = "adapters"
    # "stacked": a new adapter per task, all summed at inference; "snapshot": one adapter trained through every
    # phase (adapters/<k>-<task>/ then holds its state after phase k).
    adapter_layout: ClassVar[str] = "stacked"
    # Stacked layout: True when the frozen adapters are always active together (summed in training and at
    # evaluation), so they may be folded into their sum (nlora.adapters, option fold_adapters); a method that
    # activates earlier adapters one by one, or scales them, sets False.
    folds_past: ClassVar[bool] = True
    # True when evaluating task j needs to know it is task j (its own adapter, not the run's one model): predict
    # asks for the task, export refuses (there is no single model).
    needs_task_id: ClassVar[bool] = False
    # Options that make the method's own part act on a tiny run of a few steps (a strong weight, few samples):
    # the conformance kit (tests/test_conformance.py) runs every registered method with them.
    smoke_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: "RunConfig", options: MethodOptions | None = None):
        self.config = config
        self.options = options if options is not None else self.Options.from_dict(config.method_options)

    # ------------------------------------------------------------------ declarations
    def phases(self, n_tasks: int) -> list[int]:
        """Indices of the tasks after which the model trains and is evaluated (one phase per task)."""
        return list(range(n_tasks))

    def adapter_name(self, k: int) -> str:
        return f"task{k}" if self.adapter_layout == "stacked" else "shared"

    def training_examples(self, tasks: list["TaskData"], k: int) -> list["Example"]:
        return list(tasks[k].train)

    def active_for_training(self, k: int, names: list[str]) -> list[str]:
        """Adapters in the forward pass while phase k trains (`names`: those created so far, in order)."""
        return names

    def active_for_eval(self, k: int, j: int, names: list[str]) -> list[str]:
        """Adapters in the forward pass when task j is evaluated after phase k; no task id by default."""
        return names

    def loss_terms(self, k: int) -> list["LossTerm"]:
        """The regularisers on the trained adapter's own factors, added at every step of phase k, each declared as
        a weight and a function of one layer's factors (nlora.train.regularization computes them inside the forward)."""
        return []

    def train_factors(self, k: int) -> str:
        """Which factors of the phase's adapter train: "both", "A" or "B" (the run's `train_factors` option)."""
        return self.config.train_factors

    def keeps_saved(self) -> bool:
        """For `trains == "base"`: whether the model saved after every phase stays; False keeps only the latest
        (a full model per task is large; a resumed run starts from the latest). LoRA adapters are always kept."""
        return True

    def optimizer(self, params: list[torch.nn.Parameter], config: "RunConfig") -> torch.optim.Optimizer:
        """The optimizer of a phase, over `params` (what trains), with the run's (phase's) `config`."""
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def parameters(self, k: int) -> dict[str, torch.nn.Parameter]:
        """The method's own learnable tensors in phase k, by name (trained with the adapter)."""
        return {}

    def update_scales(self, k: int) -> dict[str, float | dict[str, float]]:
        """How the model evaluated after phase k weighs each saved adapter's update (alpha/r · B·A), read from the
        method's state as saved with phase k's adapter (after `load_state_dict`): {adapter name: a multiplier for
        every layer, or {layer: multiplier}}; an adapter not named counts once. `nlora predict` and `nlora export`
        rebuild the model with them, and so does the conformance kit. A method that declares scales keeps its
        adapters apart (folds_past = False) and sets them itself in training (`ContinualAdapters.scale_by`)."""
        return {}

    # ------------------------------------------------------------------ hooks
    def check_model(self, model: torch.nn.Module, target_modules: list[str]) -> None:
        """Checks that need the loaded base model, run before anything is written; raise NloraError."""

    def setup(self, ctx: MethodContext) -> None:
        pass

    def init_adapter(self, k: int, ctx: MethodContext) -> None:
        pass

    def before_task(self, k: int, ctx: MethodContext) -> None:
        pass

    def batch_loss(self, k: int, batch: dict, out: "StepOutputs", ctx: MethodContext) -> torch.Tensor | None:
        return None

    def transform_gradients(self, k: int, named: dict[str, torch.nn.Parameter], ctx: MethodContext) -> None:
        pass

    def after_step(self, k: int, ctx: MethodContext) -> None:
        pass

    def after_task(self, k: int, ctx: MethodContext) -> None:
        pass

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain (JSON) values; saved with each phase's adapter and in mid-task checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def has_hook(self, hook: str) -> bool:
        """Whether this method overrides `hook` (the loop skips work for hooks a method leaves alone)."""
        return getattr(type(self), hook) is not getattr(Method, hook)
