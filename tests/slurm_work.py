"""Work functions for the SLURM executor's tests (tests/test_study_slurm.py): module-level, so that a job on the
test cluster imports them (the tests put this folder on the jobs' PYTHONPATH). Each keeps its files under
STUDY_DIR/<cell id>.*, as a cell keeps its run directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

STEP_S = 0.05
FIRST_RUN_STEPS = 400  # a first run is interrupted long before (or fails, saying so)
STEPS_AFTER_RESTART = 10


def write_done(study_dir: str, cell_id: str) -> str:
    """The smallest cell: records which job ran it ("123", or "123_4" for an array's task)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array else os.environ.get("SLURM_JOB_ID", "?")
    _write(Path(study_dir) / f"{cell_id}.done", job)
    return job


def count_to_end(study_dir: str, cell_id: str) -> int:
    """A resumable cell: counts steps, saving the count after each (its checkpoint), and starts from the saved
    count. Each start appends `count restarts` to <cell>.starts. A first run counts until it is interrupted; a
    requeued one counts STEPS_AFTER_RESTART more steps and ends."""
    base = Path(study_dir) / cell_id
    base.parent.mkdir(parents=True, exist_ok=True)
    counter = base.with_name(base.name + ".count")
    count = int(counter.read_text()) if counter.is_file() else 0
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    with open(base.with_name(base.name + ".starts"), "a") as f:
        f.write(f"{count} {restarts}\n")
    end = count + STEPS_AFTER_RESTART if restarts else FIRST_RUN_STEPS
    while count < end:
        time.sleep(STEP_S)
        count += 1
        _write(counter, str(count))
    if not restarts:
        raise RuntimeError(f"{cell_id}: never interrupted in {FIRST_RUN_STEPS} steps")
    _write(base.with_name(base.name + ".done"), str(count))
    return count


def fail_if_bad(study_dir: str, cell_id: str) -> str:
    """Raises for a cell whose id starts with "bad", else as write_done."""
    if cell_id.startswith("bad"):
        raise ValueError(f"cell {cell_id} is broken")
    return write_done(study_dir, cell_id)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
