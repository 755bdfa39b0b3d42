"""`nlora status RUN_DIR`: where a run is, read from its directory alone (config.yaml, metrics.json, log.jsonl,
checkpoint/progress.json), so it works on a run in progress, stopped or complete, on any machine that sees the
folder.

The estimate of the remaining time is the training steps left (those of the phases not trained yet estimated
from their training-set sizes) times the mean seconds per step logged so far, plus the matrix entries left
times the mean seconds per evaluated entry."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import NloraError
from ..rundir import CHECKPOINT_DIR, LOG_FILE, read_json_object, read_log
from .summary import format_matrix, metric_lines, what_is_scored

LAST_STEPS = 5  # logged steps shown


def _phases(config: dict, n_tasks: int) -> list[int]:
    """The phases before metrics.json records them (a run writes it right after config.yaml): one per task. The
    method is not resolved here, so `nlora status` imports no torch."""
    return list(range(n_tasks))


def _phase_steps(n_examples: int, config: dict) -> int:
    batches = math.ceil(n_examples / max(int(config.get("batch_size", 1)), 1))
    return int(config.get("epochs", 1)) * math.ceil(batches / max(int(config.get("gradient_accumulation_steps", 1)), 1))


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """The state of a run as a dict (see format_status for what each part means)."""
    root = Path(run_dir)
    if not root.exists():
        raise NloraError(f"run directory {root} does not exist")
    config_path = root / "config.yaml"
    if not config_path.is_file():
        raise NloraError(f"{root} is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise NloraError(f"{config_path} is corrupt ({e})") from None
    metrics = read_json_object(root / "metrics.json") or {}
    log = read_log(root / LOG_FILE)
    checkpoint = read_json_object(root / CHECKPOINT_DIR / "progress.json")
    tasks = metrics.get("tasks") or list(config.get("tasks") or [])
    n = len(tasks)
    phases = metrics.get("phases") or _phases(config, n)
    done = list(metrics.get("phases_completed") or [])
    matrix = metrics.get("accuracy_matrix") or [[None] * n for _ in range(n)]
    trains = [line for line in log if line.get("event") == "train"]
    ended = {line["phase"]: line for line in log if line.get("event") == "train_end"}
    evals = [line for line in log if line.get("event") == "eval"]
    # the matrix as far as log.jsonl got, beyond the last metrics.json (a row being evaluated)
    for line in evals:
        k, j = line.get("phase"), tasks.index(line["task"]) if line.get("task") in tasks else None
        if isinstance(k, int) and 0 <= k < n and j is not None and matrix[k][j] is None:
            matrix[k][j] = line.get("accuracy")

    complete = bool(metrics.get("complete"))
    current = next((k for k in phases if k not in done), None)
    position: dict[str, Any] = {"phase": current}
    if current is not None:
        trained = current in ended or (current < n and (root / "adapters" / f"{current}-{tasks[current]}").is_dir())
        mine = [line for line in trains if line.get("phase") == current]
        step = mine[-1]["step"] if mine else 0
        if checkpoint and checkpoint.get("phase") == current:
            step = max(step, int(checkpoint.get("step", 0)))
        begun = [line for line in log if line.get("event") == "train_begin" and line.get("phase") == current]
        steps = mine[-1].get("steps") if mine else begun[-1].get("steps") if begun else None
        n_train = metrics.get("n_train")
        if steps is None and n_train:
            steps = _phase_steps(n_train[current], config)
        columns = n if config.get("eval_future") else current + 1
        evaluated = sum(1 for line in evals if line.get("phase") == current)
        position.update(task=tasks[current] if current < n else None, index=phases.index(current) + 1,
                        of=len(phases), stage="evaluating" if trained else "training",
                        step=ended[current]["steps"] if current in ended else step, steps=steps,
                        evaluated=evaluated, columns=columns)

    elapsed = max((line.get("elapsed") or 0.0 for line in log), default=None)
    last_time = max((line.get("time") or 0.0 for line in log), default=None)
    return {
        "run_dir": str(root.resolve()), "method": metrics.get("method", config.get("method")),
        "model": metrics.get("model", config.get("model")), "tasks": tasks, "accuracy_matrix": matrix,
        "metrics": metrics.get("metrics") or {}, "scoring_mode": metrics.get("scoring_mode", "standard"),
        "complete": complete, "phases": phases, "phases_completed": done, "position": position,
        "elapsed": elapsed, "last_update": last_time,
        "remaining": None if complete else _remaining(config, metrics, phases, done, position, trains, ended,
                                                      evals, n),
        "last_steps": trains[-LAST_STEPS:],
        "summary": {k: metrics.get(k) for k in ("average_accuracy", "bwt", "fwt", "forgetting")},
        "has_log": bool(log),
        # a session that has logged nothing since it began (before its first logging step): it may be running
        "quiet_since_start": not complete and bool(log) and log[-1].get("event") in ("start", "train_begin"),
    }


def _remaining(config, metrics, phases, done, position, trains, ended, evals, n) -> dict[str, Any] | None:
    """Estimated seconds left for training and for evaluation (None where nothing has been timed yet)."""
    current = position.get("phase")
    if current is None:
        return None
    per_step = [line["s_per_step"] for line in trains if isinstance(line.get("s_per_step"), (int, float))]
    seconds_per_step = sum(per_step) / len(per_step) if per_step else None
    n_train = metrics.get("n_train")
    steps_left = 0
    known = True
    for k in phases[phases.index(current):]:
        if k in ended or k in done:
            continue
        if k == current and position.get("steps") is not None:
            steps_left += position["steps"] - position["step"]
        elif n_train:
            steps_left += _phase_steps(n_train[k], config)
        elif position.get("steps") is not None:  # before metrics.json: tasks assumed the size of this one
            steps_left += position["steps"]
        else:
            known = False
    evaluated = [line["seconds"] for line in evals if isinstance(line.get("seconds"), (int, float))
                 and line.get("phase", -1) >= 0]
    per_entry = sum(evaluated) / len(evaluated) if evaluated else None
    entries_left = sum(n if config.get("eval_future") else k + 1
                       for k in phases[phases.index(current):] if k not in done) - position.get("evaluated", 0)
    train = steps_left * seconds_per_step if seconds_per_step is not None and known else None
    evaluation = entries_left * per_entry if per_entry is not None else None
    return {"train_seconds": train, "eval_seconds": evaluation, "steps_left": steps_left if known else None,
            "entries_left": entries_left}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _num(x, fmt: str = ".4g") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def _elapsed(status: dict[str, Any], now: float) -> str:
    """The run's time at its last log line; for a session that has logged nothing since it began, also the time
    up to now, which is the elapsed time if it is still running (steps may have run without a log line)."""
    logged = _duration(status["elapsed"])
    if not status.get("quiet_since_start") or status["last_update"] is None:
        return logged
    return f"{_duration(status['elapsed'] + max(now - status['last_update'], 0))} if it is still running " \
           f"({logged} at its last log line)"


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    pos = status["position"]
    lines = [f"run: {status['run_dir']}", f"{status['method']} on {status['model']}, {len(status['tasks'])} tasks"]
    if status["complete"]:
        lines.append("state: complete")
    else:
        age = "" if status["last_update"] is None else \
            f" (last log line {_duration(max(now - status['last_update'], 0))} ago)"
        lines.append(f"state: in progress or stopped{age}")
        if pos.get("phase") is not None:
            where = f"task {pos['index']} of {pos['of']} ({pos['task']}): "
            if pos["stage"] == "training":
                where += f"training, step {pos['step']} of {pos['steps'] if pos['steps'] is not None else '?'}"
            else:
                where += f"trained ({pos['step']} steps), evaluated {pos['evaluated']} of {pos['columns']} tasks"
            lines.append(where)
    lines.append(f"elapsed: {_elapsed(status, now)}" if status["has_log"] else
                 "elapsed: unknown (no log.jsonl: a run from before log files)")
    remaining = status["remaining"]
    if remaining is not None:
        train, evaluation = remaining["train_seconds"], remaining["eval_seconds"]
        if train is None:
            text = "unknown (no step timed yet)"
        elif evaluation is None and remaining["entries_left"]:
            text = f"{_duration(train)} of training (+ evaluation, not timed yet)"
        else:
            text = f"{_duration(train + (evaluation or 0.0))} ({_duration(train)} training, " \
                   f"{_duration(evaluation or 0.0)} evaluation)"
        lines.append(f"estimated remaining: {text}")
    lines += ["", f"{what_is_scored(status)} after each task:", format_matrix(status), *metric_lines(status)]
    summary = status["summary"]
    if status["complete"]:
        lines.append("AP " + _num(summary["average_accuracy"], ".2f") + "   BWT " + _num(summary["bwt"], ".2f")
                     + "   FWT " + _num(summary["fwt"], ".2f") + "   forgetting " + _num(summary["forgetting"], ".2f"))
    if status["last_steps"]:
        lines += ["", "last logged steps:",
                  f"{'task':<14} {'step':>9} {'loss':>9} {'regulariser':>11} {'lr':>9} {'grad norm':>9} {'s/step':>7}"]
        for s in status["last_steps"]:
            lines.append(f"{str(s.get('task'))[:14]:<14} {str(s.get('step')) + '/' + str(s.get('steps')):>9} "
                         f"{_num(s.get('loss')):>9} {_num(s.get('regularizer')):>11} {_num(s.get('lr')):>9} "
                         f"{_num(s.get('grad_norm')):>9} {_num(s.get('s_per_step'), '.3g'):>7}")
            terms = s.get("regularizer_terms")
            if terms:
                lines.append(" " * 15 + "regulariser terms: " + ", ".join(f"{k} {_num(v)}" for k, v in terms.items()))
    return "\n".join(lines)
