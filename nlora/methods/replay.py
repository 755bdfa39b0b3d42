from __future__ import annotations

import random

from .base import Method, register


@register
class Replay(Method):
    """Experience replay: each task's training set plus `replay_per_task` stored training examples of every
    earlier task (kept as data, drawn once per task with the run's seed), on top of SeqLoRA (one shared adapter,
    the classic setting) or IncLoRA (`replay_base: inc-lora`)."""

    name = "replay"
    description = "SeqLoRA (or IncLoRA, replay_base) + a buffer of replay_per_task examples of each earlier task"
    options = ("replay_per_task", "replay_base")

    @property
    def adapter_layout(self) -> str:  # type: ignore[override]
        return "snapshot" if self.config.replay_base == "seq-lora" else "stacked"

    def buffer(self, tasks, j: int):
        examples = list(tasks[j].train)
        n = min(self.config.replay_per_task, len(examples))
        rng = random.Random(f"{self.config.seed}/replay/{tasks[j].name}")
        return [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]

    def training_examples(self, tasks, k):
        out = list(tasks[k].train)
        for j in range(k):
            out += self.buffer(tasks, j)
        return out
