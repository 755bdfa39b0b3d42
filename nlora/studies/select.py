"""Choosing tuned options on dev: each grid point's score is the mean of `select.metric` over its dev cells'
seeds; the best by `select.mode` wins, ties going to the higher BWT, then to the earlier grid point. A method's
choice is made once all its dev cells of that order have ended (done or failed), and written with every score to
STUDY_DIR/selection.json, which the report shows."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..io import write_json_atomic
from ..rundir import RunPaths, read_metrics
from .cells import Cell, cell_dir, choice_key
from .ledger import live_state
from .search import search_done
from .spec import Study

SELECTION_FILE = "selection.json"


def choose(study: Study, study_dir: Path, ledger: dict[str, dict], dev: list[Cell]) -> tuple[dict, list[dict]]:
    """({(method, order or None): chosen values}, one record per (method, order) with its grid's scores), from the
    `dev` cells (those of a search: the points asked so far)."""
    groups: dict[tuple[str, int | None], list[Cell]] = {}
    for cell in dev:
        groups.setdefault(choice_key(study, cell.method, cell.order), []).append(cell)
    chosen, records = {}, []
    for (method, order), cells in groups.items():
        if any(live_state(ledger.get(c.id)) not in ("done", "failed") for c in cells):
            continue  # not every dev cell has ended: no choice yet
        if study.select.search == "optuna" and not search_done(study, study_dir, (method, order)):
            continue
        tuned = study.tuned_options(method)
        scores = _scores(study, study_dir, cells, tuned)
        usable = [s for s in scores if s["score"] is not None]
        record = {"method": method, "order": order, "metric": study.select.metric, "mode": study.select.mode,
                  "tuned": tuned, "scores": scores, "chosen": None}
        if usable:
            best = best_point(usable, study.select.mode)
            record["chosen"] = chosen[(method, order)] = best["values"]
        records.append(record)
    return chosen, records


def _scores(study: Study, study_dir: Path, cells: list[Cell], tuned: list[str]) -> list[dict[str, Any]]:
    points: dict[tuple, list[dict]] = {}
    for cell in cells:
        key = tuple((k, v) for k, v in cell.options if k in tuned)
        metrics = read_metrics(RunPaths(cell_dir(study_dir, cell)))
        points.setdefault(key, [])
        if metrics and metrics.get("complete"):
            points[key].append(metrics)
    out = []
    for key, runs in points.items():
        values = [m[study.select.metric] for m in runs if m.get(study.select.metric) is not None]
        bwts = [m["bwt"] for m in runs if m.get("bwt") is not None]
        out.append({"values": dict(key), "score": statistics.fmean(values) if values else None,
                    "bwt": statistics.fmean(bwts) if bwts else None, "seeds": len(values)})
    return out


def point_score(study: Study, study_dir: Path, ledger: dict[str, dict], dev: list[Cell],
                key: tuple[str, int | None], point: dict[str, Any]) -> float | None:
    """The mean dev metric of one point's cells: None while one has not ended, NaN where none finished."""
    mine = [c for c in dev if choice_key(study, c.method, c.order) == key
            and all(dict(c.options).get(k) == v for k, v in point.items())]
    if not mine or any(live_state(ledger.get(c.id)) not in ("done", "failed") for c in mine):
        return None
    score = _scores(study, study_dir, mine, list(point))[0]["score"]
    return float("nan") if score is None else score


def best_point(scores: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The best score by `mode`; ties to the higher BWT, then to the first listed."""
    sign = 1 if mode == "max" else -1
    best = scores[0]
    for s in scores[1:]:
        if _key(s, sign) > _key(best, sign):
            best = s
    return best


def _key(s: dict[str, Any], sign: int) -> tuple[float, float]:
    return sign * s["score"], s["bwt"] if s["bwt"] is not None else float("-inf")


def write_selection(study_dir: Path, records: list[dict]) -> None:
    write_json_atomic(Path(study_dir) / SELECTION_FILE, {"choices": records})
