"""The parameter-diagnostics plots: pairwise collision heatmaps, sparsity and collision per layer, and the nuclear
norms of the task updates."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..diagnostics import natural_key
from ..report_data import RunData
from .common import colors, empty_panel, heatmap, legend_beside, tick_font, wrap


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
    width = max(4.0, side * len(runs) + 1.6)  # the matrices and the colour bar: no blank margin
    eps = runs[0].diagnostics["epsilon"]
    title = wrap(r"Collision rate: fraction of positions where both $\Delta W_s$ and $\Delta W_t$ are non-zero" "\n"
                 r"(diagonal: non-zero fraction of $\Delta W_t$); "
                 rf"non-zero: $|x| > {eps['value']:g} \cdot$ {'max' if eps['scale'] == 'max' else 'RMS'} "
                 r"of the layer's $|\Delta W_t|$", width, 10)
    fig = Figure(figsize=(width, side + 1.0 + 0.2 * title.count("\n")), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    image = None
    for ax, r in zip(axes, runs):
        d = r.diagnostics
        ax.set_title(r.label)
        if len(d["tasks"]) < 2:
            empty_panel(ax, "fewer than two task updates:\nno pairs")
            continue
        image = heatmap(ax, _collision_matrix(d), d["tasks"], 1.0, ".2f", "magma_r")
        ax.set_xlabel("task")
        ax.set_ylabel("task")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="fraction of positions", shrink=0.8)
    fig.suptitle(title, fontsize=10)
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
        empty_panel(top, "no adapter saved")
        empty_panel(bottom, "no adapter saved")
        return fig
    width = 0.8 / len(runs)
    for k, (r, m, color) in enumerate(zip(runs, means, colors(len(runs)))):
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
    bottom.set_xticks(range(len(layers)), _short_names(layers), rotation=90, fontsize=tick_font(len(layers) / 3))
    bottom.set_xlabel("adapted layer")
    if len(runs) > 1:
        legend_beside(fig, *top.get_legend_handles_labels(), title="run")
    return fig


def plot_nuclear_norms(runs: list[RunData]) -> Figure:
    tasks = []
    for r in runs:
        tasks += [t for t in r.diagnostics["tasks"] if t not in tasks]
    fig = Figure(figsize=(max(6.5, 1.5 + len(tasks) * (0.5 + 0.45 * len(runs))), 4.5), layout="constrained")
    ax = fig.subplots()
    if not tasks:
        empty_panel(ax, "no adapter saved")
        return fig
    width = 0.8 / len(runs)
    values_all = []
    for k, (r, color) in enumerate(zip(runs, colors(len(runs)))):
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
    ax.set_xticks(range(len(tasks)), tasks, rotation=30 if len(tasks) > 5 else 0, fontsize=tick_font(len(tasks)) + 1)
    ax.set_xlabel(r"task update $\Delta W_t$")
    ax.set_ylabel("nuclear norm per adapted layer")
    ax.set_title(wrap(r"Nuclear norm $\|\Delta W_t\|_*$ of each adapted layer" "\n(box: quartiles over layers)",
                      fig.get_figwidth() - 1.0, 12))
    ax.grid(axis="y", alpha=0.3)
    legend_beside(fig, *ax.get_legend_handles_labels(), title="run")
    return fig
