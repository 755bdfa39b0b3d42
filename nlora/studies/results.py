"""What a study's finished test cells measured, gathered by row (method with its untuned values and axis
values), order and seed, and reduced the papers' way: a metric's mean over the orders of each seed, then mean ±
sd over the seeds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..rundir import RunPaths, read_metrics
from .cells import Cell, cell_dir
from .execute import all_cells
from .ledger import Ledger, live_state
from .spec import Study

STANDARD_ORDERS, LONG_ORDERS = (1, 2, 3), (4, 5, 6)
SUMMARY_METRICS = (("AP", "average_accuracy"), ("BWT", "bwt"), ("FWT", "fwt"), ("forgetting", "forgetting"))


@dataclass
class Row:
    label: str
    method: str
    runs: dict[tuple[int | None, int], dict] = field(default_factory=dict)  # (order, seed) -> metrics.json

    def value(self, key: str, order: int | None, seed: int) -> float | None:
        metrics = self.runs.get((order, seed))
        return None if metrics is None else metrics.get(key)

    def per_seed(self, key: str, orders, seeds) -> list[float]:
        """For each seed with a value on every order of `orders`: the mean over those orders."""
        out = []
        for seed in seeds:
            values = [self.value(key, order, seed) for order in orders]
            if values and all(v is not None for v in values):
                out.append(statistics.fmean(values))
        return out


@dataclass
class StudyResults:
    study: Study
    study_dir: Path
    rows: list[Row]
    cells: list[Cell]
    states: dict[str, str]  # cell id -> live state
    errors: dict[str, str]

    def row(self, label: str) -> Row | None:
        return next((r for r in self.rows if r.label == label), None)

    @property
    def baseline(self) -> Row | None:
        """The baseline method's row (its first, where it has several)."""
        return next((r for r in self.rows if r.method == self.study.baseline), None)

    def order_groups(self) -> list[tuple[str, tuple]]:
        """The mean columns of the papers' layout: over the Standard orders, over the Long orders, over all."""
        orders = tuple(o for o in self.study.orders if o is not None)
        groups = []
        if self.study.base.get("benchmark") in ("standard", "o-lora-standard", "long", "o-lora-long"):
            for name, wanted in (("Standard", STANDARD_ORDERS), ("Long", LONG_ORDERS)):
                mine = tuple(o for o in orders if o in wanted)
                if len(mine) > 1:
                    groups.append((f"{name} mean", mine))
        if len(orders) > 1 and not any(g == orders for _, g in groups):
            groups.append(("mean over orders", orders))
        return groups


def collect(study: Study, study_dir: str | Path) -> StudyResults:
    study_dir = Path(study_dir)
    cells = all_cells(study, study_dir)
    ledger = Ledger(study_dir).read()
    rows: dict[str, Row] = {}
    for cell in cells:
        if cell.phase != "test":
            continue
        row = rows.setdefault(cell.row, Row(cell.row, cell.method))
        if cell.pending:
            continue
        metrics = read_metrics(RunPaths(cell_dir(study_dir, cell)))
        if metrics and metrics.get("complete"):
            row.runs[(cell.order, cell.seed)] = metrics
    states = {c.id: live_state(ledger.get(c.id)) for c in cells}
    errors = {cell_id: e["error"] for cell_id, e in ledger.items() if e.get("state") == "failed" and e.get("error")}
    return StudyResults(study, study_dir, list(rows.values()), cells, states, errors)


def task_forgetting(R: list[list[float | None]]) -> list[float | None]:
    """For each task j before the last: the best score on j at any point after it was trained, minus its score
    at the end (None where either is missing)."""
    T = len(R)
    out = []
    for j in range(T - 1):
        seen = [R[i][j] for i in range(j, T) if R[i][j] is not None]
        final = R[T - 1][j]
        out.append(max(seen) - final if seen and final is not None else None)
    return out


def seen_mean(R: list[list[float | None]], i: int) -> float | None:
    """The mean score on tasks 0..i after task i (None if any is missing)."""
    values = R[i][:i + 1]
    return statistics.fmean(values) if values and all(v is not None for v in values) else None
