"""Which rows of the accuracy matrix a run evaluates. The full lower triangle of the Long benchmark on its full
test sets is some 3-4 x 10^5 generations, so a run may evaluate fewer rows:

- full (default): after every task. Every metric: AP, BWT, forgetting (and FWT with eval_future).
- final: after the last task only. AP; BWT and forgetting need each task's accuracy right after it was trained
  (the diagonal), so they are null.
- every: after tasks K, 2K, ... and the last (K = eval_every). AP, and the accuracy of the evaluated rows; BWT and
  forgetting are null unless the diagonal is complete (K = 1, the same as full).
"""

from __future__ import annotations

EVAL_PLANS = ("full", "final", "every")


def planned_rows(plan: str, every: int, phases: list[int]) -> set[int]:
    """The phases after which the tasks are evaluated; the last phase always is."""
    if not phases:
        return set()
    if plan == "full":
        return set(phases)
    if plan == "final":
        return {phases[-1]}
    if plan == "every":
        return {k for k in phases if (k + 1) % every == 0} | {phases[-1]}
    raise ValueError(f"eval_plan must be one of {EVAL_PLANS}, got {plan!r}")
