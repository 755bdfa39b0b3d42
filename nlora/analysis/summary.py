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


def scored_by_exact_match(metrics: dict) -> bool:
    """Whether every column is exact match (a classification run, or one written before metrics per column)."""
    return all(m == "exact_match" for m in (metrics.get("metrics") or {}).values())


def what_is_scored(metrics: dict) -> str:
    """What the matrix holds: "accuracy (%)", or "score (0-100, each task's metric)"."""
    return "accuracy (%)" if scored_by_exact_match(metrics) else "score (0-100, each task's metric)"


def metric_lines(metrics: dict) -> list[str]:
    """The metric of each column and how the scores were computed, where that is not plain exact match."""
    lines = []
    if not scored_by_exact_match(metrics):
        lines.append("metrics: " + ", ".join(f"{t} {m}" for t, m in metrics["metrics"].items()))
    if metrics.get("scoring_mode", "standard") != "standard":
        lines.append(f"scoring mode: {metrics['scoring_mode']} (the TRACE scripts' arithmetic)")
    return lines


def format_run(metrics: dict) -> str:
    head = f"{metrics['method']} on {metrics['model']} (seed {metrics['seed']}): {what_is_scored(metrics)} after " \
           "each task"
    bwt = "BWT" if metrics.get("bwt_denominator", "t-1") == "t-1" else "BWT (over T)"
    tail = f"AP {_fmt(metrics.get('average_accuracy')).strip()}   {bwt} {_fmt(metrics.get('bwt')).strip()}"
    return "\n".join([head, format_matrix(metrics), *metric_lines(metrics), tail])


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
