"""`nlora study plan`: a study's cells, their count and what they will cost, before anything runs.

A cell's cost is its training steps (each task's examples, batch size, accumulation and epochs, read from the
data) times the cost of one step. The cost of a step is measured: the study's finished cells give their seconds
(training and evaluation) per step, per model; where none has finished, `--seconds-per-step` gives it, and
otherwise the plan says the cost is not known yet rather than guess it."""

from __future__ import annotations

import contextlib
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import NloraError
from .cells import Cell, cell_config
from .execute import all_cells, default_study_dir
from .ledger import Ledger, live_state
from .spec import Study


@dataclass
class PlannedCell:
    cell: Cell
    model: str
    steps: int | None  # None: the data could not be read
    state: str


@dataclass
class Plan:
    study: Study
    study_dir: Path
    cells: list[PlannedCell]
    seconds_per_step: dict[str, float]  # model -> measured or given
    measured: bool

    def seconds(self, cells: list[PlannedCell]) -> float | None:
        total = 0.0
        for c in cells:
            if c.steps is None or c.model not in self.seconds_per_step:
                return None
            total += c.steps * self.seconds_per_step[c.model]
        return total


def plan_study(study: Study, study_dir: str | Path | None = None, seconds_per_step: float | None = None) -> Plan:
    study_dir = Path(study_dir) if study_dir else default_study_dir(study)
    ledger = Ledger(study_dir).read()
    sizes: dict[tuple, list[int] | None] = {}
    planned = []
    for cell in all_cells(study, study_dir):
        config = cell_config(study, cell, study_dir)
        if cell.phase == "dev":  # its data folder may not exist yet: sized from the real data less the dev share
            config = config.replace(data_dir=study.base.get("data_dir"),
                                    max_train_samples=study.select.train_samples or study.base.get("max_train_samples"))
        key = (config.data_dir, tuple(config.tasks), config.max_train_samples, config.task_format)
        if key not in sizes:
            sizes[key] = train_sizes(config)
        n = sizes[key]
        if n is not None and cell.phase == "dev":
            n = [max(1, k - (study.select.dev_samples or k // 5)) for k in n]
        planned.append(PlannedCell(cell, config.model, None if n is None else steps_of(config, n),
                                   live_state(ledger.get(cell.id))))
    measured = measured_seconds_per_step(study, study_dir, planned, ledger)
    per_step = measured or ({c.model: seconds_per_step for c in planned} if seconds_per_step else {})
    return Plan(study, study_dir, planned, per_step, bool(measured))


def train_sizes(config) -> list[int] | None:
    """Training examples of each task as the run draws them (None where the data cannot be read). Read quietly:
    the run itself warns about its data."""
    from ..tasks.loading import load_run_tasks

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return [len(t.train) for t in load_run_tasks(config.replace(max_eval_samples=1))]
    except NloraError:
        return None


def steps_of(config, sizes: list[int]) -> int:
    """Optimizer steps of the whole sequence."""
    epochs = config.epochs_per_task or [config.epochs] * len(sizes)
    per_step = config.batch_size * config.gradient_accumulation_steps
    return sum(int(e) * math.ceil(math.ceil(n / config.batch_size) / config.gradient_accumulation_steps)
               for e, n in zip(epochs, sizes)) if per_step else 0


def measured_seconds_per_step(study: Study, study_dir: Path, planned: list[PlannedCell],
                              ledger: dict) -> dict[str, float]:
    """Per model: the median over the study's finished cells of (training + evaluation seconds) / steps."""
    by_model: dict[str, list[float]] = {}
    for c in planned:
        entry = ledger.get(c.cell.id) or {}
        if c.state == "done" and entry.get("steps"):
            by_model.setdefault(c.model, []).append(entry["seconds"] / entry["steps"])
    return {model: statistics.median(values) for model, values in by_model.items()}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan, list_cells: bool = False) -> str:
    study = plan.study
    gpus = study.launch.gpus_per_cell  # a cell's GPUs, whatever its processes
    unit = f"of GPU time ({gpus} GPU(s) a cell)" if gpus else "of CPU time"
    lines = [f"study {study.name}: {len(plan.cells)} cells in {plan.study_dir}"]
    for phase in ("dev", "test"):
        mine = [c for c in plan.cells if c.cell.phase == phase]
        if not mine:
            continue
        pending = sum(bool(c.cell.pending) for c in mine)
        steps = sum(c.steps or 0 for c in mine)
        cost = plan.seconds(mine)
        cost_text = "cost unknown" if cost is None else f"{duration(cost * max(gpus, 1))} {unit}"
        lines.append(f"  {phase}: {len(mine)} cells ({sum(c.state == 'done' for c in mine)} done"
                     + (f", {pending} waiting for the dev choice" if pending else "") + f"), {steps:,} training "
                     f"steps, {cost_text}")
    if study.select.search == "optuna":
        lines.append(f"  dev: Optuna picks {study.select.trials} points of each tuned grid per method and order; "
                     "the cells above are those of the points asked so far")
    todo = [c for c in plan.cells if c.state != "done"]
    left = plan.seconds(todo)
    if plan.seconds_per_step:
        how = "measured on this study's finished cells" if plan.measured else "given (--seconds-per-step)"
        rates = ", ".join(f"{m}: {s:.3g} s" for m, s in plan.seconds_per_step.items())
        lines.append(f"cost of a step ({how}, training and evaluation): {rates}")
        lines.append(f"left: {len(todo)} cells, " + ("cost unknown" if left is None else
                                                       f"{duration(left * max(gpus, 1))} {unit}"))
    else:
        lines.append("cost: not known yet; it is measured once a cell finishes, or give --seconds-per-step")
    if any(c.steps is None for c in plan.cells):
        lines.append("some cells' data could not be read (data_dir): their steps are not counted")
    if list_cells:
        lines.append("")
        lines += [f"  {c.state:<11} {c.cell.id}  ({c.steps if c.steps is not None else '?'} steps)"
                  for c in plan.cells]
    else:
        lines.append("--cells lists every cell")
    return "\n".join(lines)
