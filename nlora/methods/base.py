"""The method contract: what a continual-learning method is, and everything it may do, in one class.

A method is one file: a subclass of `Method` registered with `@register`. The engine (nlora.runner, nlora.train.loop)
calls it at fixed points and never needs editing for a new method. Everything a method author uses is importable
from `nlora` itself (its `__all__`); the rest of the package is internal.
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
    """What a hook sees of the run (one object for the whole run; the loop updates the per-step fields).

    config        the run's RunConfig (the method's own options are `Method.options`)
    adapters      the LoRA adapters on the base (ContinualAdapters): `names` (created so far, in order),
                  `current` (the one being trained), `factors(name)` (each adapted layer's LayerFactors, the
                  tensors themselves), `using(names)` (a block with other adapters active), `scale_by(name, s)`;
                  `adapters.model` is the unwrapped model, for extra passes. For a method that trains the base
                  (`trains = "base"`) it is nlora.full_model's FullModel, with `model` only
    objective     how the base computes its loss and predictions (nlora.objectives): `collate(examples)` to a
                  batch, `forward(model, batch)` to StepOutputs, `count_terms(batch)` (the batch's loss items)
    accelerator   accelerate's Accelerator: `device`, `process_index`, `num_processes`
    tasks         every task of the run (TaskData: `name`, `train`, `test`, lists of Example), in order
    run_dir       the run directory (None when training outside a run, e.g. in a test)
    model         the trained model as the loop runs it (DDP-wrapped where so launched; None before training)
    scratch       per-phase values a method keeps between hooks (not saved: what must survive a resume goes in
                  `state_dict`)
    examples      this process's examples of the micro-batch being trained, in the batch's row order (set before
                  its forward; a process with no example of a short last batch runs the first one at weight 0)
    step_examples every example of the optimizer step being trained (all its micro-batches, all processes; set at
                  the step's first micro-batch): what `task_loss_gradients` differentiates
    """
    config: "RunConfig"
    adapters: "ContinualAdapters"
    objective: "Objective"
    accelerator: "Accelerator"
    tasks: list["TaskData"]
    run_dir: Path | None = None
    model: torch.nn.Module | None = None
    scratch: dict[str, Any] = field(default_factory=dict)
    examples: list["Example"] | None = None
    step_examples: list["Example"] | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Method:
    """A continual-learning method: declarations the engine reads, hooks it calls, and state it saves.

    Declarations (the defaults give IncLoRA): `trains`, `adapter_layout`, `folds_past`, `needs_task_id`, `phases`,
    `adapter_name`, `training_examples`, `active_for_training`, `active_for_eval`, `loss_terms` (penalties on the
    trained adapter's factors, computed inside each LoRA layer's forward), `train_factors`, `keeps_saved`,
    `optimizer`, `parameters` (learnable tensors of its own), `update_scales` (a saved adapter's weight in the
    evaluated model). Options: a `MethodOptions` dataclass named in `Options`; the instance is `self.options`.

    Hooks, in the order of a run (each default does nothing; `k` is the phase, the task's index):

        check_model(model, targets)             before anything is written
        setup(ctx)                              once, the model and its objective built
        for each phase k in phases(n):
            init_adapter(k, ctx)                the phase's new adapter exists (not called for a reused one)
            before_task(k, ctx)                 the adapters active for training (active_for_training)
            for each optimizer step:
                batch_loss(k, batch, out, ctx)  each micro-batch, after the forward
                transform_gradients(k, named, ctx)  the step's gradients whole, before clipping and the step
                after_step(k, ctx)              after the optimizer step; then a mid-task checkpoint may be
                                                taken (adapter, optimizer, state_dict()): after after_step
            after_task(k, ctx)                  phase k trained; then the adapter and state_dict() are saved
                                                (adapters/<k>-<task>/) and the phase is evaluated

    On resume (`nlora resume`, in a fresh process): check_model, setup; for each phase already saved, its
    adapter and `load_state_dict(its saved state)` (no other hook); for the phase that was interrupted (or the
    next one): init_adapter, before_task, then `load_state_dict(the checkpoint's state)` when a mid-task
    checkpoint exists, and training continues from the step after it. So `before_task` must be deterministic
    (it runs again), and everything that changes during a phase (step counters, running sums) must be in
    `state_dict`: the state loaded last is the checkpoint's, taken after the last finished step's after_step.

    State: `state_dict()` returns tensors and plain values (JSON); it is saved atomically with the phase's adapter
    (adapters/<k>-<task>/method_state.*) and in every mid-task checkpoint. Learnable tensors of the method itself
    (a scale per adapter, a gate) are returned by `parameters(k)`: they train with the adapter, are saved in
    checkpoints, and belong in `state_dict`. `nlora.testing` checks all of this for any method.
    """
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
    # the conformance kit (nlora.testing) runs the method with them.
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
        """Once per process, with the model built, before the first phase (also on resume)."""

    def init_adapter(self, k: int, ctx: MethodContext) -> None:
        """Phase k's new adapter exists with PEFT's initialisation (`ctx.adapters.current`); set its factors here."""

    def before_task(self, k: int, ctx: MethodContext) -> None:
        """Before phase k trains, its adapters active; runs again on resume, so keep it deterministic."""

    def batch_loss(self, k: int, batch: dict, out: "StepOutputs", ctx: MethodContext) -> torch.Tensor | None:
        """An extra loss from the micro-batch and the model's outputs on it, as a SUM over the batch's loss items
        (`out.item_logits`: answer tokens, or examples for encoders; `ctx.examples` the batch's examples). The
        loop normalises it like the task loss, so 1 and N processes and k x b accumulation against one batch of
        k*b give the same gradient. None adds nothing."""
        return None

    def transform_gradients(self, k: int, named: dict[str, torch.nn.Parameter], ctx: MethodContext) -> None:
        """Edit the step's gradients in place (`p.grad` of each of `named`: every trained tensor by name, the
        method's own `parameters` prefixed "method."), once per optimizer step, after they are whole (DDP
        all-reduce, FSDP2 reduction) and before clipping and the optimizer step."""

    def after_step(self, k: int, ctx: MethodContext) -> None:
        """After each optimizer step (the gradients cleared), before any mid-task checkpoint of that step."""

    def after_task(self, k: int, ctx: MethodContext) -> None:
        """Phase k trained; its adapter and `state_dict()` are saved right after this hook."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain (JSON) values; saved with each phase's adapter and in mid-task checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (on resume, and when a saved run is read back)."""

    def has_hook(self, hook: str) -> bool:
        """Whether this method overrides `hook` (the loop skips work for hooks a method leaves alone)."""
        return getattr(type(self), hook) is not getattr(Method, hook)
