"""report.md: the tables of a report (runs, continual-learning metrics, accuracy matrices, parameter diagnostics,
training statistics, general ability) and the links to its plots."""

from __future__ import annotations

from .report_data import CURVES, GENERAL_PLOT, NO_VALUE, PLOTS, RunData, general_mixing, general_runs, run_log, train_lines


def fmt_accuracy(x) -> str:
    """Accuracies and the metrics derived from them (percent points): two decimals."""
    return f"{x:.2f}" if isinstance(x, (int, float)) else NO_VALUE


def fmt_value(x) -> str:
    """Diagnostics: four significant digits."""
    return f"{x:.4g}" if isinstance(x, (int, float)) else NO_VALUE


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, `|` in a cell escaped."""
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
    parts += [markdown_table(["run", "method", "model", "seed", "tasks", "phases completed", "directory"],
                     [[r.label, r.metrics.get("method"), r.metrics.get("model"), r.metrics.get("seed"),
                       ", ".join(r.tasks), f"{len(r.metrics.get('phases_completed', []))}/"
                       f"{len(r.metrics.get('phases', r.tasks))}", str(r.path.resolve())] for r in runs]), ""]

    exact = all(r.exact_match_only for r in runs)
    entry = "accuracy in %" if exact else "the score of task j's own metric, on 0-100"
    parts += ["## Continual-learning metrics", "",
              f"From the accuracy matrix R (R[i][j]: {entry} on task j after training task i): "
              "AP = mean of the last row; BWT = mean over j < T of R[T][j] − R[j][j] (the same sum divided by T "
              "instead of T − 1 in a run noted below as dividing by T); "
              "FWT = mean over j > 1 of R[j−1][j] − the base model's score on j (needs `eval_future`); "
              "forgetting = mean over j < T of the drop from task j's best score to its final one.", ""]
    parts += scoring_notes(runs)
    parts += [markdown_table(["run"] + [c for c, _ in METRIC_COLUMNS],
                     [[r.label] + [fmt_accuracy(r.metrics.get(k)) for _, k in METRIC_COLUMNS] for r in runs]), ""]
    parts += ["## Accuracy matrices" if exact else "## Score matrices", ""]
    for r in runs:
        R = r.metrics["accuracy_matrix"]
        header = r.tasks if r.exact_match_only else [f"{t} ({m})" for t, m in zip(r.tasks, r.columns)]
        parts += [f"### {r.label}", "",
                  markdown_table(["after \\ on"] + header,
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
    parts += [markdown_table(["run"] + [c for c, _ in DIAGNOSTIC_COLUMNS],
                     [[r.label] + [fmt_value(r.diagnostics["summary"].get(k)) for _, k in DIAGNOSTIC_COLUMNS]
                      for r in runs]), ""]
    for r in runs:
        d = r.diagnostics
        parts += [f"### {r.label}", ""]
        if not d["per_task"]:
            parts += ["No adapter saved yet.", ""]
            continue
        parts += [markdown_table(["task"] + [c for c, _ in TASK_COLUMNS],
                         [[t["task"]] + [fmt_value(t.get(k)) for _, k in TASK_COLUMNS] for t in d["per_task"]]), ""]
        if d["pairs"]:
            parts += [markdown_table(["pair"] + [c for c, _ in PAIR_COLUMNS],
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



def training_section(runs: list[RunData]) -> list[str]:
    """The per-task training statistics of log.jsonl, and the curves' figure where there is one."""
    parts = ["## Training", "",
             "From each run's log.jsonl: task loss and regulariser are means per step (over the steps since the "
             "previous logging step in the curves, over the task in the table).", ""]
    for r in runs:
        ends = [line for line in run_log(r) if line.get("event") == "train_end"]
        parts += [f"### {r.label}", ""]
        if not ends:
            parts += ["No training logged (no log.jsonl: a run from before training logs, or no task trained "
                      "yet).", ""]
            continue
        parts += [markdown_table(["task", "steps", "mean task loss", "mean regulariser", "seconds"],
                         [[line.get("task"), line.get("steps"), fmt_value(line.get("mean_loss")),
                           fmt_value(line.get("mean_regularizer")), fmt_value(line.get("seconds"))]
                          for line in ends]), ""]
    if any(train_lines(r) for r in runs):
        parts += [f"![Training curves]({CURVES})", ""]
    return parts


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
    found = general_runs(runs)
    if not found:
        return []
    parts = ["## General ability (lm-evaluation-harness)", "",
             "From each run's general.json (`nlora eval-general`): the base model and the model after task K, scored "
             "by lm-eval on general benchmarks. A benchmark's score is its first metric, in lm-eval's units "
             "(accuracies as fractions); in parentheses ΔG = the score after K − the base model's score; ΔG (mean) "
             "averages ΔG over every benchmark of the file, where all of them are scored after K.", ""]
    mixing = general_mixing(runs)
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
                cells.append(NO_VALUE if b not in scores else
                             f"{scores[b]['score']:.4f}" + (f" ({d:+.4f})" if d is not None else ""))
            cells.append("" if after == "0" else NO_VALUE if delta.get("mean") is None else f"{delta['mean']:+.4f}")
            rows.append(cells)
        parts += [markdown_table(["after"] + benchmarks + ["ΔG (mean)"], rows), ""]
    if not mixing:
        parts += [f"![General ability along the sequence]({GENERAL_PLOT})", ""]
    return parts
