from __future__ import annotations

import random
from dataclasses import dataclass

from ..options import MethodOptions, option
from .base import Method
from .registry import register


@dataclass
class ReplayOptions(MethodOptions):
    replay_per_task: int = option("stored training examples of each earlier task", default=50, minimum=0)
    replay_base: str = option("seq-lora (one shared adapter) or inc-lora (one adapter per task)",
                              default="seq-lora", choices=("seq-lora", "inc-lora"))


@register
class Replay(Method):
    """Experience replay: each task's training set plus `replay_per_task` stored training examples of every
    earlier task (kept as data, drawn once per task with the run's seed), on top of SeqLoRA (one shared adapter,
    the classic setting) or IncLoRA (`replay_base: inc-lora`)."""

    name = "replay"
    description = "SeqLoRA (or IncLoRA, replay_base) + a buffer of replay_per_task examples of each earlier task"
    Options = ReplayOptions
    smoke_options = {"replay_per_task": 2}

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.adapter_layout = "snapshot" if self.options.replay_base == "seq-lora" else "stacked"

    def buffer(self, tasks, j: int):
        examples = list(tasks[j].train)
        n = min(self.options.replay_per_task, len(examples))
        rng = random.Random(f"{self.config.seed}/replay/{tasks[j].name}")
        return [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]

    def training_examples(self, tasks, k):
        out = list(tasks[k].train)
        for j in range(k):
            out += self.buffer(tasks, j)
        return out
