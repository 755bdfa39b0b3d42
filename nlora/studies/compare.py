"""Paired comparison of two methods over the same seeds (and orders): each pair's difference, their mean and
standard deviation, how many pairs go each way, and a Student t interval of the mean difference. A difference whose
interval contains 0, or that has a single pair, is not separated from the seeds' noise."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Paired:
    diffs: tuple[float, ...]
    confidence: float = CONFIDENCE

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.diffs) if self.n > 1 else None

    @property
    def higher(self) -> int:
        return sum(d > 0 for d in self.diffs)

    @property
    def lower(self) -> int:
        return sum(d < 0 for d in self.diffs)

    @property
    def interval(self) -> tuple[float, float] | None:
        """The t interval of the mean difference (None with fewer than 2 pairs)."""
        if self.n < 2:
            return None
        half = t_quantile(0.5 + self.confidence / 2, self.n - 1) * self.sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def separated(self) -> bool:
        """The interval lies on one side of 0."""
        interval = self.interval
        return interval is not None and (interval[0] > 0 or interval[1] < 0)

    @property
    def signs(self) -> str:
        return " ".join("+" if d > 0 else "−" if d < 0 else "0" for d in self.diffs)

    def verdict(self, first: str, second: str) -> str:
        if self.n < 2:
            return "one pair: no spread to judge by"
        if not self.separated:
            return "not separated"
        return f"{first} higher" if self.mean > 0 else f"{second} higher"


def paired(first: list[float], second: list[float], confidence: float = CONFIDENCE) -> Paired:
    """`first[i] − second[i]` for each pair (same seed, same order)."""
    if len(first) != len(second):
        raise ValueError(f"paired values of unequal length: {len(first)} and {len(second)}")
    return Paired(tuple(a - b for a, b in zip(first, second)), confidence)


def t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None
