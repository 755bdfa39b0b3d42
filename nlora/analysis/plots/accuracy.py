"""The accuracy plots: the accuracy matrix of each run as a heatmap, and each task's accuracy along the sequence."""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from ..report_data import RunData
from .common import MARKERS, colors, column_scales, heatmap, legend_beside, tick_font, wrap


def plot_accuracy_matrices(runs: list[RunData]) -> Figure:
    n_tasks = max(len(r.tasks) for r in runs)
    side = 1.6 + 0.55 * n_tasks
    width = side * len(runs) + 1.6  # the matrices and the colour bar: no blank margin around a small matrix
    exact = all(r.exact_match_only for r in runs)
    title = wrap("Accuracy (%) on each task after training each task\n(grey: not evaluated)" if exact else
                 "Score of each task's metric after training each task\n(colour: each column scaled to its best "
                 "score; grey: not evaluated)", width, 11)
    fig = Figure(figsize=(width, side + 0.8 + 0.2 * title.count("\n")), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, r in zip(axes, runs):
        R = r.metrics["accuracy_matrix"]
        xlabels = None if r.exact_match_only else [f"{t}\n{m.split('(')[0]}" for t, m in zip(r.tasks, r.columns)]
        image = heatmap(ax, R, r.tasks, 100.0, ".1f", "viridis", column_scales(R, r.columns), xlabels)
        ax.set_title(r.label)
        ax.set_xlabel("evaluated on task" if r.exact_match_only else "evaluated on task (its metric)")
        ax.set_ylabel("after training task")
    fig.colorbar(image, ax=list(axes), label="accuracy (%)" if exact else "% of the column's best score", shrink=0.8)
    fig.suptitle(title, fontsize=11)
    return fig


def _seen_mean(R: list[list], i: int) -> float | None:
    seen = [x for x in R[i][: i + 1] if x is not None]
    return sum(seen) / len(seen) if seen else None


def _task_curve(ax, R: list[list], j: int, label: str, color, marker: str = "o", size: float = 6.0) -> None:
    """Accuracy on task j after each phase: solid from the phase that trains it, dotted before (eval_future)."""
    before = [(i, R[i][j]) for i in range(min(j, len(R))) if R[i][j] is not None]
    after = [(i, R[i][j]) for i in range(j, len(R)) if R[i][j] is not None]
    style = dict(color=color, marker=marker, markersize=size)
    if after:
        ax.plot(*zip(*after), label=label, **style)
    if before:
        ax.plot(*zip(*(before + after[:1])), linestyle=":", alpha=0.6, markerfacecolor="none",
                **({} if after else {"label": label}), **style)


def _mean_curve(ax, R: list[list], **style) -> None:
    mean = [(i, _seen_mean(R, i)) for i in range(len(R)) if _seen_mean(R, i) is not None]
    if mean:
        ax.plot(*zip(*mean), **style)


def _score_label(runs: list[RunData]) -> str:
    return "accuracy (%)" if all(r.exact_match_only for r in runs) else "score (0-100, each task's metric)"


def _sequence_title(runs: list[RunData]) -> str:
    """What the curves show: accuracy, or the score of each task's metric; the dotted part only where a run
    evaluated tasks before training them (eval_future)."""
    what = "Accuracy" if all(r.exact_match_only for r in runs) else "Score"
    before = any(x is not None for r in runs for i, row in enumerate(r.metrics["accuracy_matrix"])
                 for x in row[i + 1:])
    return f"{what} on each task along the sequence" + ("\n(dotted: before the task is trained)" if before else "")


def plot_accuracy_over_sequence(runs: list[RunData]) -> Figure:
    if len(runs) == 1:
        r = runs[0]
        T = len(r.tasks)
        R = r.metrics["accuracy_matrix"]
        fig = Figure(figsize=(max(6.0, 1.0 + 0.7 * T) + 2.0, 4.2), layout="constrained")
        ax = fig.subplots()
        for j, (task, color) in enumerate(zip(r.tasks, colors(T))):
            _task_curve(ax, R, j, task if r.exact_match_only else f"{task} ({r.columns[j]})", color,
                        MARKERS[j % len(MARKERS)])
        _mean_curve(ax, R, color="black", linestyle="--", linewidth=2, label="mean of tasks trained")
        ax.set_xticks(range(T), r.tasks, rotation=30 if T > 5 else 0, ha="right" if T > 5 else "center",
                      fontsize=tick_font(T) + 1)
        ax.set_xlabel("after training task")
        ax.set_ylabel(_score_label([r]))
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="evaluated on", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        title = _sequence_title(runs)
        ax.set_title(f"{r.label}: {title[0].lower()}{title[1:]}", fontsize=10)
        return fig

    tasks = []
    for r in runs:
        tasks += [t for t in r.tasks if t not in tasks]
    panels = tasks + ["mean of tasks trained"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    T = max(len(r.tasks) for r in runs)
    same_order = all(r.tasks == runs[0].tasks for r in runs)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    # later runs get smaller markers, so that runs with equal values stay visible on top of each other
    styles = [dict(color=c, marker=MARKERS[k % len(MARKERS)], size=max(3.0, 8.0 - 1.2 * k))
              for k, c in enumerate(colors(len(runs)))]
    for ax, panel in zip(axes, panels):
        for r, style in zip(runs, styles):
            R = r.metrics["accuracy_matrix"]
            if panel in r.tasks:
                _task_curve(ax, R, r.tasks.index(panel), r.label, style["color"], style["marker"], style["size"])
            elif panel == panels[-1]:
                _mean_curve(ax, R, color=style["color"], marker=style["marker"], markersize=style["size"],
                            label=r.label)
        ax.set_title(panel if panel == panels[-1] else f"task {panel}", fontsize=10)
        if same_order:
            ax.set_xticks(range(T), runs[0].tasks, rotation=30, ha="right", fontsize=tick_font(T))
        else:
            ax.set_xticks(range(T), [str(i + 1) for i in range(T)])
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel(_score_label(runs))
    fig.supxlabel("after training task" if same_order else "after training the k-th task of the run's order")
    legend_beside(fig, *axes[len(panels) - 1].get_legend_handles_labels(), title="run")
    fig.suptitle(_sequence_title(runs), x=0.02, ha="left", fontsize=11)
    return fig
