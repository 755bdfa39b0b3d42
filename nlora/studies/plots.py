"""A study's plots: AP per row with its 95% interval over seeds, the mean score on the tasks seen so far along the
sequence (one panel per order), and each task's forgetting (one panel per order)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .compare import CONFIDENCE, t_quantile
from .results import StudyResults, seen_mean, task_forgetting

PLOTS = {
    "ap.png": "AP per row: mean over seeds with its 95% t interval",
    "accuracy_over_sequence.png": "mean score on the tasks seen so far, after each task",
    "forgetting_per_task.png": "each task's forgetting at the end of the sequence",
}


def write_plots(results: StudyResults, folder: Path) -> list[str]:
    """The plots that have data, written into `folder`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, plot in (("ap.png", plot_ap), ("accuracy_over_sequence.png", plot_sequence),
                       ("forgetting_per_task.png", plot_forgetting)):
        figure = plot(results)
        if figure is None:
            continue
        figure.savefig(folder / name, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(name)
    return written


def _interval(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    return t_quantile(0.5 + CONFIDENCE / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def plot_ap(results: StudyResults):
    import matplotlib.pyplot as plt

    orders = tuple(results.study.orders)
    bars = [(row.label, row.per_seed("average_accuracy", orders, results.study.seeds)) for row in results.rows]
    bars = [(label, values) for label, values in bars if values]
    if not bars:
        return None
    bars.sort(key=lambda b: statistics.fmean(b[1]))
    figure, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.4), constrained_layout=True)
    means = [statistics.fmean(v) for _, v in bars]
    ax.barh(range(len(bars)), means, xerr=[_interval(v) for _, v in bars], color="#4c72b0", capsize=3)
    for i, (_, values) in enumerate(bars):  # each seed's value, so a reader sees the spread itself
        ax.plot(values, [i] * len(values), "k.", markersize=4)
    ax.set_yticks(range(len(bars)), [label for label, _ in bars])
    ax.set_xlabel("AP (mean over orders), seeds as dots")
    ax.set_title(f"{results.study.name}: AP with 95% intervals over {len(results.study.seeds)} seed(s)")
    return figure


def plot_sequence(results: StudyResults):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    orders = [o for o in results.study.orders if any(o == k for r in results.rows for k, _ in r.runs)]
    if not orders:
        return None
    figure, axes = plt.subplots(1, len(orders), figsize=(4.2 * len(orders) + 2.2, 3.6), squeeze=False,
                                constrained_layout=True)
    for ax, order in zip(axes[0], orders):
        for row in results.rows:
            runs = [m for (o, _), m in row.runs.items() if o == order]
            if not runs:
                continue
            T = len(runs[0]["tasks"])
            curve = []
            for i in range(T):
                values = [seen_mean(m["accuracy_matrix"], i) for m in runs]
                values = [v for v in values if v is not None]
                curve.append(statistics.fmean(values) if values else math.nan)
            ax.plot(range(1, T + 1), curve, marker="o", markersize=3, label=row.label)
        ax.set_title("the sequence" if order is None else f"order {order}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("mean score on the tasks seen")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize="small")
    figure.suptitle(f"{results.study.name}: score on the tasks seen so far (mean over seeds)")
    return figure


def plot_forgetting(results: StudyResults):
    import matplotlib.pyplot as plt

    orders = [o for o in results.study.orders if any(o == k for r in results.rows for k, _ in r.runs)]
    panels = []
    for order in orders:
        series = []
        for row in results.rows:
            runs = [m for (o, _), m in row.runs.items() if o == order]
            if runs and len(runs[0]["tasks"]) > 1:
                per_task = [task_forgetting(m["accuracy_matrix"]) for m in runs]
                means = [statistics.fmean([f[j] for f in per_task if f[j] is not None] or [math.nan])
                         for j in range(len(per_task[0]))]
                series.append((row.label, means, runs[0]["tasks"][:-1]))
        if series:
            panels.append((order, series))
    if not panels:
        return None
    width = max(len(s[0][2]) for _, s in panels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.5 * width * 1.4 + 3), 3.2 * len(panels)),
                                squeeze=False, constrained_layout=True)
    for ax, (order, series) in zip(axes[:, 0], panels):
        n = len(series)
        for k, (label, means, tasks) in enumerate(series):
            xs = [j + (k - (n - 1) / 2) * 0.8 / n for j in range(len(tasks))]
            ax.bar(xs, means, width=0.8 / n, label=label)
        ax.set_xticks(range(len(series[0][2])), series[0][2], rotation=30, ha="right", fontsize="small")
        ax.set_ylabel("best score minus final (points)")
        ax.set_title("the sequence" if order is None else f"order {order}")
        ax.axhline(0, color="black", linewidth=0.6)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize="small")
    figure.suptitle(f"{results.study.name}: forgetting per task (mean over seeds)")
    return figure
