"""A study's report (STUDY_DIR/report/report.md and its plots): the papers' table (AP per order, the means over
the Standard and Long orders, BWT, FWT, forgetting, mean ± sd over seeds, the published number beside a row whose
protocol matches), the paired differences against the baseline, the values chosen on dev with the scores they were
chosen on, each task's final score per order, and the cells that did not finish."""

from __future__ import annotations

from pathlib import Path

from ..analysis.report_markdown import markdown_table
from ..io import staged_dir, write_json_atomic, write_text_atomic
from .compare import mean_sd, paired
from .execute import saved_study
from .plots import PLOTS, write_plots
from .published import published_for
from .results import SUMMARY_METRICS, StudyResults, collect
from .select import SELECTION_FILE

REPORT_DIR = "report"
NO_VALUE = "–"


def write_study_report(study_dir: str | Path) -> Path:
    """Write STUDY_DIR/report (replaced as a whole); returns the path of report.md."""
    study_dir = Path(study_dir)
    results = collect(saved_study(study_dir), study_dir)
    final = study_dir / REPORT_DIR
    with staged_dir(final) as tmp:
        names = write_plots(results, tmp)
        write_text_atomic(tmp / "report.md", study_markdown(results, names))
        write_json_atomic(tmp / "table.json", table_json(results))
    return final / "report.md"


def fmt(mean_and_sd: tuple[float, float | None] | None) -> str:
    if mean_and_sd is None:
        return NO_VALUE
    mean, sd = mean_and_sd
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def summarize(values: list[float]) -> tuple[float, float | None] | None:
    return mean_sd(values) if values else None


def study_markdown(results: StudyResults, plots: list[str]) -> str:
    study = results.study
    seeds = ", ".join(map(str, study.seeds))
    parts = [f"# Study {study.name}", "",
             f"{len(results.rows)} rows, orders {', '.join(str(o) for o in study.orders if o is not None) or '–'}, "
             f"seeds {seeds}; every value is the mean ± sample sd over the seeds of the metric's mean over the "
             "orders named (a seed counts where every one of those orders finished).", "",
             "## The table", "", main_table(results), ""]
    parts += published_notes(results)
    parts += ["## Against the baseline", "", *paired_section(results), ""]
    parts += ["## Chosen on dev", "", *selection_section(results), ""]
    parts += ["## Each task's final score", "", *task_section(results), ""]
    parts += [f"![{PLOTS[name]}]({name})\n" for name in plots]
    parts += unfinished_section(results)
    return "\n".join(parts).rstrip() + "\n"


def main_table(results: StudyResults) -> str:
    study = results.study
    orders = [o for o in study.orders]
    groups = results.order_groups()
    published = published_for(study.base.get("benchmark"), str(study.base.get("model", "")))
    columns = [published_column for published_column in sorted({p.column for ps in published.values() for p in ps})]
    header = ["row", *(f"AP order {o}" if o is not None else "AP" for o in orders), *(g for g, _ in groups),
              *(name for name, _ in SUMMARY_METRICS[1:]), *(f"published {c}" for c in columns), "seeds"]
    rows = []
    for row in results.rows:
        cells = [row.label]
        cells += [fmt(summarize(row.per_seed("average_accuracy", (o,), study.seeds))) for o in orders]
        cells += [fmt(summarize(row.per_seed("average_accuracy", g, study.seeds))) for _, g in groups]
        cells += [fmt(summarize(row.per_seed(key, tuple(orders), study.seeds))) for _, key in SUMMARY_METRICS[1:]]
        mine = {p.column: p for p in published.get(row.method, [])}
        cells += [f"{mine[c].value:.1f} ({mine[c].sure})" if c in mine else NO_VALUE for c in columns]
        cells.append(str(len(row.per_seed("average_accuracy", tuple(orders), study.seeds))))
        rows.append(cells)
    return markdown_table(header, rows)


def published_notes(results: StudyResults) -> list[str]:
    study = results.study
    published = published_for(study.base.get("benchmark"), str(study.base.get("model", "")))
    if not published:
        return []
    papers = sorted({p.paper for ps in published.values() for p in ps})
    return [f"Published: {'; '.join(papers)}. How sure each value is: fig. (read off a figure), 2nd (quoted from "
            "a secondary source), unverified (not checked against the paper). A published number sits beside "
            "the study's own only as a reference: runs of the same protocol differ between papers by several "
            "points.", ""]


def paired_section(results: StudyResults) -> list[str]:
    base = results.baseline
    study = results.study
    if base is None:
        return ["No baseline (the study file's `baseline`)." if study.baseline is None else
                f"The baseline {study.baseline} has no finished cell yet."]
    rows = []
    for row in results.rows:
        if row is base:
            continue
        for name, key in SUMMARY_METRICS[:2]:
            pairs = [(row.value(key, o, s), base.value(key, o, s)) for o in study.orders for s in study.seeds]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if not pairs:
                rows.append([row.label, name, "0", NO_VALUE, NO_VALUE, NO_VALUE, "no pair finished"])
                continue
            p = paired([a for a, _ in pairs], [b for _, b in pairs])
            interval = f"[{p.interval[0]:+.2f}, {p.interval[1]:+.2f}]" if p.interval else NO_VALUE
            rows.append([row.label, name, str(p.n), p.signs, f"{p.mean:+.2f}", interval,
                         p.verdict(row.label, base.label)])
    return [f"Each pair is one order and seed: the row minus {base.label}. The interval is the 95% Student t "
            "interval of the mean difference; where it contains 0 the difference is not separated from the "
            "seeds' spread.", "",
            markdown_table(["row", "metric", "pairs", "signs", "mean difference", "95% interval", "verdict"], rows)]


def selection_section(results: StudyResults) -> list[str]:
    import json

    path = results.study_dir / SELECTION_FILE
    choices = json.loads(path.read_text())["choices"] if path.is_file() else []
    if not choices:
        return ["No option was tuned (each method's options have one value)."]
    select = results.study.select
    rows = []
    for record in choices:
        for score in record["scores"]:
            values = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in score["values"].items())
            chosen = "chosen" if record["chosen"] == score["values"] else ""
            rows.append([record["method"], "all" if record["order"] is None else str(record["order"]), values,
                         NO_VALUE if score["score"] is None else f"{score['score']:.2f}",
                         NO_VALUE if score["bwt"] is None else f"{score['bwt']:.2f}", str(score["seeds"]), chosen])
    return [f"Each grid point trained on a dev view of the data: {select.dev_samples or 'a fifth'} examples per "
            f"task carved from a training pool of {select.train_samples or 'the base run’s training sample'} (the "
            f"test split is never read), seeds {', '.join(map(str, select.seeds))}; the {select.mode} dev "
            f"{select.metric} wins, ties to the higher dev BWT, then to the earlier grid point.", "",
            markdown_table(["method", "order", "values", f"dev {select.metric}", "dev BWT", "seeds", ""], rows)]


def task_section(results: StudyResults) -> list[str]:
    out = []
    for order in results.study.orders:
        tasks, metrics = None, None
        rows = []
        for row in results.rows:
            runs = [m for (o, _), m in row.runs.items() if o == order]
            if not runs:
                continue
            tasks, metrics = runs[0]["tasks"], runs[0].get("metrics", {})
            finals = [[m["accuracy_matrix"][-1][j] for m in runs] for j in range(len(tasks))]
            rows.append([row.label, *(fmt(summarize([x for x in col if x is not None])) for col in finals)])
        if not rows:
            continue
        heading = f"Order {order}" if order is not None else "The sequence"
        header = ["row", *(f"{t} ({metrics.get(t, 'exact_match')})" for t in tasks)]
        out += [f"{heading}: each task's score after the last task (its own metric), mean ± sd over seeds.", "",
                markdown_table(header, rows), ""]
    return out or ["No test cell has finished yet."]


def unfinished_section(results: StudyResults) -> list[str]:
    left = {cid: state for cid, state in results.states.items() if state != "done"}
    if not left:
        return []
    lines = ["## Cells not finished", ""]
    for cell_id, state in sorted(left.items()):
        error = results.errors.get(cell_id)
        lines.append(f"- {cell_id}: {state}" + (f" ({error})" if error and state == "failed" else ""))
    return lines + [""]


def table_json(results: StudyResults) -> dict:
    """The numbers behind the main table: each row's metrics per order and seed."""
    return {"study": results.study.name,
            "rows": [{"row": r.label, "method": r.method,
                      "runs": [{"order": o, "seed": s, **{k: m.get(k) for _, k in SUMMARY_METRICS}}
                               for (o, s), m in sorted(r.runs.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1]))]}
                     for r in results.rows]}
