"""Continual-learning metrics over the accuracy matrix R (T × T, percent).

R[i][j] is the accuracy on task j after training task i; entries never evaluated are None (e.g. future tasks
without `eval_future`, or the intermediate rows of the multi-task bound). A metric whose inputs are all missing
is None rather than a number made up from nothing.

    AP          = mean_j R[T-1][j]
    BWT         = mean_{j<T-1} (R[T-1][j] − R[j][j])                     (Lopez-Paz & Ranzato, 2017)
                  or, with bwt_denominator "t", mean_{j≤T-1}: the same sum over T instead of T-1 (TRACE paper,
                  SAPT and GainLoRA score.py), i.e. (T-1)/T × the above; only for comparison with those numbers
    FWT         = mean_{j≥1} (R[j-1][j] − b_j), b_j a reference score,   (ibid.; here b_j is the base model's)
    forgetting  = mean_{j<T-1} (max_{j≤i≤T-1} R[i][j] − R[T-1][j])       (Chaudhry et al., 2018, clipped at 0)
"""

from __future__ import annotations

import string
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]
# "t-1": the mean over the tasks before the last (the default); "t": also over the last task, whose term is 0
BWT_DENOMINATORS = ("t-1", "t")

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """The form exact match compares, as the reference code's metric (O-LoRA / N-LoRA src/compute_metrics.py,
    SQuAD-style without removing articles) builds it: lower case, ASCII punctuation removed, runs of whitespace
    collapsed to one space, ends stripped."""
    return " ".join(text.lower().translate(_NO_PUNCTUATION).split())


def accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Exact-match accuracy in percent after `normalize_answer`."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("accuracy of an empty set of examples")
    hits = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(predictions, targets))
    return 100.0 * hits / len(targets)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _check_square(R: Matrix) -> int:
    T = len(R)
    if any(len(row) != T for row in R):
        raise ValueError(f"the accuracy matrix must be square (T × T), got rows of lengths {[len(r) for r in R]}")
    return T


def average_accuracy(R: Matrix) -> float | None:
    """Mean of the last row over the tasks evaluated there."""
    T = _check_square(R)
    return _mean([x for x in R[T - 1] if x is not None]) if T else None


def backward_transfer(R: Matrix, denominator: str = "t-1") -> float | None:
    """Mean over j < T-1 of R[T-1][j] − R[j][j] (negative = forgetting); pairs with a missing entry are skipped.
    With `denominator` "t" the mean also runs over j = T-1, whose term R[T-1][T-1] − R[T-1][T-1] is 0 (when
    that entry exists): the TRACE / SAPT convention."""
    if denominator not in BWT_DENOMINATORS:
        raise ValueError(f"BWT denominator {denominator!r} is not one of {', '.join(BWT_DENOMINATORS)}")
    T = _check_square(R)
    last = T if denominator == "t" else T - 1
    diffs = [R[T - 1][j] - R[j][j] for j in range(last) if R[T - 1][j] is not None and R[j][j] is not None]
    return _mean(diffs)


def forward_transfer(R: Matrix, baseline: Sequence[float | None] | None) -> float | None:
    """Mean over j ≥ 1 of R[j-1][j] − b_j: how much training tasks < j helps task j before it is trained.
    Needs the row before each task (`eval_future`) and a reference score per task."""
    T = _check_square(R)
    if baseline is None:
        return None
    if len(baseline) != T:
        raise ValueError(f"{len(baseline)} reference scores for {T} tasks")
    diffs = [R[j - 1][j] - baseline[j] for j in range(1, T)
             if R[j - 1][j] is not None and baseline[j] is not None]
    return _mean(diffs)


def average_forgetting(R: Matrix) -> float | None:
    """Mean over j < T-1 of the drop from task j's best accuracy since it was trained to its final accuracy.
    A task counts only if it was evaluated after training and before the end."""
    T = _check_square(R)
    drops = []
    for j in range(T - 1):
        final = R[T - 1][j]
        earlier = [R[i][j] for i in range(j, T - 1) if R[i][j] is not None]
        if final is not None and earlier:
            drops.append(max(max(earlier), final) - final)
    return _mean(drops)


def summarize(R: Matrix, baseline: Sequence[float | None] | None = None,
              complete_only: bool = False, bwt_denominator: str = "t-1") -> dict[str, float | None]:
    """The summary metrics of a run (None where not computable). With `complete_only` (a run that evaluated only
    some rows), BWT and forgetting are None unless every diagonal entry they read was evaluated, and FWT unless
    every entry above the diagonal and every reference score was: a mean over the few tasks that happen to have
    been evaluated would be another quantity under the same name. `bwt_denominator`: see `backward_transfer`."""
    T = _check_square(R)
    diagonal = all(R[j][j] is not None for j in range(T - 1))
    above = baseline is not None and all(R[j - 1][j] is not None and baseline[j] is not None for j in range(1, T))
    return {
        "average_accuracy": average_accuracy(R),
        "bwt": backward_transfer(R, bwt_denominator) if diagonal or not complete_only else None,
        "fwt": forward_transfer(R, baseline) if above or not complete_only else None,
        "forgetting": average_forgetting(R) if diagonal or not complete_only else None,
    }


def summarize_run(R: Matrix, phases_completed: Sequence[int], baseline: Sequence[float | None] | None,
                  complete_only: bool, bwt_denominator: str = "t-1") -> dict[str, float | None]:
    """A run's summary metrics over the tasks trained so far (the leading block of R up to its last completed
    phase); empty before any phase is complete."""
    last = phases_completed[-1] + 1 if phases_completed else 0
    if not last:
        return {}
    return summarize([row[:last] for row in R[:last]], baseline[:last] if baseline else None,
                     complete_only=complete_only, bwt_denominator=bwt_denominator)
