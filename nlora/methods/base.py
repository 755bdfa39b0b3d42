"""What a continual-learning method is: a small plug-in that decides how adapters are laid out across tasks
and what it adds to the task loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..adapters import ContinualAdapters
    from ..config import RunConfig


class Method:
    """Base class. The defaults give IncLoRA: a fresh adapter per task, earlier adapters frozen and summed,
    nothing added to the loss."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # "stacked": a new adapter per task, all summed; "snapshot": one adapter trained through every task.
    adapter_layout: ClassVar[str] = "stacked"

    def __init__(self, config: "RunConfig"):
        self.config = config

    def adapter_name(self, task_index: int) -> str:
        return f"task{task_index}" if self.adapter_layout == "stacked" else "shared"

    def regularizer(self, adapters: "ContinualAdapters", task_index: int) -> torch.Tensor | None:
        """Added to the task loss at every step of task `task_index`; None adds nothing."""
        return None


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
