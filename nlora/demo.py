"""The offline default job: N-LoRA and IncLoRA on nlora's own generated task stream with the pretrained
all-MiniLM-L6-v2 encoder, side by side."""

from __future__ import annotations

from pathlib import Path

from .config import DEFAULT_MODEL, load_config
from .report import write_report
from .runner import run
from .summary import format_comparison, format_run
from .synthetic import TASK_NAMES, write_synthetic_benchmark

DEMO_METHODS = ("n-lora", "inc-lora")
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


def run_demo(config_path=None, overrides: dict | None = None, progress: bool = True) -> list[dict]:
    base = load_config(config_path, overrides, defaults=DEMO_DEFAULTS)
    root = Path(base.output_dir)
    if base.data_dir is None:
        data_dir = write_synthetic_benchmark(root / "data", seed=base.seed, tasks=tuple(
            t for t in TASK_NAMES if t in base.tasks))
        base = base.replace(data_dir=str(data_dir))
    results = []
    for method in DEMO_METHODS:
        config = base.replace(method=method, output_dir=str(root / method))
        print(f"\n=== {method}: {len(config.tasks)} tasks, model {config.model}")
        metrics = run(config, progress=progress)
        print(format_run(metrics))
        results.append(metrics)
    print("\nFinal accuracy (%) on each task after the whole sequence:")
    print(format_comparison(results))
    print(f"\nrun directories: {', '.join(str((root / m).resolve()) for m in DEMO_METHODS)}")
    report = write_report([root / m for m in DEMO_METHODS], output_dir=root / "report")
    print(f"report (plots, tables, parameter diagnostics): {(report / 'report.md').resolve()}")
    return results
