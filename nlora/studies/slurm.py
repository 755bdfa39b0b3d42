"""The SLURM executor of studies, through submitit: one job per cell, or one job array per batch of cells, each
job calling `work(study_dir, cell_id)`, which runs or resumes the cell and records its state in the study's ledger
itself. A job warned of its time limit or of preemption (submitit's USR2, sent `signal_delay_s` before the end) is
requeued and calls `work` again: the cell resumes from its run directory's checkpoint.

No accounting (`sacct`) is needed: `squeue` says which jobs are queued or running, and a job that has left the
queue has submitit's result file (its error, if it raised) or else was killed (cancelled, or beyond its time or
memory). STUDY_DIR/slurm/jobs.json maps each job id to its cell, for `queued_jobs` and the logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from filelock import FileLock

from ..errors import NloraError
from ..io import write_json_atomic

if TYPE_CHECKING:
    from .cells import Cell

LOG_DIR = "slurm"
JOBS_FILE = "jobs.json"
ARRAY_NAME = "nlora-study"
SIGNAL_DELAY_S = 90  # USR2 this long before the time limit: the job requeues itself in time
# squeue's states of a job that has a node; every other state listed is waiting for one
RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"})
SQUEUE_FAILURES_TOLERATED = 10  # consecutive failed polls (a controller restarting) before waiting gives up

Work = Callable[[str, str], Any]
Ended = Callable[[str, "str | None"], None]  # (cell id, error or None) as each job leaves the queue


@dataclass
class SlurmOptions:
    partition: str | None = None  # None: the cluster's default
    time_min: int = 24 * 60  # per job; one that reaches it is requeued and resumes its cell
    gpus_per_cell: int = 0
    cpus_per_cell: int = 1
    mem_gb: float | None = None  # None: the cluster's default
    max_parallel: int | None = None  # use_array: tasks of one array at once
    log_dir: str | Path | None = None  # default STUDY_DIR/slurm
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options ({"qos": "high"}: --qos=high)
    use_array: bool = False  # one job array per batch of cells instead of one job each
    max_timeouts: int = 20  # requeues after reaching the time limit (preemptions are not counted)

    def __post_init__(self) -> None:
        for name, least in (("time_min", 1), ("cpus_per_cell", 1), ("gpus_per_cell", 0), ("max_timeouts", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise NloraError(f"slurm option {name}: must be an integer >= {least} (got {value!r})")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise NloraError(f"slurm option mem_gb: must be positive (got {self.mem_gb!r})")
        if self.max_parallel is not None:
            if not isinstance(self.max_parallel, int) or self.max_parallel < 1:
                raise NloraError(f"slurm option max_parallel: must be an integer >= 1 (got {self.max_parallel!r})")
            if not self.use_array:
                raise NloraError("slurm option max_parallel limits the tasks of a job array: set use_array "
                                 "(--array) too")
        if not isinstance(self.extra, dict):
            raise NloraError(f"slurm option extra: must be a mapping of sbatch options (got {self.extra!r})")

    def folder(self, study_dir: str | Path) -> Path:
        """Where submitit keeps each job's pickles and logs, and jobs.json."""
        return Path(self.log_dir or Path(study_dir) / LOG_DIR).resolve()


class CellJob:
    """What a job calls: `work(study_dir, cell_id)`. submitit requeues a callable with a `checkpoint` method when
    the job is warned of its end (as its helpers.Checkpointable does); this one resubmits the same call, so the
    requeued job runs `work` again and the cell resumes from its own checkpoint. No state rides in the pickle."""

    def __init__(self, work: Work):
        self.work = work

    def __call__(self, study_dir: str, cell_id: str) -> Any:
        return self.work(study_dir, cell_id)

    def checkpoint(self, study_dir: str, cell_id: str):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, study_dir, cell_id)


# ------------------------------------------------------------------------------------------------ submit

def submit_cells(study_dir: str | Path, cell_ids: list[str], options: SlurmOptions, work: Work) -> list[str]:
    """Submit one job per cell (or one array of them where `options.use_array`); returns the job ids, one per
    cell in `cell_ids`' order ("123", or "123_0" for an array's task). `work` must be importable by the jobs
    (a module-level function), as the study directory and the log folder must be reachable from the nodes."""
    if not cell_ids:
        return []
    study_dir = str(Path(study_dir).resolve())
    folder = options.folder(study_dir)
    executor = _executor(folder, options)
    job = CellJob(work)
    if options.use_array:
        executor.update_parameters(name=ARRAY_NAME)
        jobs = executor.map_array(job, [study_dir] * len(cell_ids), list(cell_ids))
    else:
        jobs = []
        for cell_id in cell_ids:
            executor.update_parameters(name=f"nlora {cell_id}")  # squeue shows which cell a job runs
            jobs.append(executor.submit(job, study_dir, cell_id))
    ids = [j.job_id for j in jobs]
    _record_jobs(folder, dict(zip(ids, cell_ids)))
    return ids


def _executor(folder: Path, options: SlurmOptions):
    submitit = _submitit()
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=options.max_timeouts)
    except RuntimeError as e:  # submitit finds no srun
        raise NloraError(f"the slurm executor needs a SLURM cluster: {e} (run on a node that can submit jobs)") \
            from None
    executor.update_parameters(**executor_parameters(options))
    return executor


def executor_parameters(options: SlurmOptions) -> dict[str, Any]:
    """submitit's parameters of every job: one task on one node, its CPUs, GPUs, memory and time, the USR2 warning
    a quarter of the time limit (at most SIGNAL_DELAY_S) before its end."""
    parameters: dict[str, Any] = dict(
        timeout_min=options.time_min, nodes=1, tasks_per_node=1, cpus_per_task=options.cpus_per_cell,
        slurm_signal_delay_s=min(SIGNAL_DELAY_S, max(1, options.time_min * 60 // 4)))
    if options.gpus_per_cell:
        parameters["gpus_per_node"] = options.gpus_per_cell
    if options.mem_gb is not None:
        parameters["mem_gb"] = options.mem_gb
    if options.partition:
        parameters["slurm_partition"] = options.partition
    if options.max_parallel:
        parameters["slurm_array_parallelism"] = options.max_parallel
    if options.extra:
        parameters["slurm_additional_parameters"] = dict(options.extra)
    return parameters


def _submitit():
    try:
        import submitit
    except ImportError:
        raise NloraError("the slurm executor needs submitit: pip install 'nlora[slurm]'") from None
    return submitit


def _record_jobs(folder: Path, jobs: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / JOBS_FILE
    with FileLock(str(path) + ".lock"):
        write_json_atomic(path, {**read_jobs(folder), **jobs})


def read_jobs(folder: Path) -> dict[str, str]:
    """{job id: cell id} of every job submitted from this log folder."""
    path = Path(folder) / JOBS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NloraError(f"{path}: not a list of SLURM jobs ({e}); it is written atomically, so it was changed "
                         "by hand") from None


# ------------------------------------------------------------------------------------------------- watch

def queued_jobs(study_dir: str | Path, log_dir: str | Path | None = None) -> dict[str, str]:
    """{cell id: squeue's state ("PENDING", "RUNNING", ...)} of the study's jobs still in SLURM's queue, a requeued
    job included; a cell with a job that has a node shows that one's."""
    folder = Path(log_dir).resolve() if log_dir else SlurmOptions().folder(study_dir)
    states: dict[str, str] = {}
    for cell_id, state in _study_jobs_in_queue(folder).values():
        if states.get(cell_id) not in RUNNING_STATES:
            states[cell_id] = state
    return states


def _study_jobs_in_queue(folder: Path) -> dict[str, tuple[str, str]]:
    """{job id: (cell id, state)} of the jobs submitted from `folder` that are still in the queue."""
    jobs = read_jobs(folder)
    if not jobs:
        return {}
    return {job_id: (jobs[job_id], state) for job_id, state in _squeue().items() if job_id in jobs}


def _squeue() -> dict[str, str]:
    """{job id: state} of this user's jobs in the queue, an array's tasks one by one ("123_4")."""
    try:
        done = subprocess.run(["squeue", "--noheader", "--array", "--user", str(os.getuid()), "--format", "%i|%T"],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise NloraError("squeue not found: the state of a study's SLURM jobs is read on a node of its cluster") \
            from None
    except subprocess.TimeoutExpired:
        raise NloraError("squeue did not answer in 60 s (is slurmctld up?)") from None
    if done.returncode != 0:
        raise NloraError(f"squeue failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return dict(line.strip().split("|", 1) for line in done.stdout.splitlines() if "|" in line)


def wait_for_jobs(folder: str | Path, jobs: dict[str, str], ended: Ended | None = None,
                  stop: Callable[[], bool] = lambda: False, poll_s: float = 5.0,
                  timeout_s: float | None = None) -> dict[str, str]:
    """Wait until every job of {job id: cell id} has left the queue, calling `ended(cell_id, error or None)` as
    each does; returns {cell id: error} of those that did not return: the last line of the exception `work`
    raised, or that the job was killed, with the path of its log. Once `stop()` is true (a failure under
    --fail-fast), the jobs still waiting for a node are cancelled and left out; those running are waited for.
    `timeout_s`: give up (NloraError) after that long, the jobs left running."""
    left, errors, cancelled, failures_in_a_row = dict(jobs), {}, set(), 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while left:
        if deadline is not None and time.monotonic() > deadline:
            raise NloraError(f"waited {timeout_s:.0f} s for SLURM jobs; still in the queue: "
                             + ", ".join(f"{job_id} ({cell_id})" for job_id, cell_id in left.items()))
        try:
            queued = _squeue()
            failures_in_a_row = 0
        except NloraError:
            failures_in_a_row += 1
            if failures_in_a_row > SQUEUE_FAILURES_TOLERATED:
                raise
            queued = {job_id: "UNKNOWN" for job_id in left}
        for job_id in [j for j in left if j not in queued]:
            cell_id, error = left.pop(job_id), job_error(Path(folder), job_id)
            if job_id in cancelled and not _result_file(Path(folder), job_id).exists():
                continue  # cancelled before it started: the cell stays as it was
            if error is not None:
                errors[cell_id] = error
            if ended is not None:
                ended(cell_id, error)
        if left and stop() and not cancelled:
            cancelled = set(left)
            _cancel_pending(list(left))
        if left:
            time.sleep(poll_s)
    return errors


def _cancel_pending(job_ids: list[str]) -> None:
    subprocess.run(["scancel", "--state=PENDING", *job_ids], capture_output=True, text=True, timeout=60)


def job_error(folder: Path, job_id: str) -> str | None:
    """How a job that has left the queue ended: None where `work` returned, else one line saying why not."""
    from submitit.core.utils import pickle_load

    result, log = _result_file(folder, job_id), _log_file(folder, job_id)
    if not result.exists():
        return (f"SLURM job {job_id} ended without a result (cancelled, or killed at its time or memory limit); "
                f"see {log}")
    outcome, value = pickle_load(result)
    if outcome == "success":
        return None
    last = [line for line in str(value).strip().splitlines() if line.strip()][-1:]
    return f"{last[0].strip() if last else 'failed'} (SLURM job {job_id}; see {log})"


def _result_file(folder: Path, job_id: str) -> Path:
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=0).result_pickle


def _log_file(folder: Path, job_id: str) -> Path:
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=0).stderr


# ----------------------------------------------------------------------------------- the study's executor

def slurm_executor(options: SlurmOptions, wait: bool = True, work: Work | None = None, poll_s: float = 5.0,
                   timeout_s: float | None = None):
    """An executor of `run_study`: submits a batch of ready cells; with `wait`, returns {cell id: error} once
    their jobs have left the queue, telling `tracker` (its `ended(cell_id, error)`, and `stopped`, true after a
    failure under --fail-fast) as they do; else None at once (the next `nlora study run` goes on from the
    ledger)."""

    def execute(study, study_dir: Path, cells: list["Cell"], tracker=None):
        folder = options.folder(study_dir)
        # a cell whose job is still queued or running (submitted by an earlier `--no-wait` run, or by a driver
        # that was stopped) is waited for, not submitted again
        in_queue = {cell_id: job_id for job_id, (cell_id, _) in _study_jobs_in_queue(folder).items()}
        new = [c.id for c in cells if c.id not in in_queue]
        job_ids = submit_cells(study_dir, new, options, work or _run_cell())
        if not wait:
            return None
        jobs = {**{in_queue[c.id]: c.id for c in cells if c.id in in_queue}, **dict(zip(job_ids, new))}
        return wait_for_jobs(folder, jobs, ended=tracker.ended if tracker is not None else None,
                             stop=(lambda: tracker.stopped) if tracker is not None else (lambda: False),
                             poll_s=poll_s, timeout_s=timeout_s)

    return execute


def _run_cell() -> Work:
    from .execute import run_cell

    return run_cell
