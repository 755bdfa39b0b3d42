"""Plain-text tables of run results for the terminal."""

from __future__ import annotations


def _fmt(x, width: int = 7) -> str:
    return f"{x:{width}.1f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def format_matrix(metrics: dict) -> str:
    tasks = metrics["tasks"]
    width = max(7, *(len(t) for t in tasks))
    corner = "after/on"
    lines = [f"{corner:<{width}} " + " ".join(f"{t:>{width}}" for t in tasks)]
    for i, row in enumerate(metrics["accuracy_matrix"]):
        lines.append(f"{tasks[i]:<{width}} " + " ".join(_fmt(x, width) for x in row))
    return "\n".join(lines)


def format_run(metrics: dict) -> str:
    head = f"{metrics['method']} on {metrics['model']} (seed {metrics['seed']}): accuracy (%) after each task"
    tail = f"AP {_fmt(metrics.get('average_accuracy')).strip()}   BWT {_fmt(metrics.get('bwt')).strip()}"
    return f"{head}\n{format_matrix(metrics)}\n{tail}"


def format_comparison(runs: list[dict]) -> str:
    """One row per run: the final accuracy on each task, AP and BWT."""
    tasks = runs[0]["tasks"]
    width = max(7, *(len(t) for t in tasks))
    name_w = max(8, *(len(r["method"]) for r in runs))
    lines = [f"{'method':<{name_w}} " + " ".join(f"{t:>{width}}" for t in tasks) + f" {'AP':>7} {'BWT':>7}"]
    for r in runs:
        last = r["accuracy_matrix"][-1]
        lines.append(f"{r['method']:<{name_w}} " + " ".join(_fmt(x, width) for x in last)
                     + f" {_fmt(r.get('average_accuracy'))} {_fmt(r.get('bwt'))}")
    return "\n".join(lines)
