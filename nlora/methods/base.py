"""What a continual-learning method is: a small plug-in that decides, for each training phase, which adapter
trains on which examples with which adapters active, how each task is evaluated, and what is added to the loss.
The defaults give IncLoRA."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..regularization import LossTerm
    from ..data import Example, TaskData


class Method:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    # "stacked": a new adapter per task, all summed at inference; "snapshot": one adapter trained through every
    # phase (adapters/<k>-<task>/ then holds its state after phase k).
    adapter_layout: ClassVar[str] = "stacked"
    # Stacked layout: True when the frozen adapters are always active together (summed in training and at
    # evaluation), so they may be folded into their sum (nlora.adapters, option fold_adapters); a
    # method that activates earlier adapters one by one sets False.
    folds_past: ClassVar[bool] = True
    # The config keys this method reads besides the common ones (documentation and `nlora methods`).
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: "RunConfig"):
        self.config = config

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
        """The regularisers added to the task loss at every step of phase k, each declared as a weight and a
        function of one layer's factors (nlora.regularization computes them inside the forward pass)."""
        return []


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
