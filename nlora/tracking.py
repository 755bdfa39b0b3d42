"""Experiment tracking: RUN_DIR/log.jsonl, always written, and the trackers of `--report-to` through accelerate's
tracker API (TensorBoard, Weights & Biases, MLflow).

log.jsonl holds one JSON object per line, appended and flushed by the main process as the run goes, so a run that
crashes keeps what it logged. Each line has an `event`:
    start        a session of the run began (a fresh run, or a resumption)
    train_begin  a phase began training: task, phase, steps (its optimizer steps in all), global_step; written
                 once per phase (a resumption that continues the phase writes none)
    train        a logging step: task, phase, epoch, step (of `steps` in the phase), global_step, loss (task loss),
                 regularizer (and regularizer_terms when the method names them), lr, grad_norm (before clipping),
                 tokens_per_s, examples_per_s, s_per_step, peak_memory_mb (where there is an accelerator);
                 loss, regulariser and throughput are means over the steps since the previous logging step
    train_end    a phase finished training: its steps, mean loss and regulariser, seconds
    eval         one entry of the accuracy matrix: the score on `task` after training phase `phase` (-1: the
                 base model) under `accuracy`, its `metric` (nlora.tasks.scoring; exact_match for classification),
                 examples, seconds
    summary      AP, BWT, FWT and forgetting of the complete run
Every line also has `elapsed` (seconds of the run so far, summed over its sessions) and `time` (Unix time).

A resumed run redoes the work after its last checkpoint. When a phase (or a matrix row) starts, the lines it is
about to write again are dropped from log.jsonl, so every step is logged once and the steps stay contiguous. The
trackers already received those lines before the run stopped: what is redone is not sent to them a second time.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import NloraError
from .io import write_jsonl_atomic
from .rundir import LOG_FILE, TENSORBOARD_DIR, read_log  # noqa: F401  (imported from here by readers)

PROJECT = "nlora"  # the project name given to the trackers (the W&B project, the MLflow experiment)

# --report-to names: accelerate's tracker name, the package to install, and accelerate's availability check
TRACKERS = {
    "tensorboard": ("tensorboard", "is_tensorboard_available"),
    "wandb": ("wandb", "is_wandb_available"),
    "mlflow": ("mlflow", "is_mlflow_available"),
}
REPORT_TO_CHOICES = ("none", "all", *TRACKERS)
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------- trackers

def metric_key(metric: str) -> str:
    """A tracker key for a metric spec: its name (`rouge_l` for `rouge_l(tokenizer=char)`), `accuracy` for exact
    match."""
    name = metric.split("(", 1)[0]
    return "accuracy" if name == "exact_match" else name


def parse_report_to(value: str) -> list[str]:
    """The trackers of a --report-to value: none, all, or tracker names separated by commas."""
    names = [v.strip().lower() for v in str(value).split(",") if v.strip()]
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown or not names:
        raise NloraError(f"option 'report_to': {value!r} is not one of {', '.join(REPORT_TO_CHOICES)} "
                         "(or tracker names separated by commas)")
    if len(names) > 1 and ({"none", "all"} & set(names)):
        raise NloraError(f"option 'report_to': {value!r}: 'none' and 'all' stand alone")
    return [] if names == ["none"] else names


def tracker_available(name: str) -> bool:
    import accelerate.utils

    return getattr(accelerate.utils, TRACKERS[name][1])()


def check_trackers(value: str) -> list[str]:
    """The trackers asked for, each installed; else one error naming the packages to install."""
    names = parse_report_to(value)
    missing = [n for n in names if n in TRACKERS and not tracker_available(n)]
    if missing:
        packages = " ".join(TRACKERS[n][0] for n in missing)
        extras = ",".join(missing)
        raise NloraError(f"option 'report_to': {', '.join(missing)} asked for but not installed; install it with "
                         f"`pip install {packages}` (or `pip install nlora[{extras}]`)")
    return names


def accelerator_tracking(config) -> dict[str, Any]:
    """The Accelerator's tracking arguments for a run: the trackers asked for, and the run directory as the
    project directory (TensorBoard writes under RUN_DIR/tensorboard)."""
    from accelerate.utils import ProjectConfiguration

    names = parse_report_to(config.report_to)
    if not names:
        return {}
    root = Path(config.output_dir)
    return {"log_with": names, "project_config": ProjectConfiguration(project_dir=str(root),
                                                                      logging_dir=str(root / TENSORBOARD_DIR))}


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved configuration as tracker hyperparameters: scalars as they are, lists joined by commas
    (TensorBoard's hparams take only bool, int, float, str and None)."""
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in config.items()}


# ------------------------------------------------------------------------------------- measuring a step

def batch_tokens(batch: Mapping[str, Any]) -> int:
    """Non-padding tokens a model reads for a collated batch: every attention mask, plus the target sequence
    where it is separate from the input (seq2seq labels; a decoder's labels lie inside its input_ids)."""
    tokens = sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask") and torch.is_tensor(v))
    labels, inputs = batch.get("labels"), batch.get("input_ids")
    if torch.is_tensor(labels) and torch.is_tensor(inputs) and labels.shape != inputs.shape:
        tokens += int((labels != IGNORE_INDEX).sum())
    return tokens


class StepWindow:
    """Sums over the micro-batches of the optimizer steps since the last logging step; `flush` gives the means
    per step and the throughput, and starts a new window."""

    def __init__(self) -> None:
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.start, self.steps, self.loss, self.regularizer = now, 0, 0.0, 0.0
        self.tokens, self.examples = 0, 0
        self.terms: dict[str, float] = {}

    def add(self, loss: float, regularizer: float, tokens: int, examples: int,
            terms: Mapping[str, float] | None = None) -> None:
        """One micro-batch: its share of the step's task loss and regulariser (they sum to the step's values),
        of each named regulariser term, and the tokens and examples it trained on."""
        self.loss += loss
        self.regularizer += regularizer
        self.tokens += tokens
        self.examples += examples
        for name, value in (terms or {}).items():
            self.terms[name] = self.terms.get(name, 0.0) + float(value)

    def end_step(self) -> None:
        self.steps += 1

    def state(self) -> dict[str, Any]:
        """The window so far, for a checkpoint: a run resumed from it logs the same means at its next logging step
        as the run that was not interrupted (the seconds it ran, not its clock)."""
        return {"seconds": time.perf_counter() - self.start, "steps": self.steps, "loss": self.loss,
                "regularizer": self.regularizer, "tokens": self.tokens, "examples": self.examples,
                "terms": dict(self.terms)}

    @classmethod
    def restored(cls, state: Mapping[str, Any] | None, tokens: bool = True) -> "StepWindow":
        """A window that continues `state` (None: a fresh one). `tokens` False: start the token count at 0 (a
        process other than the one whose count, summed over processes, the state holds)."""
        window = cls()
        if state:
            window.start -= float(state["seconds"])
            window.steps, window.loss, window.regularizer = int(state["steps"]), state["loss"], state["regularizer"]
            window.tokens, window.examples = int(state["tokens"]) if tokens else 0, int(state["examples"])
            window.terms = dict(state.get("terms") or {})
        return window

    def flush(self, tokens: int | None = None) -> dict[str, Any]:
        """Means per step over the window; `tokens` replaces the window's count (the sum over processes)."""
        now = time.perf_counter()
        steps, seconds = max(self.steps, 1), max(now - self.start, 1e-9)
        out = {"loss": self.loss / steps, "regularizer": self.regularizer / steps,
               "tokens_per_s": (self.tokens if tokens is None else tokens) / seconds,
               "examples_per_s": self.examples / seconds, "s_per_step": seconds / steps}
        if self.terms:
            out["regularizer_terms"] = {k: v / steps for k, v in self.terms.items()}
        self._reset(now)
        return out


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory allocated on an accelerator (CUDA, XPU, ...) since the last reset; None on the CPU."""
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    peak = getattr(module, "max_memory_allocated", None)
    return None if peak is None else peak(device) / 2**20


def reset_peak_memory(device: torch.device) -> None:
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    reset = getattr(module, "reset_peak_memory_stats", None)
    if reset is not None:
        reset(device)


# ------------------------------------------------------------------------------------- log.jsonl

def _identity(line: dict) -> tuple:
    """What a line is about: a redone step or matrix entry has the identity of the line it replaces."""
    event = line.get("event")
    if event == "train":
        return event, line.get("phase"), line.get("step")
    if event in ("train_end", "eval"):
        return event, line.get("phase"), line.get("task") if event == "eval" else None
    if event == "summary":
        return (event,)
    return event, line.get("time")


def _clean(value):
    """JSON-safe numbers: non-finite floats become None (JSON has no NaN), floats keep 6 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunLogger:
    """Writes log.jsonl and forwards the same values to accelerate's trackers. On processes other than the main
    one every method does nothing (what needs all processes, such as summing token counts, is done by the
    caller)."""

    def __init__(self, run_dir: str | os.PathLike, accelerator, tasks: list[str]):
        self.path = Path(run_dir) / LOG_FILE
        self.accelerator = accelerator
        self.tasks = list(tasks)
        self.main = accelerator.is_main_process
        self.lines: list[dict] = []
        self.sent: set[tuple] = set()  # identities the trackers have received, in this session or before
        self.elapsed_before = 0.0
        self.session_start = time.perf_counter()
        self.offsets: dict[int, int] = {}  # phase -> global step at its start
        self._file = None
        self._trackers = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ life cycle
    def start(self, hparams: Mapping[str, Any] | None = None, resumed: bool = False) -> "RunLogger":
        """Open log.jsonl (appending to what a stopped run logged) and start the trackers with the resolved
        configuration as hyperparameters."""
        if self.main:
            existing = read_log(self.path) if resumed else []
            raw = self.path.read_text(encoding="utf-8") if resumed and self.path.is_file() else ""
            if raw and (not raw.endswith("\n") or len(existing) != len(raw.splitlines())):
                write_jsonl_atomic(self.path, existing)  # drop a line cut by a crash before appending
            self.lines = existing
            self.sent = {_identity(line) for line in existing}
            self.elapsed_before = max((line.get("elapsed") or 0.0 for line in existing), default=0.0)
            self._file = open(self.path, "a" if resumed else "w", encoding="utf-8")
        if self.accelerator.log_with:
            config = hyperparameters(hparams or {})
            name = Path(self.path.parent).resolve().name
            self.accelerator.init_trackers(PROJECT, config=config,
                                           init_kwargs={"wandb": {"name": name}, "mlflow": {"run_name": name}})
            self._trackers = True
        self._write({"event": "start", "resumed": resumed, "tasks": self.tasks}, send=False)
        return self

    def close(self) -> None:
        """Close log.jsonl and finish the trackers (accelerate's end_training, without its tearing down of the
        process group, which the caller may still need)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._trackers:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
            self._trackers = False

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def _write(self, line: dict, send: bool = True, step: int | None = None,
               tracked: Mapping[str, Any] | None = None) -> None:
        if not self.main:
            return
        line = {**_clean(line), "elapsed": round(self._elapsed(), 3), "time": round(time.time(), 3)}
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()
        self.lines.append(line)
        identity = _identity(line)
        if send and self._trackers and identity not in self.sent and tracked:
            self.accelerator.log({k: v for k, v in _clean(dict(tracked)).items() if v is not None}, step=step)
        self.sent.add(identity)

    def _drop(self, redone: Callable[[dict], bool]) -> None:
        """Remove the lines that the work starting now writes again (a resumed run redoing it)."""
        if not self.main or not any(redone(line) for line in self.lines):
            return
        self.lines = [line for line in self.lines if not redone(line)]
        self._file.close()
        write_jsonl_atomic(self.path, self.lines)
        self._file = open(self.path, "a", encoding="utf-8")

    def warn_once(self, key: str, message: str) -> None:
        """One warning line on stderr, from the main process, the first time `key` is warned of in this session."""
        if self.main and key not in self._warned:
            self._warned.add(key)
            print(f"nlora: warning: {message}", file=sys.stderr, flush=True)

    def global_step(self, phase: int, step: int) -> int:
        return self.offsets.get(phase, 0) + step

    # ------------------------------------------------------------------ events
    def train_begin(self, phase: int, step: int, steps: int) -> None:
        """Phase `phase` trains from its step `step` (0, or the checkpoint's) to `steps`."""
        self._drop(lambda line: line.get("phase") == phase and (
            line.get("event") == "train_end" or (line.get("event") == "train" and line.get("step", 0) > step)))
        ends = {line["phase"]: line.get("steps", 0) for line in self.lines
                if line.get("event") == "train_end" and line.get("phase", phase) < phase}
        self.offsets[phase] = sum(ends.values())
        if not any(line.get("event") == "train_begin" and line.get("phase") == phase for line in self.lines):
            # the step total, known before the first logging step (`nlora status` reads it)
            self._write({"event": "train_begin", "task": self.tasks[phase], "phase": phase, "steps": steps,
                         "global_step": self.offsets[phase]}, send=False)

    def log_train(self, phase: int, epoch: float, step: int, steps: int, values: Mapping[str, Any]) -> None:
        """A logging step: `values` holds loss, regularizer (and regularizer_terms), lr, grad_norm, tokens_per_s,
        examples_per_s, s_per_step and, where measured, peak_memory_mb."""
        g = self.global_step(phase, step)
        line = {"event": "train", "task": self.tasks[phase], "phase": phase, "epoch": round(epoch, 4),
                "step": step, "steps": steps, "global_step": g, **values}
        tracked = {f"train/{k}": v for k, v in values.items() if k != "regularizer_terms"}
        tracked.update({f"train/regularizer_terms/{k}": v for k, v in values.get("regularizer_terms", {}).items()})
        tracked.update({"train/phase": phase, "train/epoch": line["epoch"]})
        self._write(line, step=g, tracked=tracked)

    def train_end(self, phase: int, stats: Mapping[str, Any]) -> None:
        steps = stats.get("steps", 0)
        self._write({"event": "train_end", "task": self.tasks[phase], "phase": phase, **stats,
                     "global_step": self.global_step(phase, steps)}, send=False)

    def eval_begin(self, phase: int) -> None:
        """The matrix row of `phase` is (re)evaluated from its first entry."""
        self._drop(lambda line: line.get("event") == "eval" and line.get("phase") == phase)

    def log_eval(self, phase: int, task: str, accuracy: float, examples: int, seconds: float,
                 metric: str = "exact_match") -> None:
        """One entry of the accuracy matrix: the score on `task` with its metric after training phase `phase`
        (-1: the base model). Trackers get it under the metric's name (`accuracy` for exact match)."""
        step = self._phase_end_step(phase)
        line = {"event": "eval", "phase": phase, "trained_task": self.tasks[phase] if phase >= 0 else None,
                "task": task, "accuracy": accuracy, "metric": metric, "examples": examples,
                "seconds": round(seconds, 3), "global_step": step}
        key = metric_key(metric)
        self._write(line, step=step, tracked={f"{'base_' if phase < 0 else ''}{key}/{task}": accuracy})

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        values = {"average_accuracy": metrics.get("average_accuracy"), "bwt": metrics.get("bwt"),
                  "fwt": metrics.get("fwt"), "forgetting": metrics.get("forgetting")}
        self._drop(lambda line: line.get("event") == "summary")
        step = max((line.get("global_step", 0) for line in self.lines), default=0)
        names = {"average_accuracy": "AP", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting"}
        self._write({"event": "summary", **values, "global_step": step}, step=step,
                    tracked={f"summary/{names[k]}": v for k, v in values.items()})

    def _phase_end_step(self, phase: int) -> int:
        if phase < 0:
            return 0
        ends = [line for line in self.lines if line.get("event") == "train_end" and line.get("phase") == phase]
        return ends[-1].get("global_step", 0) if ends else self.offsets.get(phase, 0)
