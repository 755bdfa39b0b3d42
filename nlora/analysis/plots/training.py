"""The training curves: task loss and regulariser at each logging step along the whole sequence."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..report_data import RunData, train_lines
from .common import colors


def plot_training_curves(runs: list[RunData]) -> Figure:
    """Task loss (top) and regulariser (bottom) at each logging step along the whole sequence; one line per task
    (no line joins two tasks), dotted lines where a task starts."""
    fig = Figure(figsize=(10.0, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    single = len(runs) == 1
    palette = colors(len(runs[0].tasks) if single else len(runs))
    any_reg = False
    for k, r in enumerate(runs):
        lines = train_lines(r)
        for phase in sorted({line["phase"] for line in lines}):
            mine = [line for line in lines if line["phase"] == phase]
            color = palette[phase % len(palette)] if single else palette[k]
            label = mine[0].get("task") if single else r.label
            xs = [line["global_step"] for line in mine]
            top.plot(xs, [line.get("loss") for line in mine], color=color, marker=".", label=label)
            regs = [line.get("regularizer") for line in mine]
            if any(isinstance(v, (int, float)) and v != 0 for v in regs):
                any_reg = True
                bottom.plot(xs, regs, color=color, marker=".")
            if single or k == 0:
                start = xs[0] - mine[0]["step"]  # the global step where this task started
                for ax in (top, bottom):
                    ax.axvline(start, color="0.6", linestyle=":", linewidth=1)
                top.annotate(mine[0].get("task", ""), (start, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(2, -2), textcoords="offset points", va="top", fontsize=7, color="0.35")
    top.set_ylabel("task loss")
    top.set_title("Task loss along the sequence", fontsize=11)
    bottom.set_ylabel("regulariser")
    bottom.set_title("Regulariser (the method's penalty, weighted) along the sequence", fontsize=11)
    bottom.set_xlabel("optimizer step (over the whole run)")
    if not any_reg:
        bottom.text(0.5, 0.5, "the method adds no regulariser", ha="center", va="center",
                    transform=bottom.transAxes, color="0.35")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    handles, labels = top.get_legend_handles_labels()
    if handles:
        # one entry per label: a comparison draws each run's tasks as separate lines of one color
        unique = dict(zip(labels, handles))
        top.legend(unique.values(), unique.keys(), title="task" if single else "run", fontsize=8,
                   loc="upper right")
    return fig
