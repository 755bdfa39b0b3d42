"""What `nlora study` costs beside its cells, and what N local workers buy.

1. Machinery: a study of CELLS equal cells run in this process; the study's wall time against the time spent
   inside the cells' runs (nlora.runner.run, timed around each call). The rest is the study's own work: checking
   every cell's configuration, the ledger, the dev choice, the report's inputs.
2. Workers: the same N cells with N local workers (each its own process, 1/N of the cores) against one cell
   alone with one worker and the same threads: with N free cores the N cells take about the time of one, plus a
   process start each.

    python benchmarks/study_overhead.py                       # MiniLM cells on the generated tasks
    python benchmarks/study_overhead.py --model tiny-bert     # seconds, not minutes
Prints two markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def study(data: Path, model: str, seeds: list[int], train: int, name: str):
    from nlora.studies.spec import Study

    return Study.from_dict({
        "name": name,
        "base": {"model": model, "tasks": ["harbor", "orchard"], "data_dir": str(data), "max_train_samples": train,
                 "max_eval_samples": 32, "batch_size": 16, "epochs": 1, "device": "cpu", "max_source_length": 256},
        "methods": {"inc-lora": {}}, "seeds": seeds})


def machinery(data: Path, model: str, cells: int, train: int, root: Path) -> dict:
    import nlora.runner as runner
    import nlora.studies.execute as execute

    inside = []
    real = runner.run

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            inside.append(time.perf_counter() - start)

    runner.run = timed
    try:
        start = time.perf_counter()
        outcome = execute.run_study(study(data, model, list(range(cells)), train, "overhead"), root / "overhead")
        wall = time.perf_counter() - start
    finally:
        runner.run = real
    if outcome.failed:
        raise SystemExit(f"cells failed: {outcome.failed}")
    return {"cells": cells, "wall": wall, "inside": sum(inside), "own": wall - sum(inside)}


def workers(data: Path, model: str, n: int, train: int, root: Path) -> dict:
    from nlora.studies.execute import run_study
    from nlora.studies.local import LocalExecutor

    def timed(seeds, executor, name):
        start = time.perf_counter()
        outcome = run_study(study(data, model, seeds, train, name), root / name, executor)
        if outcome.failed:
            raise SystemExit(f"cells failed: {outcome.failed}")
        return time.perf_counter() - start

    threads = max(1, (os.cpu_count() or 1) // n)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the one-cell run gets what each of the N workers gets
    one = timed([100], LocalExecutor(n), "one")  # one cell, one worker process of the N
    many = timed(list(range(n)), LocalExecutor(n), f"n{n}")
    return {"n": n, "threads": threads, "one": one, "many": many}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--cells", type=int, default=6, help="cells of the machinery study (default: 6)")
    p.add_argument("--train", type=int, default=96, help="training examples per task (default: 96)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N (default: the cores)")
    args = p.parse_args(argv)
    from nlora.tasks.synthetic import write_synthetic_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_synthetic_benchmark(root / "data", n_train=args.train, n_test=32, seed=0)
        m = machinery(data, args.model, args.cells, args.train, root)
        w = workers(data, args.model, args.workers, args.train, root)
    load = "%.1f / %.1f / %.1f" % os.getloadavg()
    print(f"model {args.model}, {os.cpu_count()} cores, load average {load} (1/5/15 min)\n")
    print("| cells | study wall (s) | inside the runs (s) | the study's own (s) | own per cell (ms) | own share |")
    print("|---|---|---|---|---|---|")
    print(f"| {m['cells']} | {m['wall']:.1f} | {m['inside']:.1f} | {m['own']:.2f} | {1000 * m['own'] / m['cells']:.0f} "
          f"| {100 * m['own'] / m['inside']:.2f}% |")
    print(f"\n| workers | threads each | one cell (s) | {w['n']} cells (s) | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {w['n']} | {w['threads']} | {w['one']:.1f} | {w['many']:.1f} | {w['many'] / w['one']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
