"""The two reference points a continual method is compared with; neither is a continual method itself."""

from __future__ import annotations

from .base import Method
from .registry import register


@register
class MultiTask(Method):
    """The multi-task upper bound: one adapter trained once on the union of all tasks' training sets, then
    evaluated on every task. Its accuracy matrix has only the last row (there is no sequence)."""

    name = "mtl"
    description = "one adapter trained on the union of all tasks (upper bound; not continual)"
    adapter_layout = "snapshot"

    def phases(self, n_tasks):
        return [n_tasks - 1]

    def training_examples(self, tasks, k):
        return [e for t in tasks[: k + 1] for e in t.train]


@register
class PerTask(Method):
    """Isolation upper bound: a separate adapter per task, trained alone and evaluated with the task's own
    adapter. Needs the task id at inference, which the continual methods do not."""

    name = "per-task"
    description = "a separate adapter per task, evaluated with its own adapter (needs the task id)"
    folds_past = False  # each task is evaluated with its own adapter
    needs_task_id = True

    def active_for_training(self, k, names):
        return [names[k]]

    def active_for_eval(self, k, j, names):
        # a task not trained yet (eval_future) has no adapter of its own: the base model answers for it
        return [names[j]] if j < len(names) else []
