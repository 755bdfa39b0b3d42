"""How many CPU threads torch's operations use in a run (option `threads`).

torch starts one OpenMP thread per core. On a machine that is not idle (another job, a test suite, a second run)
those threads wait on each other at every operation: on 2 cores with one other busy process, a MiniLM run took
several times its wall time and twice its CPU time at 2 threads against 1 (benchmarks/threads.py, RESULTS.md).
So a CPU run uses half the cores unless told otherwise, leaving room for one other job; `threads` (or
OMP_NUM_THREADS, which torch reads) sets the count. A GPU run keeps torch's default: its CPU threads only feed
the device.

The count can change a result's last digits (the order of a sum split over threads), so a run resumed with
another count is not byte-identical to an uninterrupted one; `threads` is part of the run's configuration."""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_threads(threads: int | None, device: torch.device) -> int | None:
    """The thread count a run sets: `threads` if given; unset, half the cores for a CPU run (None: torch's own
    choice stands, where OMP_NUM_THREADS is set or the run is on an accelerator)."""
    if threads is not None:
        return threads
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, available_cores() // 2)


def use_threads(threads: int | None, device: torch.device) -> None:
    count = run_threads(threads, device)
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
