"""The offline default job: N-LoRA and IncLoRA on nlora's own generated task stream with the pretrained
all-MiniLM-L6-v2 encoder, side by side, over several seeds (each seed draws its own task stream and training
randomness), reported per seed and as mean ± standard deviation."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .config import DEFAULT_MODEL, load_config
from .report import write_report
from .runner import run
from .summary import format_run
from .synthetic import TASK_NAMES, write_synthetic_benchmark

DEMO_METHODS = ("n-lora", "inc-lora")
DEMO_SEEDS = 3  # seeds seed, seed + 1, ...: fixed in advance, never chosen by which method wins
# Generated examples per task: small, so that three seeds take about the time one seed of 300 took.
DEMO_TRAIN, DEMO_TEST = 100, 100
DEMO_DEFAULTS = {
    "model": DEFAULT_MODEL,
    "tasks": list(TASK_NAMES[:3]),
    "output_dir": "runs/demo",
    "epochs": 4,
    "batch_size": 16,
    "lr": 1e-3,
    "lambda": 1e-4,
    "max_source_length": 64,
    "device": "cpu",
    "overwrite": True,  # the demo replaces its own earlier results
}
METRICS = (("AP", "average_accuracy"), ("BWT", "bwt"))


def run_demo(config_path=None, overrides: dict | None = None, progress: bool = True,
             num_seeds: int = DEMO_SEEDS) -> dict[str, list[dict]]:
    """Both methods on `num_seeds` seeds; returns {method: [metrics of each seed]}."""
    base = load_config(config_path, overrides, defaults=DEMO_DEFAULTS)
    root = Path(base.output_dir)
    seeds = [base.seed + i for i in range(max(1, num_seeds))]
    results: dict[str, list[dict]] = {m: [] for m in DEMO_METHODS}
    start = time.perf_counter()
    for seed in seeds:
        seeded = base.replace(seed=seed)
        if base.data_dir is None:
            data_dir = write_synthetic_benchmark(root / f"seed-{seed}" / "data", n_train=DEMO_TRAIN,
                                                 n_test=DEMO_TEST, seed=seed,
                                                 tasks=tuple(t for t in TASK_NAMES if t in base.tasks))
            seeded = seeded.replace(data_dir=str(data_dir))
        for method in DEMO_METHODS:
            config = seeded.replace(method=method, output_dir=str(root / f"seed-{seed}" / method))
            print(f"\n=== seed {seed}, {method}: {len(config.tasks)} tasks, model {config.model}")
            metrics = run(config, progress=progress)
            print(format_run(metrics))
            results[method].append(metrics)
    print(f"\nAP and BWT (%) after the whole sequence, {len(seeds)} seed(s) "
          f"({time.perf_counter() - start:.0f} s):")
    print(format_seeds(seeds, results))
    print("\n" + conclusion(results))
    run_dirs = [root / f"seed-{s}" / m for s in seeds for m in DEMO_METHODS]
    print(f"\nrun directories: {root.resolve()}/seed-*/{{{','.join(DEMO_METHODS)}}}")
    report = write_report(run_dirs, output_dir=root / "report", overwrite=True)  # the demo's own, as its runs
    print(f"report (plots, tables, parameter diagnostics): {(report / 'report.md').resolve()}")
    return results


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.1f} ± {sd:.1f}" if sd is not None else f"{mean:.1f}"


def format_seeds(seeds: list[int], results: dict[str, list[dict]]) -> str:
    """One row per seed (AP and BWT of each method), then mean ± standard deviation over the seeds."""
    methods = list(results)
    header = ["seed"] + [f"{m} {name}" for m in methods for name, _ in METRICS]
    rows = [[str(s)] + [f"{results[m][i][key]:.1f}" if results[m][i][key] is not None else "-"
                        for m in methods for _, key in METRICS] for i, s in enumerate(seeds)]
    summary = ["mean ± sd"] + [_cell([r[key] for r in results[m] if r[key] is not None])
                               if any(r[key] is not None for r in results[m]) else "-"
                               for m in methods for _, key in METRICS]
    widths = [max(len(row[c]) for row in [header, *rows, summary]) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows, summary])


def conclusion(results: dict[str, list[dict]]) -> str:
    """The comparison worded from the paired per-seed differences (first method minus second): a difference
    whose sign changes across seeds is within the seeds' spread and reported as such."""
    first, second = list(results)[:2]
    lines = []
    for name, key in METRICS:
        pairs = [(a[key], b[key]) for a, b in zip(results[first], results[second])
                 if a[key] is not None and b[key] is not None]
        if not pairs:
            continue
        diffs = [a - b for a, b in pairs]
        mean, sd = mean_sd(diffs)
        spread = f"{mean:+.1f} ± {sd:.1f}" if sd is not None else f"{mean:+.1f}"
        higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        if len(diffs) == 1:
            lines.append(f"{name}: {first} − {second} = {spread} points on one seed; one seed has no spread to "
                         "compare it with, so it says nothing about the methods (run several seeds).")
        elif higher and lower:
            lines.append(f"{name}: {first} − {second} = {spread} points (mean ± sd over seeds); higher on "
                         f"{higher} seed(s), lower on {lower}: the difference is within the seeds' spread, so "
                         "these runs show no difference between the methods.")
        elif higher or lower:
            better, count = (first, higher) if higher else (second, lower)
            ties = f", equal on {len(diffs) - count}" if count < len(diffs) else ""
            lines.append(f"{name}: {better} is higher on {count} of {len(diffs)} seeds{ties} ({first} − {second} "
                         f"= {spread} points, mean ± sd over seeds).")
        else:
            lines.append(f"{name}: the same for both methods on all {len(diffs)} seeds.")
    return "\n".join(lines)
