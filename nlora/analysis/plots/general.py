"""The general-ability plot: lm-eval scores along the sequence, for one run or runs scored under the same settings."""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from ..report_data import RunData, general_runs
from .common import MARKERS, colors, legend_beside, tick_font


def _general_curve(ax, record: dict, value, **style) -> None:
    """value(after) for each scored position along the sequence (0 = base), where it has one."""
    points = [(int(a), value(a)) for a in record["scores"]]
    points = [(x, y) for x, y in points if y is not None]
    if points:
        ax.plot(*zip(*points), **style)


def _sequence_ticks(ax, runs: list[RunData]) -> None:
    T = max(len(r.tasks) for r in runs)
    same_order = all(r.tasks == runs[0].tasks for r in runs)
    labels = ["base"] + (runs[0].tasks if same_order else [str(i + 1) for i in range(T)])
    ax.set_xticks(range(T + 1), labels, rotation=30 if T > 5 else 0, ha="right" if T > 5 else "center",
                  fontsize=tick_font(T) + 1)
    ax.grid(alpha=0.3)


def plot_general(runs: list[RunData]) -> Figure:
    """One run: each benchmark's score along the sequence, and ΔG per benchmark with its mean. Several runs
    (scored under the same settings): one panel per benchmark and one for the mean ΔG, a line per run."""
    found = general_runs(runs)
    if len(found) == 1:
        g = found[0].general
        fig = Figure(figsize=(12.0, 4.3), layout="constrained")
        left, right = fig.subplots(1, 2)
        for (b, color), marker in zip(zip(g["benchmarks"], colors(len(g["benchmarks"]))), MARKERS * 10):
            _general_curve(left, g, lambda a, b=b: g["scores"][a].get(b, {}).get("score"), color=color,
                           marker=marker, label=b)
            _general_curve(right, g, lambda a, b=b: 0.0 if a == "0" else
                           g["delta"].get(a, {}).get("per_benchmark", {}).get(b), color=color, marker=marker,
                           alpha=0.6, label=b)
        _general_curve(right, g, lambda a: 0.0 if a == "0" else g["delta"].get(a, {}).get("mean"), color="black",
                       linestyle="--", linewidth=2, marker="o", label="mean ΔG")
        left.set_ylabel("score (lm-eval's units)")
        left.set_title("Score on each benchmark", fontsize=10)
        right.set_ylabel("ΔG = score − base score")
        right.set_title("Change from the base model", fontsize=10)
        right.axhline(0.0, color="0.5", linewidth=1)
        for ax in (left, right):
            _sequence_ticks(ax, found)
            ax.set_xlabel("after training task")
        right.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.suptitle(f"{found[0].label}: general ability along the sequence", fontsize=11)
        return fig
    benchmarks = []
    for r in found:
        benchmarks += [b for b in r.general["benchmarks"] if b not in benchmarks]
    panels = benchmarks + ["mean ΔG"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for k, (r, color) in enumerate(zip(found, colors(len(found)))):
        g = r.general
        style = dict(color=color, marker=MARKERS[k % len(MARKERS)], markersize=max(3.0, 8.0 - 1.2 * k), label=r.label)
        for ax, panel in zip(axes, panels):
            if panel == "mean ΔG":
                _general_curve(ax, g, lambda a: 0.0 if a == "0" else g["delta"].get(a, {}).get("mean"), **style)
            elif panel in g["benchmarks"]:
                _general_curve(ax, g, lambda a, b=panel: g["scores"][a].get(b, {}).get("score"), **style)
    for ax, panel in zip(axes, panels):
        ax.set_title(panel if panel == "mean ΔG" else f"{panel} ({_metric_of(found, panel)})", fontsize=10)
        _sequence_ticks(ax, found)
    fig.supxlabel("after training task")
    legend_beside(fig, *axes[len(panels) - 1].get_legend_handles_labels(), title="run")
    fig.suptitle("General ability along the sequence (same lm-eval settings)", x=0.02, ha="left", fontsize=11)
    return fig


def _metric_of(runs: list[RunData], benchmark: str) -> str:
    return next(r.general["benchmarks"][benchmark].get("metric", "") for r in runs
                if benchmark in r.general["benchmarks"])
