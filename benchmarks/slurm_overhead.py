"""What the SLURM executor of studies costs beside its cells, on a private one-node cluster (the tests' one,
tests/slurm_cluster.py; root and Debian's `slurm-wlm munge` needed): the cluster's start and stop, cells that do
nothing (tests/slurm_work.py's write_done) from submission to the moment the executor sees them end, one job per
cell and as one job array, and the round trip of a requeue (a job warned of its time limit, checkpointed,
requeued and run again).

    python benchmarks/slurm_overhead.py [--repeats 3] [--cells 4]

Every number is wall time and includes the cells' Python start-up in their jobs (submitit, the work function);
on a loaded machine they grow with the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from nlora.studies.slurm import SlurmOptions, submit_cells, wait_for_jobs  # noqa: E402
from slurm_cluster import slurm_cluster  # noqa: E402
from slurm_work import count_to_end, write_done  # noqa: E402

POLL_S = 0.1


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def start_and_stop(repeats: int) -> tuple[list[float], list[float]]:
    starts, stops = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with slurm_cluster():
            starts.append(time.perf_counter() - t)
            t = time.perf_counter()
        stops.append(time.perf_counter() - t)
    return starts, stops


def cells_through(n: int, use_array: bool) -> float:
    with tempfile.TemporaryDirectory() as study:
        options = SlurmOptions(time_min=5, use_array=use_array)

        def run():
            ids = submit_cells(study, [f"cell{i}" for i in range(n)], options, write_done)
            assert wait_for_jobs(options.folder(study), dict(zip(ids, [f"cell{i}" for i in range(n)])),
                                 poll_s=POLL_S) == {}

        return timed(run)


def requeue_round_trip() -> float:
    """From the USR2 to the requeued job running `work` again."""
    with tempfile.TemporaryDirectory() as study:
        options = SlurmOptions(time_min=5)
        [job_id] = submit_cells(study, ["cell"], options, count_to_end)
        starts = Path(study) / "cell.starts"
        while not starts.is_file():
            time.sleep(POLL_S)
        t = time.perf_counter()
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        while len(starts.read_text().splitlines()) < 2:
            time.sleep(POLL_S)
        took = time.perf_counter() - t
        wait_for_jobs(options.folder(study), {job_id: "cell"}, poll_s=POLL_S)
        return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", type=int, default=4)
    args = parser.parse_args()
    starts, stops = start_and_stop(args.repeats)
    print(f"cluster start: median {statistics.median(starts):.2f} s, stop {statistics.median(stops):.2f} s "
          f"({args.repeats} times)")
    with slurm_cluster() as cluster:
        os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
        one = [cells_through(1, False) for _ in range(args.repeats)]
        print(f"1 cell, submitted to seen ended: median {statistics.median(one):.2f} s")
        jobs = [cells_through(args.cells, False) for _ in range(args.repeats)]
        print(f"{args.cells} cells as {args.cells} jobs ({cluster.cpus} CPUs): median {statistics.median(jobs):.2f} s")
        array = [cells_through(args.cells, True) for _ in range(args.repeats)]
        print(f"{args.cells} cells as one array: median {statistics.median(array):.2f} s")
        print(f"requeue round trip (USR2 to the cell running again): {requeue_round_trip():.2f} s")


if __name__ == "__main__":
    main()
