"""The training curves: task loss and regulariser at each logging step along the whole sequence."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..report_data import RunData, train_lines
from .common import colors, legend_beside


def plot_training_curves(runs: list[RunData]) -> Figure:
    """Task loss (top) and regulariser (bottom) at each logging step along the whole sequence; one line per task
    (no line joins two tasks), dotted lines where a task starts. A logged value is the mean over the steps since the
    previous logging step; a task logged once (fewer steps than log_steps) is drawn over the steps it averages,
    not as a lone dot."""
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
            start = xs[0] - mine[0]["step"]  # the global step where this task started
            _curve(top, xs, [line.get("loss") for line in mine], start, color=color, label=label)
            regs = [line.get("regularizer") for line in mine]
            if any(isinstance(v, (int, float)) and v != 0 for v in regs):
                any_reg = True
                _curve(bottom, xs, regs, start, color=color)
            if single or k == 0:
                for ax in (top, bottom):
                    ax.axvline(start, color="0.6", linestyle=":", linewidth=1)
                top.annotate(mine[0].get("task", ""), (start, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(2, -2), textcoords="offset points", va="top", fontsize=7, color="0.35",
                             rotation=90 if len(runs[0].tasks) > 8 else 0)  # many tasks: names side by side
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
        legend_beside(fig, list(unique.values()), list(unique.keys()), title="task" if single else "run")
    return fig


def _curve(ax, xs: list[int], ys: list, start: int, **style) -> None:
    if len(xs) == 1 and xs[0] > start:
        ax.plot([start, xs[0]], ys * 2, marker=".", markevery=[1], **style)
    else:
        ax.plot(xs, ys, marker=".", **style)
