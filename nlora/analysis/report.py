"""Reports of runs: PNG plots and report.md with the tables, for one run (written to RUN_DIR/report/) or a
comparison of several (one table and overlaid plots, written to a folder of the caller's choice).

Everything is read from the run directories: metrics.json for the accuracies and continual-learning metrics,
diagnostics.json (recomputed from the saved adapters when missing or stale) for the parameter diagnostics, and
general.json (`nlora eval-general`), where present, for the general-ability scores.
Plots use matplotlib's object API with the Agg canvas, so no display and no global pyplot state is involved.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import NloraError
from ..eval.general import mixing_reasons, read_general
from ..io import staged_dir, write_bytes_atomic, write_text_atomic
from ..paths import check_holds_no_run
from ..rundir import LOG_FILE, read_log
from .diagnostics import diagnose_run, load_or_diagnose, natural_key

__all__ = ["write_report", "PLOTS"]

PLOTS = {
    "accuracy_matrix.png": "Accuracy matrix",
    "accuracy_over_sequence.png": "Accuracy on each task along the sequence",
    "collision_heatmap.png": "Pairwise collision rate",
    "layer_sparsity_collision.png": "Sparsity and collision per layer",
    "nuclear_norms.png": "Nuclear norms of the task updates",
}
CURVES = "training_curves.png"  # written when a run has a log.jsonl (older runs have none)
GENERAL_PLOT = "general_ability.png"  # written when a run has a general.json whose scores can be drawn together
_NO_VALUE = "–"


@dataclass
class RunData:
    path: Path
    label: str
    metrics: dict
    diagnostics: dict
    general: dict | None = None  # general.json, from `nlora eval-general`

    @property
    def tasks(self) -> list[str]:
        return self.metrics["tasks"]

    @property
    def columns(self) -> list[str]:
        """The metric of each task (exact_match for a run written before metrics per column)."""
        recorded = self.metrics.get("metrics") or {}
        return [recorded.get(t, "exact_match") for t in self.tasks]

    @property
    def exact_match_only(self) -> bool:
        return all(m == "exact_match" for m in self.columns)


def _load_run(path: Path, rediagnose: bool, rel_eps: float | None, eps_scale: str | None) -> RunData:
    metrics_path = path / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except FileNotFoundError:
        raise NloraError(f"{path} is not a run directory (no metrics.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NloraError(f"{metrics_path} is corrupt ({e})") from None
    if rediagnose:
        kwargs = {k: v for k, v in (("rel_eps", rel_eps), ("eps_scale", eps_scale)) if v is not None}
        diagnostics = diagnose_run(path, **kwargs)
    else:
        diagnostics = load_or_diagnose(path, rel_eps, eps_scale)
    return RunData(path, str(metrics.get("method", path.name)), metrics, diagnostics, read_general(path))


def _label_runs(runs: list[RunData]) -> None:
    """Name each run by its method, and by its folder where two runs share a method."""
    for make in (lambda r: r.label, lambda r: f"{r.metrics.get('method')} ({r.path.name})",
                 lambda r: f"{r.metrics.get('method')} ({r.path.parent.name}/{r.path.name})", lambda r: str(r.path)):
        labels = [make(r) for r in runs]
        if len(set(labels)) == len(labels):
            break
    for r, label in zip(runs, labels):
        r.label = label


def write_report(run_dirs, output_dir=None, rediagnose: bool = False, rel_eps: float | None = None,
                 eps_scale: str | None = None, overwrite: bool = False) -> Path:
    """Write the report of one run (default folder RUN_DIR/report) or the comparison of several runs (into
    `output_dir`, required then); returns the report folder, which is replaced as a whole. A folder of the
    caller's that holds files is replaced only with `overwrite`. `rediagnose` recomputes diagnostics.json first."""
    paths = [Path(p) for p in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not paths:
        raise NloraError("no run directory given")
    if output_dir is None:
        if len(paths) > 1:
            raise NloraError(f"{len(paths)} runs to compare: give the folder of the comparison report "
                             "(--output-dir DIR)")
        output_dir = paths[0] / "report"
    out = Path(output_dir)
    own = len(paths) == 1 and out.resolve() == (paths[0] / "report").resolve()  # the run's report/: nlora's
    check_holds_no_run(out, paths, "option --output-dir:")
    if not (own or overwrite) and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NloraError(f"output folder {out} already exists and is not empty; choose another or pass "
                         "--overwrite to replace it")
    runs = [_load_run(p, rediagnose, rel_eps, eps_scale) for p in paths]
    _label_runs(runs)
    figures = {
        "accuracy_matrix.png": plot_accuracy_matrices(runs),
        "accuracy_over_sequence.png": plot_accuracy_over_sequence(runs),
        "collision_heatmap.png": plot_collision_heatmaps(runs),
        "layer_sparsity_collision.png": plot_layer_bars(runs),
        "nuclear_norms.png": plot_nuclear_norms(runs),
    }
    if any(_train_lines(r) for r in runs):
        figures[CURVES] = plot_training_curves(runs)
    if _general_runs(runs) and not _general_mixing(runs):
        figures[GENERAL_PLOT] = plot_general(runs)
    try:
        with staged_dir(out) as folder:  # the old report stays whole until the new one is
            for name, fig in figures.items():
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=110)
                write_bytes_atomic(folder / name, buffer.getvalue())
            write_text_atomic(folder / "report.md", report_markdown(runs))
    except OSError as e:
        raise NloraError(f"cannot write the report into {out}: {e.strerror or e}") from None
    return out


# ------------------------------------------------------------------------------------- numbers and tables

def fmt_accuracy(x) -> str:
    """Accuracies and the metrics derived from them (percent points): two decimals."""
    return f"{x:.2f}" if isinstance(x, (int, float)) else _NO_VALUE


def fmt_value(x) -> str:
    """Diagnostics: four significant digits."""
    return f"{x:.4g}" if isinstance(x, (int, float)) else _NO_VALUE


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


METRIC_COLUMNS = [("AP", "average_accuracy"), ("BWT", "bwt"), ("FWT", "fwt"), ("forgetting", "forgetting")]
DIAGNOSTIC_COLUMNS = [
    ("collision rate", "mean_collision_rate"),
    ("collision (Jaccard)", "mean_collision_jaccard"),
    ("ΔW cosine", "mean_delta_cosine"),
    ("O-LoRA ‖A_s A_tᵀ‖_F", "mean_olora_overlap"),
    ("subspace overlap", "mean_subspace_overlap"),
    ("sparsity", "mean_sparsity"),
    ("nuclear norm", "mean_nuclear_norm"),
    ("L1 norm", "mean_l1_norm"),
]
PAIR_COLUMNS = [("collision rate", "collision_rate"), ("collision (Jaccard)", "collision_jaccard"),
                ("ΔW cosine", "delta_cosine"), ("O-LoRA ‖A_s A_tᵀ‖_F", "olora_overlap"),
                ("O-LoRA Σ|A_s A_tᵀ|", "olora_l1"), ("subspace overlap", "subspace_overlap")]
TASK_COLUMNS = [("sparsity", "sparsity"), ("L1 norm", "l1_norm"), ("nuclear norm", "nuclear_norm"),
                ("Frobenius norm", "frobenius_norm")]


def _images(*names: str) -> list[str]:
    return [line for name in names for line in (f"![{PLOTS[name]}]({name})", "")]


def report_markdown(runs: list[RunData]) -> str:
    title = runs[0].label if len(runs) == 1 else " vs ".join(r.label for r in runs)
    eps = runs[0].diagnostics["epsilon"]
    parts = [f"# Report: {title}", ""]
    parts += [_table(["run", "method", "model", "seed", "tasks", "phases completed", "directory"],
                     [[r.label, r.metrics.get("method"), r.metrics.get("model"), r.metrics.get("seed"),
                       ", ".join(r.tasks), f"{len(r.metrics.get('phases_completed', []))}/"
                       f"{len(r.metrics.get('phases', r.tasks))}", str(r.path.resolve())] for r in runs]), ""]

    exact = all(r.exact_match_only for r in runs)
    entry = "accuracy in %" if exact else "the score of task j's own metric, on 0-100"
    parts += ["## Continual-learning metrics", "",
              f"From the accuracy matrix R (R[i][j]: {entry} on task j after training task i): "
              "AP = mean of the last row; BWT = mean over j < T of R[T][j] − R[j][j] (over j ≤ T, i.e. divided by "
              "T, where the BWT denominator is t); "
              "FWT = mean over j > 1 of R[j−1][j] − the base model's score on j (needs `eval_future`); "
              "forgetting = mean over j < T of the drop from task j's best score to its final one.", ""]
    parts += scoring_notes(runs)
    parts += [_table(["run"] + [c for c, _ in METRIC_COLUMNS],
                     [[r.label] + [fmt_accuracy(r.metrics.get(k)) for _, k in METRIC_COLUMNS] for r in runs]), ""]
    parts += ["## Accuracy matrices" if exact else "## Score matrices", ""]
    for r in runs:
        R = r.metrics["accuracy_matrix"]
        header = r.tasks if r.exact_match_only else [f"{t} ({m})" for t, m in zip(r.tasks, r.columns)]
        parts += [f"### {r.label}", "",
                  _table(["after \\ on"] + header,
                         [[t] + [fmt_accuracy(x) for x in row] for t, row in zip(r.tasks, R)]), ""]
    parts += _images("accuracy_matrix.png", "accuracy_over_sequence.png")

    parts += ["## Parameter diagnostics", "",
              f"Computed from the saved adapters. An entry of an update ΔW_t is non-zero when "
              f"|x| > {eps['value']:g} · {'max|ΔW_t|' if eps['scale'] == 'max' else 'RMS(ΔW_t)'} "
              f"(per layer and task). Pairwise columns are means over task pairs; the others means over tasks "
              f"(nuclear and L1 norms summed over the adapted layers).", ""]
    thresholds = {(r.diagnostics["epsilon"]["value"], r.diagnostics["epsilon"]["scale"]) for r in runs}
    if len(thresholds) > 1:
        parts += ["Note: the runs' diagnostics use different thresholds: " + "; ".join(
            f"{r.label}: {r.diagnostics['epsilon']['rule']}" for r in runs) + ".", ""]
    for r in runs:
        if r.diagnostics["adapter_layout"] == "snapshot":
            parts += [f"{r.label} keeps one adapter (snapshot layout): the update of a task is the change of that "
                      "adapter over the task's phase, the first one measured from ΔW = 0; the O-LoRA measure "
                      "(between separate adapters' A matrices) does not apply.", ""]
    parts += [_table(["run"] + [c for c, _ in DIAGNOSTIC_COLUMNS],
                     [[r.label] + [fmt_value(r.diagnostics["summary"].get(k)) for _, k in DIAGNOSTIC_COLUMNS]
                      for r in runs]), ""]
    for r in runs:
        d = r.diagnostics
        parts += [f"### {r.label}", ""]
        if not d["per_task"]:
            parts += ["No adapter saved yet.", ""]
            continue
        parts += [_table(["task"] + [c for c, _ in TASK_COLUMNS],
                         [[t["task"]] + [fmt_value(t.get(k)) for _, k in TASK_COLUMNS] for t in d["per_task"]]), ""]
        if d["pairs"]:
            parts += [_table(["pair"] + [c for c, _ in PAIR_COLUMNS],
                             [[" – ".join(p["tasks"])] + [fmt_value(p.get(k)) for _, k in PAIR_COLUMNS]
                              for p in d["pairs"]]), ""]
        else:
            parts += ["Fewer than two task updates: no pairwise diagnostics.", ""]
    parts += _images("collision_heatmap.png", "layer_sparsity_collision.png", "nuclear_norms.png")
    parts += training_section(runs)
    parts += general_section(runs)

    parts += ["## Definitions", "",
              "- **collision rate**: fraction of the positions of a layer's weight matrix where both ΔW_s and ΔW_t "
              "are non-zero, pooled over layers (N-LoRA, arXiv 2410.10179: a parameter collision is two tasks "
              "updating the same parameter; here with the explicit threshold above). **Jaccard**: the same count "
              "over the positions where either is non-zero.",
              "- **ΔW cosine**: |⟨ΔW_s, ΔW_t⟩_F| / (‖ΔW_s‖_F ‖ΔW_t‖_F), the orthogonality of the updates "
              "themselves, which non-colliding updates satisfy exactly (0 = orthogonal).",
              "- **O-LoRA ‖A_s A_tᵀ‖_F** and **Σ|A_s A_tᵀ|**: the overlap that O-LoRA (arXiv 2310.14152) "
              "penalises, on the adapters' A matrices; depends on their scale.",
              "- **subspace overlap**: mean squared cosine of the principal angles between the row spaces of ΔW_s "
              "and ΔW_t (0 = orthogonal, 1 = one contains the other); scale-free.",
              "- **sparsity**: fraction of the entries of ΔW_t at or below the threshold; **L1**, **nuclear** "
              "and **Frobenius norm** of ΔW_t.", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------- plots

def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _tick_font(n: int) -> float:
    return max(5.0, 10.0 - n / 4)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.35")
    ax.set_axis_off()


def scoring_notes(runs: list[RunData]) -> list[str]:
    """The metric of each task, the scoring mode and the BWT denominator, where a run is not plain exact match."""
    parts = []
    for r in runs:
        notes = []
        if not r.exact_match_only:
            notes.append("metrics: " + ", ".join(f"{t} `{m}`" for t, m in zip(r.tasks, r.columns)))
        if r.metrics.get("scoring_mode", "standard") != "standard":
            notes.append(f"scoring mode `{r.metrics['scoring_mode']}` (the TRACE scripts' arithmetic, to compare "
                         "with numbers published from them)")
        if r.metrics.get("bwt_denominator", "t-1") != "t-1":
            notes.append("BWT divided by T (TRACE's and SAPT's convention)")
        if notes:
            parts.append(f"- {r.label}: " + "; ".join(notes))
    return parts + ([""] if parts else [])


def column_scales(values: list[list[float | None]], columns: list[str] | None) -> list[float]:
    """The value at the top of each column's colour scale: 100 where every column is exact match; where the
    tasks' metrics differ (and so do their usual ranges: SARI near 40, accuracy near 100), each column's own best
    score, so that each column shows its forgetting on its own metric."""
    n = len(values[0]) if values else 0
    if not columns or all(m == "exact_match" for m in columns):
        return [100.0] * n
    best = [max((row[j] for row in values if row[j] is not None), default=0.0) for j in range(n)]
    return [b if b > 0 else 100.0 for b in best]


def _heatmap(ax, values: list[list[float | None]], labels: list[str], vmax: float, fmt: str, cmap: str,
             scales: list[float] | None = None, xlabels: list[str] | None = None):
    """`scales`: each column's top of the colour scale (default: `vmax` for all); the cells show the values."""
    import numpy as np
    from matplotlib import colormaps

    data = np.array([[np.nan if x is None else x for x in row] for row in values], dtype=float)
    top = np.array(scales if scales is not None else [vmax] * data.shape[1], dtype=float)
    colormap = colormaps[cmap].with_extremes(bad="0.92")
    image = ax.imshow(data / top[None, :] * vmax, cmap=colormap, vmin=0, vmax=vmax)
    n = len(labels)
    size = _tick_font(n)
    xlabels = xlabels or labels
    ax.set_xticks(range(n), xlabels, rotation=40 if max(map(len, labels)) > 4 else 0, ha="right", fontsize=size)
    ax.set_yticks(range(n), labels, fontsize=size)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            x = data[i, j]
            text = _NO_VALUE if math.isnan(x) else format(x, fmt)
            red, green, blue, _ = colormap(min(max(x / top[j], 0.0), 1.0)) if not math.isnan(x) else (1, 1, 1, 1)
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, i, text, ha="center", va="center", fontsize=max(5.0, size - 1),
                    color="white" if dark else "black")
    return image


def plot_accuracy_matrices(runs: list[RunData]) -> Figure:
    n_tasks = max(len(r.tasks) for r in runs)
    side = 1.6 + 0.55 * n_tasks
    fig = Figure(figsize=(max(6.0, side * len(runs) + 1.2), side + 1.0), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    exact = all(r.exact_match_only for r in runs)
    for ax, r in zip(axes, runs):
        R = r.metrics["accuracy_matrix"]
        xlabels = None if r.exact_match_only else [f"{t}\n{m.split('(')[0]}" for t, m in zip(r.tasks, r.columns)]
        image = _heatmap(ax, R, r.tasks, 100.0, ".1f", "viridis", column_scales(R, r.columns), xlabels)
        ax.set_title(r.label)
        ax.set_xlabel("evaluated on task" if r.exact_match_only else "evaluated on task (its metric)")
        ax.set_ylabel("after training task")
    if exact:
        fig.colorbar(image, ax=list(axes), label="accuracy (%)", shrink=0.8)
        fig.suptitle("Accuracy (%) on each task after training each task\n(grey: not evaluated)", fontsize=11)
    else:
        fig.colorbar(image, ax=list(axes), label="% of the column's best score", shrink=0.8)
        fig.suptitle("Score of each task's metric after training each task\n(colour: each column scaled to its best "
                     "score; grey: not evaluated)", fontsize=11)
    return fig


MARKERS = "osD^vP*Xhp<>"


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


def plot_accuracy_over_sequence(runs: list[RunData]) -> Figure:
    if len(runs) == 1:
        r = runs[0]
        T = len(r.tasks)
        R = r.metrics["accuracy_matrix"]
        fig = Figure(figsize=(max(6.0, 1.0 + 0.7 * T) + 2.0, 4.2), layout="constrained")
        ax = fig.subplots()
        for j, (task, color) in enumerate(zip(r.tasks, _colors(T))):
            _task_curve(ax, R, j, task if r.exact_match_only else f"{task} ({r.columns[j]})", color,
                        MARKERS[j % len(MARKERS)])
        _mean_curve(ax, R, color="black", linestyle="--", linewidth=2, label="mean of tasks trained")
        ax.set_xticks(range(T), r.tasks, rotation=30 if T > 5 else 0, ha="right" if T > 5 else "center",
                      fontsize=_tick_font(T) + 1)
        ax.set_xlabel("after training task")
        ax.set_ylabel(_score_label([r]))
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="evaluated on", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        ax.set_title(f"{r.label}: accuracy on each task along the sequence\n(dotted: before the task is trained)",
                     fontsize=10)
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
              for k, c in enumerate(_colors(len(runs)))]
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
            ax.set_xticks(range(T), runs[0].tasks, rotation=30, ha="right", fontsize=_tick_font(T))
        else:
            ax.set_xticks(range(T), [str(i + 1) for i in range(T)])
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel(_score_label(runs))
    fig.supxlabel("after training task" if same_order else "after training the k-th task of the run's order")
    handles, labels = axes[len(panels) - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=len(runs))
    fig.suptitle("Accuracy on each task along the sequence (dotted: before the task is trained)", x=0.02,
                 ha="left", fontsize=11)
    return fig


def _collision_matrix(d: dict) -> list[list[float | None]]:
    """Off-diagonal: pairwise collision rate; diagonal: fraction of non-zero entries of ΔW_t."""
    tasks = d["tasks"]
    index = {t: i for i, t in enumerate(tasks)}
    M: list[list[float | None]] = [[None] * len(tasks) for _ in tasks]
    for i, row in enumerate(d["per_task"]):
        M[i][i] = None if row["sparsity"] is None else 1.0 - row["sparsity"]
    for p in d["pairs"]:
        s, t = (index[x] for x in p["tasks"])
        M[s][t] = M[t][s] = p["collision_rate"]
    return M


def plot_collision_heatmaps(runs: list[RunData]) -> Figure:
    n_tasks = max(len(r.diagnostics["tasks"]) for r in runs) or 1
    side = 1.6 + 0.55 * n_tasks
    fig = Figure(figsize=(max(7.0, side * len(runs) + 1.2), side + 1.3), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    image = None
    for ax, r in zip(axes, runs):
        d = r.diagnostics
        ax.set_title(r.label)
        if len(d["tasks"]) < 2:
            _empty(ax, "fewer than two task updates:\nno pairs")
            continue
        image = _heatmap(ax, _collision_matrix(d), d["tasks"], 1.0, ".2f", "magma_r")
        ax.set_xlabel("task")
        ax.set_ylabel("task")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="fraction of positions", shrink=0.8)
    eps = runs[0].diagnostics["epsilon"]
    fig.suptitle(r"Collision rate: fraction of positions where both $\Delta W_s$ and $\Delta W_t$ are non-zero" "\n"
                 r"(diagonal: non-zero fraction of $\Delta W_t$); "
                 rf"non-zero: $|x| > {eps['value']:g} \cdot$ {'max' if eps['scale'] == 'max' else 'RMS'} "
                 r"of the layer's $|\Delta W_t|$", fontsize=10)
    return fig


def _short_names(layers: list[str]) -> list[str]:
    """Layer names without the dotted prefix they all share."""
    split = [name.split(".") for name in layers]
    common = 0
    while split and all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    if common and split and split[0][common].isdigit():  # keep "layers.3", not a bare "3"
        common -= 1
    return [".".join(s[common:]) for s in split]


def _layer_means(d: dict) -> dict[str, tuple[float | None, float | None]]:
    out = {}
    for layer in d["layers"]:
        sparsity = [t["sparsity"] for t in layer["tasks"] if t["sparsity"] is not None]
        collision = [p["collision_rate"] for p in layer["pairs"] if p["collision_rate"] is not None]
        out[layer["layer"]] = (sum(sparsity) / len(sparsity) if sparsity else None,
                               sum(collision) / len(collision) if collision else None)
    return out


def plot_layer_bars(runs: list[RunData]) -> Figure:
    means = [_layer_means(r.diagnostics) for r in runs]
    layers = sorted({name for m in means for name in m}, key=natural_key)
    n = max(1, len(layers))
    fig = Figure(figsize=(min(30.0, max(9.0, 1.5 + n * (0.16 + 0.1 * len(runs)))), 7.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    if not layers:
        _empty(top, "no adapter saved")
        _empty(bottom, "no adapter saved")
        return fig
    width = 0.8 / len(runs)
    for k, (r, m, color) in enumerate(zip(runs, means, _colors(len(runs)))):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(layers))]
        for ax, which in ((top, 0), (bottom, 1)):
            values = [m.get(name, (None, None))[which] for name in layers]
            ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                   width=width, color=color, label=r.label)
    top.set_ylabel("sparsity\n(mean over tasks)")
    top.set_title(r"Sparsity of $\Delta W_t$ per adapted layer (fraction of entries at or below the threshold)",
                  fontsize=11)
    bottom.set_ylabel("collision rate\n(mean over task pairs)")
    bottom.set_title(r"Collision rate of $\Delta W_s$, $\Delta W_t$ per adapted layer", fontsize=11)
    if not any(m[name][1] is not None for m in means for name in m):
        bottom.text(0.5, 0.5, "fewer than two task updates: no pairs", ha="center", va="center",
                    transform=bottom.transAxes, color="0.35")
    for ax in (top, bottom):
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    bottom.set_xticks(range(len(layers)), _short_names(layers), rotation=90, fontsize=_tick_font(len(layers) / 3))
    bottom.set_xlabel("adapted layer")
    if len(runs) > 1:
        fig.legend(*top.get_legend_handles_labels(), loc="outside upper center", ncols=len(runs))
    return fig


def plot_nuclear_norms(runs: list[RunData]) -> Figure:
    tasks = []
    for r in runs:
        tasks += [t for t in r.diagnostics["tasks"] if t not in tasks]
    fig = Figure(figsize=(max(6.5, 1.5 + len(tasks) * (0.5 + 0.45 * len(runs))), 4.5), layout="constrained")
    ax = fig.subplots()
    if not tasks:
        _empty(ax, "no adapter saved")
        return fig
    width = 0.8 / len(runs)
    values_all = []
    for k, (r, color) in enumerate(zip(runs, _colors(len(runs)))):
        d = r.diagnostics
        per_task = {t: [layer["tasks"][i]["nuclear_norm"] for layer in d["layers"]]
                    for i, t in enumerate(d["tasks"])}
        positions, data = [], []
        for i, t in enumerate(tasks):
            if t in per_task and per_task[t]:
                positions.append(i - 0.4 + width * (k + 0.5))
                data.append(per_task[t])
                values_all += per_task[t]
        if data:
            parts = ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True,
                               manage_ticks=False, flierprops={"markersize": 3})
            for box in parts["boxes"]:
                box.set(facecolor=color, alpha=0.75)
            for median in parts["medians"]:
                median.set(color="black")
        ax.plot([], [], color=color, linewidth=8, alpha=0.75, label=r.label)
    positive = [v for v in values_all if v and v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30 if len(tasks) > 5 else 0, fontsize=_tick_font(len(tasks)) + 1)
    ax.set_xlabel(r"task update $\Delta W_t$")
    ax.set_ylabel("nuclear norm per adapted layer")
    ax.set_title(r"Nuclear norm $\|\Delta W_t\|_*$ of each adapted layer (box: quartiles over layers)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------- training curves

def _log(r: RunData) -> list[dict]:
    return read_log(r.path / LOG_FILE)


def _train_lines(r: RunData) -> list[dict]:
    return [line for line in _log(r) if line.get("event") == "train" and "global_step" in line]


def training_section(runs: list[RunData]) -> list[str]:
    """The per-task training statistics of log.jsonl, and the curves' figure where there is one."""
    parts = ["## Training", "",
             "From each run's log.jsonl: task loss and regulariser are means per step (over the steps since the "
             "previous logging step in the curves, over the task in the table).", ""]
    for r in runs:
        ends = [line for line in _log(r) if line.get("event") == "train_end"]
        parts += [f"### {r.label}", ""]
        if not ends:
            parts += ["No training logged (no log.jsonl: a run from before training logs, or no task trained "
                      "yet).", ""]
            continue
        parts += [_table(["task", "steps", "mean task loss", "mean regulariser", "seconds"],
                         [[line.get("task"), line.get("steps"), fmt_value(line.get("mean_loss")),
                           fmt_value(line.get("mean_regularizer")), fmt_value(line.get("seconds"))]
                          for line in ends]), ""]
    if any(_train_lines(r) for r in runs):
        parts += [f"![Training curves]({CURVES})", ""]
    return parts


def plot_training_curves(runs: list[RunData]) -> Figure:
    """Task loss (top) and regulariser (bottom) at each logging step along the whole sequence; one line per task
    (no line joins two tasks), dotted lines where a task starts."""
    fig = Figure(figsize=(10.0, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    single = len(runs) == 1
    colors = _colors(len(runs[0].tasks) if single else len(runs))
    any_reg = False
    for k, r in enumerate(runs):
        lines = _train_lines(r)
        for phase in sorted({line["phase"] for line in lines}):
            mine = [line for line in lines if line["phase"] == phase]
            color = colors[phase % len(colors)] if single else colors[k]
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


# ------------------------------------------------------------------------------------- general ability

def _general_runs(runs: list[RunData]) -> list[RunData]:
    return [r for r in runs if r.general is not None]


def _general_mixing(runs: list[RunData]) -> list[str]:
    """Why the runs' general.json cannot be compared (empty: they can, or there is at most one)."""
    found = _general_runs(runs)
    return mixing_reasons({r.label: r.general for r in found}) if len(found) > 1 else []


def _after_label(record: dict, after: str) -> str:
    return "base" if after == "0" else f"{after} {record['labels'][after]}"


def _general_settings_line(record: dict) -> str:
    settings = record["settings"]
    fewshot = "each benchmark's own" if settings.get("num_fewshot") is None else settings["num_fewshot"]
    limit = "none" if settings.get("limit") is None else settings["limit"]
    metrics = ", ".join(f"{b} {info.get('metric')}" for b, info in record["benchmarks"].items())
    quantized = f" ({settings['quantization']} quantized)" if settings.get("quantization") else ""
    return (f"lm-eval {record.get('lm_eval_version')}; few-shot: {fewshot}; limit: {limit}; batch size "
            f"{settings.get('batch_size')}; weights {settings.get('dtype')}{quantized}; scores: {metrics}.")


def general_section(runs: list[RunData]) -> list[str]:
    """The general-ability scores of each run with a general.json: a table per run, the plot where they can be
    drawn together; runs scored under different settings are not compared, and the section says why."""
    found = _general_runs(runs)
    if not found:
        return []
    parts = ["## General ability (lm-evaluation-harness)", "",
             "From each run's general.json (`nlora eval-general`): the base model and the model after task K, scored "
             "by lm-eval on general benchmarks. A benchmark's score is its first metric, in lm-eval's units "
             "(accuracies as fractions); in parentheses ΔG = the score after K − the base model's score; ΔG (mean) "
             "averages ΔG over every benchmark of the file, where all of them are scored after K.", ""]
    mixing = _general_mixing(runs)
    if mixing:
        parts += ["Not compared across runs: scores computed under different settings are never mixed ("
                  + "; ".join(mixing) + "). Each run's table below stands alone, and there is no joint plot.", ""]
    for r in found:
        g = r.general
        benchmarks = list(g["benchmarks"])
        parts += [f"### {r.label}", "", _general_settings_line(g), ""]
        limit = g["settings"].get("limit")
        if limit is not None:
            parts += [f"**Smoke test** (`--limit {limit}`: the first {limit} examples of each benchmark), not "
                      "comparable with full-benchmark numbers.", ""]
        rows = []
        for after, scores in g["scores"].items():
            delta = g["delta"].get(after, {})
            cells = [_after_label(g, after)]
            for b in benchmarks:
                d = delta.get("per_benchmark", {}).get(b)
                cells.append(_NO_VALUE if b not in scores else
                             f"{scores[b]['score']:.4f}" + (f" ({d:+.4f})" if d is not None else ""))
            cells.append("" if after == "0" else _NO_VALUE if delta.get("mean") is None else f"{delta['mean']:+.4f}")
            rows.append(cells)
        parts += [_table(["after"] + benchmarks + ["ΔG (mean)"], rows), ""]
    if not mixing:
        parts += [f"![General ability along the sequence]({GENERAL_PLOT})", ""]
    return parts


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
                  fontsize=_tick_font(T) + 1)
    ax.grid(alpha=0.3)


def plot_general(runs: list[RunData]) -> Figure:
    """One run: each benchmark's score along the sequence, and ΔG per benchmark with its mean. Several runs
    (scored under the same settings): one panel per benchmark and one for the mean ΔG, a line per run."""
    found = _general_runs(runs)
    if len(found) == 1:
        g = found[0].general
        fig = Figure(figsize=(12.0, 4.3), layout="constrained")
        left, right = fig.subplots(1, 2)
        for (b, color), marker in zip(zip(g["benchmarks"], _colors(len(g["benchmarks"]))), MARKERS * 10):
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
    for k, (r, color) in enumerate(zip(found, _colors(len(found)))):
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
    handles, labels = axes[len(panels) - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=len(found))
    fig.suptitle("General ability along the sequence (same lm-eval settings)", x=0.02, ha="left", fontsize=11)
    return fig


def _metric_of(runs: list[RunData], benchmark: str) -> str:
    return next(r.general["benchmarks"][benchmark].get("metric", "") for r in runs
                if benchmark in r.general["benchmarks"])
