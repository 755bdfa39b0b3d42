"""The offline default job: N-LoRA and IncLoRA on nlora's own generated task stream with the pretrained
all-MiniLM-L6-v2 encoder, side by side, over several seeds (each seed draws its own task stream and training
randomness), reported per seed and as mean ± standard deviation.

`nlora demo --generative`: the path of free-text tasks, offline on the CPU in a minute or two: nlora's generated
TRACE-layout stream (one task per metric) mixed with a classification task, trained one after another on a
built-in tiny model, each task scored with its own metric, the scores recomputed from the predictions in TRACE's
reference mode and with TRACE's BWT denominator, and a report."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .analysis.report import write_report
from .analysis.summary import format_run
from .config import DEFAULT_MODEL, RunConfig, load_config, load_yaml_file
from .errors import NloraError
from .rundir import changed_options
from .runner import run
from .studies.compare import mean_sd, paired
from .tasks.synthetic import TASK_NAMES, TRACE_TASKS, write_synthetic_benchmark, write_synthetic_trace

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
}
METRICS = (("AP", "average_accuracy"), ("BWT", "bwt"))


def run_demo(config_path=None, overrides: dict | None = None, progress: bool = True,
             num_seeds: int = DEMO_SEEDS) -> dict[str, list[dict]]:
    """Both methods on `num_seeds` seeds; returns {method: [metrics of each seed]}. A rerun reuses each run that
    finished with the same configuration and resumes one that was stopped; `overwrite` starts every run over."""
    base = load_config(config_path, overrides, defaults=DEMO_DEFAULTS)
    root = Path(base.output_dir)
    seeds = [base.seed + i for i in range(max(1, num_seeds))]
    results: dict[str, list[dict]] = {m: [] for m in DEMO_METHODS}
    start = time.perf_counter()
    plan = [(seed, method, _demo_config(base, root, seed, method)) for seed in seeds for method in DEMO_METHODS]
    states = [("new" if base.overwrite else saved_state(config)) for _, _, config in plan]
    timed: list[float] = []  # seconds of each run trained (or resumed) in this invocation
    written: set[int] = set()  # seeds whose generated data is on disk
    for k, ((seed, method, config), state) in enumerate(zip(plan, states)):
        if base.data_dir is None and state != "finished" and seed not in written:  # deterministic from the seed
            write_synthetic_benchmark(config.data_dir, n_train=DEMO_TRAIN, n_test=DEMO_TEST, seed=seed,
                                      tasks=tuple(t for t in TASK_NAMES if t in base.tasks))
            written.add(seed)
        left = sum(s != "finished" for s in states[k:])
        eta = f"; about {_duration(statistics.fmean(timed) * left)} left" if timed and state != "finished" else ""
        print(f"\n=== run {k + 1} of {len(plan)}: seed {seed}, {method}: {len(config.tasks)} tasks, model "
              f"{config.model}{eta}" + {"finished": " (finished earlier: reused)", "stopped": " (resumed)",
                                        "new": ""}[state])
        began = time.perf_counter()
        if state == "finished":
            metrics = json.loads((Path(config.output_dir) / "metrics.json").read_text(encoding="utf-8"))
        else:
            metrics = run(config.replace(overwrite=state == "new"), progress=progress, resume=state == "stopped")
            timed.append(time.perf_counter() - began)
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


def _demo_config(base: RunConfig, root: Path, seed: int, method: str) -> RunConfig:
    seeded = base.replace(seed=seed)
    if base.data_dir is None:
        seeded = seeded.replace(data_dir=str(root / f"seed-{seed}" / "data"))
    # the options given (--lambda) are n-lora's, the demo's first method; inc-lora has none of its own
    own = seeded.method_options if method == seeded.method else {}
    return seeded.replace(method=method, method_options=own, output_dir=str(root / f"seed-{seed}" / method))


def saved_state(config: RunConfig) -> str:
    """What config.output_dir holds of this configuration's run: "finished" (complete: reused), "stopped"
    (started, not complete: resumed), or "new" (nothing, or a run of another configuration: replaced)."""
    folder = Path(config.output_dir)
    try:
        saved = load_yaml_file(folder / "config.yaml")
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (NloraError, OSError, ValueError):
        return "new"
    if not isinstance(metrics, dict) or changed_options(saved, config.to_dict()):
        return "new"
    return "finished" if metrics.get("complete") else "stopped"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


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
    """The comparison worded from the paired per-seed differences (first method minus second), as a study's report
    judges them (nlora.studies.compare): a difference whose sign changes across seeds, or whose 95% t interval
    contains 0, is within the seeds' spread and reported as such."""
    first, second = list(results)[:2]
    lines = []
    for name, key in METRICS:
        pairs = [(a[key], b[key]) for a, b in zip(results[first], results[second])
                 if a[key] is not None and b[key] is not None]
        if not pairs:
            continue
        p = paired([a for a, _ in pairs], [b for _, b in pairs])
        spread = f"{p.mean:+.1f} ± {p.sd:.1f}" if p.sd is not None else f"{p.mean:+.1f}"
        if p.n == 1:
            lines.append(f"{name}: {first} − {second} = {spread} points on one seed; one seed has no spread to "
                         "compare it with, so it says nothing about the methods (run several seeds).")
        elif p.higher and p.lower:
            lines.append(f"{name}: {first} − {second} = {spread} points (mean ± sd over seeds); higher on "
                         f"{p.higher} seed(s), lower on {p.lower}: the difference is within the seeds' spread, so "
                         "these runs show no difference between the methods.")
        elif p.higher or p.lower:
            better, count = (first, p.higher) if p.higher else (second, p.lower)
            ties = f", equal on {p.n - count}" if count < p.n else ""
            low, high = p.interval
            verdict = "separated" if p.separated else "it contains 0, so the difference is not separated from the " \
                                                      "seeds' spread"
            lines.append(f"{name}: {better} is higher on {count} of {p.n} seeds{ties} ({first} − {second} = {spread} "
                         f"points, mean ± sd over seeds; 95% t interval [{low:+.1f}, {high:+.1f}]: {verdict}).")
        else:
            lines.append(f"{name}: the same for both methods on all {p.n} seeds.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ free-text tasks

GENERATIVE_TASKS = ["reverse", "harbor", "sum", "simplify", "headline", "choice"]  # harbor: classification
GENERATIVE_DEFAULTS = {
    "model": "tiny-llama",
    "method": "inc-lora",
    "tasks": GENERATIVE_TASKS,
    "task_metrics": [f"{t}={m}" for t, (_, m) in TRACE_TASKS.items()],
    "output_dir": "runs/demo-generative",
    "epochs": 2,
    "batch_size": 8,
    "lr": 1e-3,
    "max_source_length": 96,
    "max_target_length": 24,
    "max_new_tokens": 24,
    "device": "cpu",
    "overwrite": True,
}


def run_generative_demo(config_path=None, overrides: dict | None = None, progress: bool = True) -> dict:
    """One run over the generated free-text stream and a classification task; returns its metrics."""
    from .eval.continual import backward_transfer
    from .eval.rescore import rescore_run

    config = load_config(config_path, overrides, defaults=GENERATIVE_DEFAULTS)
    config = config.replace(task_metrics=[m for m in config.task_metrics  # those of the tasks run
                                          if m.partition("=")[0].strip() in config.tasks])
    root = Path(config.output_dir)
    if config.data_dir is None:
        data = root / "data"
        write_synthetic_trace(data, n_train=32, n_eval=4, n_test=12, seed=config.seed,
                              tasks=tuple(t for t in TRACE_TASKS if t in config.tasks))
        write_synthetic_benchmark(data, n_train=32, n_test=12, seed=config.seed,
                                  tasks=tuple(t for t in TASK_NAMES if t in config.tasks))
        config = config.replace(data_dir=str(data))
    run_dir = root / "run"
    config = config.replace(output_dir=str(run_dir))
    start = time.perf_counter()
    print(f"=== {config.method} on {config.model}: {len(config.tasks)} tasks, free-text and classification mixed")
    metrics = run(config, progress=progress)
    print(format_run(metrics))
    R = metrics["accuracy_matrix"]
    print(f"BWT over T (TRACE's and SAPT's convention, `--bwt-denominator t`): {backward_transfer(R, 't'):.2f}")
    trace = rescore_run(run_dir, scoring_mode="trace_reference")  # the TRACE scripts' arithmetic, from the files
    print(f"rescored from the predictions files in trace_reference mode: AP {trace['average_accuracy']:.2f}, last "
          "row " + ", ".join(f"{t} {x:.1f}" for t, x in zip(trace["tasks"], trace["accuracy_matrix"][-1])))
    rescore_run(run_dir, scoring_mode=config.scoring_mode)  # back to the run's own mode: it stays resumable
    report = write_report([run_dir], output_dir=root / "report", overwrite=True)
    print(f"\n{time.perf_counter() - start:.0f} s. Generated text: {run_dir.resolve()}/predictions/; report: "
          f"{(report / 'report.md').resolve()}")
    if config.model in ("tiny-t5", "tiny-llama"):
        print("The built-in tiny model is random: it runs the whole path and does not learn, so its scores are "
              "near zero. Give a small pretrained seq2seq or decoder model (--model, a local folder or a cached "
              "hub name) for scores that mean something.")
    return metrics
