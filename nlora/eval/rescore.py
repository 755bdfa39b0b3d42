"""`nlora rescore RUN_DIR`: every score of a run computed again from its predictions files alone, with the run's
metrics or others, in another scoring mode or with another BWT denominator; metrics.json is rewritten at once.

Each matrix entry R[k][j] is scored from predictions/<k>-<task k>/<task j>.jsonl and each base-model score from
predictions/base/<task j>.jsonl with the same code evaluation runs (nlora.eval.evaluate.score_records), so rescoring
a run as it was scored reproduces its metrics.json. metrics.json then records the metrics, scoring mode and BWT
denominator it holds; a run rescored otherwise than its config.yaml says resumes only once rescored back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from ..errors import NloraError
from ..io import write_json_atomic
from ..rundir import RunPaths, read_metrics
from ..runlock import RunLock
from ..tasks.scoring import SCORING_MODES, parse_metric, require_libraries
from .continual import BWT_DENOMINATORS, summarize_run
from .evaluate import Scoring, score_records

DEFAULT_SEPARATOR = "\nAnswer: "  # RunConfig's answer_separator, for a config.yaml written before it existed


def read_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise NloraError(f"{path}: predictions file not found; the matrix entry it holds cannot be rescored")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise NloraError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prediction",
                                                                                              "target", "input")):
            raise NloraError(f"{path}:{n}: not a prediction record (input, target and prediction strings)")
        records.append(record)
    return records


def _metric_overrides(items: list[str] | None, tasks: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        task, eq, spec = (s.strip() for s in item.partition("="))
        if not eq or task not in tasks:
            raise NloraError(f"option --metric: {item!r} is not TASK=METRIC for a task of the run "
                             f"({', '.join(tasks)})")
        out[task] = str(parse_metric(spec, where=f"option --metric of task {task!r}"))
    return out


def rescore_run(run_dir: str | Path, scoring_mode: str | None = None, bwt_denominator: str | None = None,
                metrics: list[str] | None = None) -> dict:
    """Rescore the run in `run_dir` (see the module doc); `metrics` are TASK=METRIC replacements. Returns the new
    metrics.json content."""
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise NloraError(f"{paths.root} is not a run directory (no config.yaml)")
    current = read_metrics(paths)
    if current is None:
        raise NloraError(f"{paths.root}: no metrics.json yet; nothing to rescore")
    config = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    tasks = current["tasks"]
    columns = {**{t: "exact_match" for t in tasks}, **(current.get("metrics") or {}),
               **_metric_overrides(metrics, tasks)}
    mode = scoring_mode or current.get("scoring_mode", "standard")
    denominator = bwt_denominator or current.get("bwt_denominator", "t-1")
    if mode not in SCORING_MODES:
        raise NloraError(f"option --scoring-mode: {mode!r} is not one of {', '.join(SCORING_MODES)}")
    if denominator not in BWT_DENOMINATORS:
        raise NloraError(f"option --bwt-denominator: {denominator!r} is not one of {', '.join(BWT_DENOMINATORS)}")
    for metric in columns.values():
        require_libraries(metric, mode)
    separator = config.get("answer_separator", DEFAULT_SEPARATOR) if config.get("prompt_style", "nlora") == "nlora" \
        else ""
    scoring = {t: Scoring(columns[t], mode, separator) for t in tasks}

    def rescored(path: Path, task: str) -> float:
        return round(score_records(read_predictions(path), scoring[task]), 4)

    with RunLock() as lock:
        lock.acquire(paths.root)  # not while a run writes it
        matrix = [[None if x is None else rescored(paths.predictions(k, tasks[k], tasks[j]), tasks[j])
                   for j, x in enumerate(row)] for k, row in enumerate(current["accuracy_matrix"])]
        baseline = current.get("baseline_accuracy")
        if baseline:
            baseline = [_rescored_base(paths, tasks[j], x, rescored) for j, x in enumerate(baseline)]
        summary = summarize_run(matrix, current.get("phases_completed") or [], baseline,
                                current.get("eval_plan", "full") != "full", denominator)
        out = {**current, "metrics": columns, "scoring_mode": mode, "bwt_denominator": denominator,
               "accuracy_matrix": matrix, "baseline_accuracy": baseline,
               **{k: summary.get(k) for k in ("average_accuracy", "bwt", "fwt", "forgetting")}}
        write_json_atomic(paths.metrics, out)
    return out


def _rescored_base(paths: RunPaths, task: str, value, rescored) -> float | None:
    path = paths.base_predictions(task)
    if value is None:
        return None
    if not path.is_file():  # written by a release that kept no base predictions
        print(f"nlora: warning: {path} does not exist (a run of an older release): the base model's score on "
              f"{task} is kept as it was", file=sys.stderr)
        return value
    return rescored(path, task)
