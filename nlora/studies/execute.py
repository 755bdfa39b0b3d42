"""Running a study: one cell (`run_cell`, what every executor calls, in this process, a child process or a
SLURM job) and the whole study (`run_study`): check every cell, then run the cells that are ready, choose the tuned
options once their dev cells have ended, and run the test cells that this makes ready, until none is left.

A finished cell is skipped, a killed one resumed from its run directory, a failed one left alone unless
`rerun_failed`; a cell whose configuration the study file now changes is refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from filelock import FileLock, Timeout

from ..config import load_config
from ..errors import NloraError
from ..io import write_yaml_atomic
from ..rundir import RunPaths, changed_options, read_metrics
from .cells import (Cell, cell_config, cell_digest, cell_dir, choice_groups, dev_cells, dev_data_dir, dev_orders,
                    table_cells, validate_cell)
from .devsplit import pool_and_dev, write_dev_view
from .ledger import Ledger, live_state
from .search import advance, searched_points
from .select import SELECTION_FILE, choose, point_score, write_selection
from .spec import Study, with_absolute_paths

STUDY_FILE = "study.yaml"
DRIVER_LOCK = ".study.lock"


def default_study_dir(study: Study) -> Path:
    return Path(study.output_dir or f"runs/studies/{study.name}")


def saved_study(study_dir: str | Path) -> Study:
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise NloraError(f"{study_dir} holds no study ({STUDY_FILE} not found); `nlora study run FILE` makes one")
    from .spec import read_study

    return read_study(path)


def chosen_values(study_dir: Path) -> dict:
    """{(method, order or None): values} from selection.json."""
    path = Path(study_dir) / SELECTION_FILE
    if not path.is_file():
        return {}
    return {(r["method"], r["order"]): r["chosen"] for r in json.loads(path.read_text())["choices"] if r["chosen"]}


def current_dev_cells(study: Study, study_dir: Path) -> list[Cell]:
    """The dev cells: every grid point's, or those of the points a search has asked so far."""
    return dev_cells(study, searched_points(study, study_dir, choice_groups(study)))


def all_cells(study: Study, study_dir: Path) -> list[Cell]:
    return current_dev_cells(study, study_dir) + table_cells(study, chosen_values(study_dir))


def find_cell(study: Study, study_dir: Path, cell_id: str) -> Cell:
    for cell in all_cells(study, study_dir):
        if cell.id == cell_id and not cell.pending:
            return cell
    raise NloraError(f"study {study.name}: no cell {cell_id!r} is ready to run in {study_dir}")


# ------------------------------------------------------------------------------------------------ one cell

def run_cell(study_dir: str, cell_id: str, progress: bool = False, job: str | None = None) -> dict:
    """Run, resume or reuse one cell; its state goes to the ledger (with its SLURM job, inside one). Returns its
    metrics."""
    job = job or _slurm_job()
    study_dir = Path(study_dir)
    study = saved_study(study_dir)
    cell = find_cell(study, study_dir, cell_id)
    config = cell_config(study, cell, study_dir)
    ledger = Ledger(study_dir)
    ledger.start(cell_id, cell_digest(study, cell, study_dir), job=job)
    try:
        metrics = run_or_resume(config, progress)
    except BaseException as e:  # a kill (KeyboardInterrupt, SIGTERM) leaves it running: the next run resumes it
        if isinstance(e, Exception):
            ledger.fail(cell_id, _one_line(e))
        raise
    ledger.finish(cell_id, **cell_costs(metrics))
    return metrics


def _slurm_job() -> str | None:
    job, task = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{task}" if array and task else job


def run_or_resume(config, progress: bool) -> dict:
    from ..runner import run

    paths = RunPaths(config.output_dir)
    previous = read_metrics(paths) if paths.config.is_file() else None
    if previous and previous.get("complete"):
        return previous
    if paths.config.is_file():
        return run(config, progress=progress, resume=True)
    return run(config.replace(overwrite=paths.root.exists()), progress=progress)  # a start killed before config.yaml


def cell_costs(metrics: dict) -> dict:
    train = metrics.get("train", {}).values()
    seconds = sum(s["seconds"] for s in train) + sum(metrics.get("eval_seconds", {}).values())
    return {"seconds": round(seconds, 3), "steps": sum(s.get("steps", 0) for s in train)}


def _one_line(error: BaseException) -> str:
    if isinstance(error, NloraError):
        return str(error)
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(error).__name__}: {error}{where}"


# ------------------------------------------------------------------------------------------- the study

@dataclass
class Outcome:
    """What one `run_study` did."""

    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # done before
    blocked: list[str] = field(default_factory=list)  # pending test cells whose dev cells all failed
    submitted: list[str] = field(default_factory=list)  # handed to a cluster and not waited for
    study_dir: Path | None = None

    def summary(self, study_dir: Path) -> str:
        lines = [f"study directory: {Path(study_dir).resolve()}",
                 f"cells: {len(self.ran)} ran, {len(self.skipped)} done before, {len(self.failed)} failed"
                 + (f", {len(self.submitted)} submitted" if self.submitted else "")
                 + (f", {len(self.blocked)} without a dev result to choose from" if self.blocked else "")]
        lines += [f"  failed {cell_id}: {error}" for cell_id, error in self.failed.items()]
        if self.submitted:
            lines.append("run the same command again once the submitted cells end, to continue")
        elif not self.failed:
            lines.append(f"table: nlora study report {study_dir}")
        else:
            lines.append("--rerun-failed runs the failed cells again")
        return "\n".join(lines)


def prepare(study: Study, study_dir: Path) -> list[tuple[Path, object, int | None, int]]:
    """Check every cell of the study before anything is written; returns the dev views to write (folder, base
    configuration, pool, dev examples)."""
    every_point = dataclasses.replace(study, select=dataclasses.replace(study.select, search="grid"))
    check_cells(study, study_dir, all_cells(study, study_dir), Ledger(study_dir).read())
    for cell in dev_cells(every_point):  # every point a search may ask
        validate_cell(study, cell, study_dir)
    views = []
    for order in dev_orders(study) if any(study.tuned_options(m) for m in study.methods) else []:
        base = load_config(None, {**study.base, **({"order": order} if order is not None else {})})
        pool, dev = pool_and_dev(study, base)
        views.append((dev_data_dir(study_dir, order if study.select.per_order else None), base, pool, dev))
    return views


def check_cells(study: Study, study_dir: Path, cells: list[Cell], ledger: dict) -> None:
    """Each cell's configurations validated, and a cell already in the ledger whose configuration the study now
    changes refused, naming it."""
    for cell in cells:
        validate_cell(study, cell, study_dir)
        entry = ledger.get(cell.id)
        if entry and not cell.pending and entry.get("digest") != cell_digest(study, cell, study_dir):
            raise NloraError(f"{study.source}: cell {cell.id} already ran with another configuration"
                             f"{_changed_keys(study, cell, study_dir)}; keep the study file as it was, or remove "
                             f"{cell_dir(study_dir, cell)} and its ledger entry to run it anew")


def _changed_keys(study: Study, cell: Cell, study_dir: Path) -> str:
    saved = RunPaths(cell_dir(study_dir, cell)).config
    if not saved.is_file():
        return ""
    keys = changed_options(load_config(saved, saved_run=True).to_dict(), cell_config(study, cell, study_dir).to_dict())
    return f" ({', '.join(keys)} differ)" if keys else ""


def write_study(study: Study, study_dir: Path) -> None:
    saved = Path(study_dir) / STUDY_FILE
    if saved.is_file():
        before = yaml.safe_load(saved.read_text()) or {}
        if before.get("name") != study.name:
            raise NloraError(f"{study_dir} holds study {before.get('name')!r}, not {study.name!r}; choose another "
                             "output directory")
    write_yaml_atomic(saved, study.to_dict())


# Runs a batch of ready cells, telling the tracker as each ends and starting none once it is stopped; returns
# {cell id: error} of the failed ones, or None where the cells were handed to a cluster and not waited for.
Execute = Callable[[Study, Path, list[Cell], "Tracker"], "dict[str, str] | None"]


def run_study(study: Study, study_dir: str | Path | None = None, execute: Execute | None = None,
              rerun_failed: bool = False, fail_fast: bool = False, progress: bool = False) -> Outcome:
    """Run every cell of `study` that is not done; returns what happened. `execute` runs a batch of ready cells
    (default: one after another in this process); `progress` shows a bar over the study's cells."""
    study_dir = Path(study_dir or default_study_dir(study))
    study = with_absolute_paths(study)
    execute = execute or run_in_process
    views = prepare(study, study_dir)  # before anything is written
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(str(study_dir / DRIVER_LOCK), timeout=0)
        lock.acquire()
    except Timeout:
        raise NloraError(f"study directory {study_dir} is in use by another `nlora study run`") from None
    try:
        with Tracker(progress, study.name, fail_fast) as tracker:
            return _drive(study, study_dir, views, execute, rerun_failed, tracker)
    finally:
        lock.release()


class Tracker:
    """Cells as they end: a bar over the study's cells (done of all, pending ones included) where shown, and,
    with `fail_fast`, the stop after the first failure."""

    def __init__(self, show: bool = False, name: str = "", fail_fast: bool = False):
        self.show, self.name, self.fail_fast, self.bar = show, name, fail_fast, None
        self.failure: tuple[str, str] | None = None

    @property
    def stopped(self) -> bool:
        return self.fail_fast and self.failure is not None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def set(self, done: int, total: int) -> None:
        if not self.show:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"study {self.name}", unit="cell", dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def ended(self, cell_id: str, error: str | None = None) -> None:
        if error is not None and self.failure is None:
            self.failure = (cell_id, error)
        if self.bar is not None and error is None:
            self.bar.update(1)


def _drive(study, study_dir, views, execute, rerun_failed, tracker: Tracker) -> Outcome:
    write_study(study, study_dir)
    for folder, base, pool, dev in views:
        write_dev_view(folder, base, pool, dev)
    outcome, attempted = Outcome(study_dir=study_dir), set()
    while True:
        ledger = Ledger(study_dir).read()
        searching = False
        if study.select.search == "optuna":  # tell each search its ended point, ask its next
            dev = current_dev_cells(study, study_dir)
            searching = advance(study, study_dir, choice_groups(study),
                                lambda key, point: point_score(study, study_dir, ledger, dev, key, point))
        dev = current_dev_cells(study, study_dir)
        chosen, records = choose(study, study_dir, ledger, dev)
        write_selection(study_dir, records)
        cells = dev + table_cells(study, chosen)
        tracker.set(sum(live_state(ledger.get(c.id)) == "done" for c in cells), len(cells))
        ready = [c for c in cells if not c.pending and c.id not in attempted and _wants_run(ledger.get(c.id),
                                                                                             rerun_failed)]
        outcome.skipped = [c.id for c in cells if live_state(ledger.get(c.id)) == "done" and c.id not in attempted]
        if not ready and searching:  # a point asked again: its cells have ended, so tell it and ask on
            continue
        if not ready:
            outcome.blocked = [c.id for c in cells if c.pending and _dev_ended(study, c, ledger, dev)]
            return outcome
        check_cells(study, study_dir, [c for c in ready if c.tuned], ledger)  # those a choice made ready
        attempted.update(c.id for c in ready)
        failures = execute(study, study_dir, ready, tracker)
        if failures is None:  # submitted, not waited for
            outcome.submitted += [c.id for c in ready]
            return outcome
        outcome.failed.update(failures)
        ended = Ledger(study_dir).read()
        outcome.ran += [c.id for c in ready if c.id not in failures and live_state(ended.get(c.id)) == "done"]
        if tracker.stopped:
            cell_id, error = tracker.failure
            raise NloraError(f"cell {cell_id} failed: {error} (--fail-fast: the study stops here)")


def _wants_run(entry: dict | None, rerun_failed: bool) -> bool:
    state = live_state(entry)
    return state in ("pending", "interrupted") or (state == "failed" and rerun_failed)


def _dev_ended(study: Study, cell: Cell, ledger: dict, dev: list[Cell]) -> bool:
    key_order = cell.order if study.select.per_order else dev_orders(study)[0]
    return all(live_state(ledger.get(c.id)) in ("done", "failed") for c in dev
               if c.method == cell.method and c.order == key_order)


def run_in_process(study: Study, study_dir: Path, cells: list[Cell], tracker: Tracker | None = None
                   ) -> dict[str, str]:
    """One cell after another in this process."""
    tracker = tracker or Tracker()
    failures = {}
    for cell in cells:
        if tracker.stopped:
            break
        try:
            run_cell(str(study_dir), cell.id)
        except Exception as e:
            failures[cell.id] = _one_line(e)
        tracker.ended(cell.id, failures.get(cell.id))
    return failures
