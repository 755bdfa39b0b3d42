"""The local executor: up to `workers` cells at once on this machine, each in its own process
(`nlora study run-cell`), given its own GPUs (CUDA_VISIBLE_DEVICES) or its share of the CPU threads. A cell of
several processes is an `accelerate launch` of them (launch.num_processes). One worker runs the cells in this
process instead, one after another."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import NloraError
from .cells import Cell
from .execute import Tracker, run_in_process
from .ledger import Ledger
from .spec import Study


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g for g in given.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_groups(study: Study, workers: int) -> list[list[str]]:
    """One disjoint set of GPUs per worker (empty sets where cells run on the CPU)."""
    per_cell = study.launch.gpus_per_cell
    if per_cell == 0:
        return [[] for _ in range(workers)]
    gpus = visible_gpus()
    if len(gpus) < per_cell * workers:
        raise NloraError(f"{workers} worker(s) of {per_cell} GPU(s) each need {per_cell * workers} GPUs; "
                         f"{len(gpus)} visible ({','.join(gpus) or 'none'})")
    return [gpus[i * per_cell:(i + 1) * per_cell] for i in range(workers)]


def cell_command(study: Study, study_dir: Path, cell: Cell) -> list[str]:
    run_cell = ["-m", "nlora", "study", "run-cell", str(study_dir), cell.id]
    n = study.launch.num_processes
    if n == 1:
        return [sys.executable, *run_cell]
    launch = ["--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if study.launch.gpus_per_cell:
        launch.insert(0, "--multi_gpu")
    else:
        launch.insert(0, "--cpu")
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, *run_cell]


def cell_env(study: Study, gpus: list[str], workers: int) -> dict[str, str]:
    env = dict(os.environ)
    threads = study.launch.threads_per_cell or max(1, (os.cpu_count() or 1) // workers)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if study.launch.gpus_per_cell:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


class LocalExecutor:
    def __init__(self, workers: int = 1, log_dir: str | Path | None = None):
        if workers < 1:
            raise NloraError(f"option --workers: must be >= 1, got {workers}")
        self.workers = workers
        self.log_dir = log_dir

    def __call__(self, study: Study, study_dir: Path, cells: list[Cell], tracker: Tracker | None = None
                 ) -> dict[str, str]:
        tracker = tracker or Tracker()
        if self.workers == 1 and study.launch.num_processes == 1 and not study.launch.gpus_per_cell:
            return run_in_process(study, study_dir, cells, tracker)
        groups: queue.Queue[list[str]] = queue.Queue()
        for group in gpu_groups(study, self.workers):
            groups.put(group)
        log_dir = Path(self.log_dir or study_dir / "logs")
        log_dir.mkdir(parents=True, exist_ok=True)

        def one(cell: Cell) -> str | None:
            gpus = groups.get()
            try:
                if tracker.stopped:
                    return None
                log = log_dir / (cell.id.replace("/", "__") + ".log")
                with open(log, "ab") as out:
                    code = subprocess.call(cell_command(study, study_dir, cell), stdout=out,
                                           stderr=subprocess.STDOUT, env=cell_env(study, gpus, self.workers))
            finally:
                groups.put(gpus)
            error = None
            if code != 0:
                error = Ledger(study_dir).read().get(cell.id, {}).get("error") or f"exit code {code}; log: {log}"
            tracker.ended(cell.id, error)
            return error

        with ThreadPoolExecutor(self.workers) as pool:
            errors = dict(zip((c.id for c in cells), pool.map(one, cells)))
        return {cell_id: error for cell_id, error in errors.items() if error is not None}
