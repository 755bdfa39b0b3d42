"""General-ability retention: how the model a run trained scores on general benchmarks (MMLU, GSM8K, BBH, ... or
a local task file) after each task, compared with its base model, through EleutherAI's lm-evaluation-harness
(`lm-eval`, the optional extra `nlora[general]`).

`nlora eval-general RUN_DIR --tasks B1,B2` scores the base model (after = 0) and the model after each chosen task K,
rebuilt in memory from the run's saved adapters (nlora.predict.load_model) and handed to lm-eval as an HFLM. The
folded sum of the adapters is kept as its own LoRA path (the concat form, nlora.adapters), which computes exactly
what the adapter of `nlora export RUN_DIR OUT --upto K` computes, so `lm_eval --model hf --model_args
pretrained=BASE,peft=OUT` gives the same numbers (`lm_eval_command`).

RUN_DIR/general.json holds, per benchmark, its primary score (lm-eval's first reported metric) and all its metrics
after each scored task, and ΔG = score after K − score of the base, per benchmark and their mean (TRACE's general
ability delta). It records lm-eval's version, each benchmark's task versions and a hash of their configurations,
and the settings (few-shot, limit, batch size, weight dtype); scores already held under the same settings are not
computed again, and a file computed under other settings is never added to: the call is refused and says why.

A runner scores a phase through `GeneralEval.score_phase(after, model)`, which skips what general.json holds. The
run option `general_eval` does so during training (`RunScoring`): the live model, scored on the main process after
each chosen phase and put back as training left it, into the same general.json."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import random
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import NloraError
from ..export import check_summable, read_run, read_run_config
from ..io import write_json_atomic
from ..models import TINY_MODELS
from ..rundir import GENERAL_FILE, read_json_object

SCHEMA_VERSION = 1
INSTALL_HINT = 'pip install "nlora[general]"'
BACKENDS = {"decoder": "causal", "seq2seq": "seq2seq"}  # nlora's model kinds that lm-eval scores, as its HFLM names them
# how errors name the options, on the command line (eval-general) and as run options (config.yaml keys)
CLI_OPTIONS = {"tasks": "--tasks", "include_path": "--include-path"}
RUN_OPTIONS = {"tasks": "'general_eval'", "include_path": "'general_eval_include_path'"}


def require_lm_eval():
    """The lm_eval module, or one clear error naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise NloraError("general-ability evaluation needs EleutherAI's lm-evaluation-harness, in the optional extra "
                         f"'general': {INSTALL_HINT} (from a clone: pip install -e '.[general]')") from None
    return lm_eval


@dataclass(frozen=True)
class GeneralSettings:
    """What must be equal for two scores to be compared."""
    num_fewshot: int | None = None  # None: each benchmark's own default
    limit: int | None = None  # score only the first N examples of each benchmark: a smoke test, not comparable
    batch_size: int = 8

    def validate(self) -> "GeneralSettings":
        for name, value, low in (("--num-fewshot", self.num_fewshot, 0), ("--limit", self.limit, 1),
                                 ("--batch-size", self.batch_size, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise NloraError(f"option {name}: must be an integer >= {low}, got {value!r}")
        return self

    def to_dict(self) -> dict:
        # lm-eval's default seeds (python, numpy, torch, few-shot sampling), which its CLI uses too
        return {**asdict(self), "apply_chat_template": False, "seeds": [0, 1234, 1234, 1234]}


@dataclass
class ScoredModel:
    """A model to score: a transformers model (or a PEFT model around one) and its tokenizer."""
    model: torch.nn.Module
    tokenizer: object
    kind: str  # decoder | seq2seq (an encoder has no language-model head to score)
    dtype: str  # the weight dtype of the base


def _dtype_name(model: torch.nn.Module) -> str:
    return str(getattr(model, "dtype", next(model.parameters()).dtype)).removeprefix("torch.")


def rebuild_model(run_dir: str | Path, after: int, device: str = "cpu") -> ScoredModel:
    """The run's model after task `after` (0: its base model), as `nlora predict` rebuilds it, with no task id
    (every adapter the run sums is active). The folded sum stays a LoRA path of its own, as in the exported adapter."""
    from ..models import detect_kind
    from ..predict import load_base, load_model

    if after == 0:
        backbone = load_base(read_run_config(run_dir), device)
        backbone.model.eval()
        return ScoredModel(backbone.model, backbone.tokenizer, backbone.kind, backbone.dtype)
    run = read_run(run_dir, after)
    check_summable(run)
    adapters, objective = load_model(run, device, merge_fp32=False)
    adapters.activate(run.method.active_for_eval(run.phase, run.phase, adapters.names))
    base = adapters.base_model
    return ScoredModel(adapters.model, objective.tokenizer, detect_kind(base.config), _dtype_name(base))


@contextmanager
def _quiet(logger_name: str):
    """Silence one lm-eval logger below errors: HFLM warns against launching a pre-built model through
    accelerate, which nlora never does."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def evaluate_model(scored: ScoredModel, benchmarks: list[str], settings: GeneralSettings, task_manager,
                   log_samples: bool = False) -> dict:
    """lm-eval's results (`simple_evaluate`) for an in-memory model."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if scored.kind not in BACKENDS:
        raise NloraError(f"general-ability benchmarks score language models (decoder or seq2seq); this model is "
                         f"an {scored.kind}, which has no language-model head")
    with _quiet("lm_eval.models.huggingface"):
        lm = HFLM(pretrained=scored.model, tokenizer=scored.tokenizer, backend=BACKENDS[scored.kind],
                  batch_size=settings.batch_size)
    with _quiet_git_hash():
        return simple_evaluate(model=lm, tasks=list(benchmarks), num_fewshot=settings.num_fewshot,
                               limit=settings.limit, task_manager=task_manager, log_samples=log_samples)


@contextmanager
def _quiet_git_hash():
    """lm-eval records the working directory's git commit in its results by running `git describe`, which prints
    "fatal: not a git repository" outside a checkout: the same lookup with git's messages kept off the terminal."""
    import lm_eval.evaluator as evaluator

    if not hasattr(evaluator, "get_git_commit_hash"):  # another lm-eval release: leave it as it is
        yield
        return
    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def primary_metric(results: dict, benchmark: str) -> str:
    """The benchmark's first reported "metric,filter" (the first metric of its configuration, first filter)."""
    for key, value in results.items():
        if "," in key and "_stderr," not in key and isinstance(value, (int, float)):
            return key
    raise NloraError(f"benchmark {benchmark!r}: lm-eval reports no score for it (a group without "
                     "aggregate_metric_list?); name its tasks instead")


def _numbers(results: dict) -> dict[str, float]:
    return {k: float(v) for k, v in results.items()
            if "," in k and isinstance(v, (int, float)) and math.isfinite(float(v))}


def _config_hash(task) -> str:
    text = json.dumps(task.dump_config(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def mean_delta(deltas: dict[str, float], benchmarks: dict[str, dict]) -> float | None:
    """ΔG: the mean of the per-benchmark changes, over every benchmark of the file, all higher-is-better; None
    where one is missing (the row is incomplete) or lower-is-better (a mean would mix directions)."""
    if set(deltas) != set(benchmarks) or not deltas:
        return None
    if any(benchmarks[b].get("higher_is_better") is False for b in deltas):
        return None
    return sum(deltas.values()) / len(deltas)


def summarize(record: dict) -> dict:
    """The ΔG section of general.json: per scored task, score − base score per benchmark, and their mean."""
    base = record["scores"].get("0", {})
    out = {}
    for after, scores in record["scores"].items():
        if after == "0":
            continue
        deltas = {b: scores[b]["score"] - base[b]["score"] for b in record["benchmarks"] if b in scores and b in base}
        out[after] = {"per_benchmark": deltas, "mean": mean_delta(deltas, record["benchmarks"])}
    return out


def read_general(run_dir: str | Path) -> dict | None:
    """RUN_DIR/general.json, or None where there is none."""
    path = Path(run_dir) / GENERAL_FILE
    if not path.is_file():
        return None
    record = read_json_object(path)
    if record is None or record.get("schema_version") != SCHEMA_VERSION:
        raise NloraError(f"{path}: not a general.json of schema version {SCHEMA_VERSION}")
    return record


def comparability(record: dict) -> dict:
    """What two general.json files must share for their scores to be compared."""
    return {"harness": record.get("harness"), "lm_eval_version": record.get("lm_eval_version"),
            **record.get("settings", {})}


def differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for each entry of two `comparability` records that differs."""
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _definition(benchmark: dict) -> dict:
    return {"version": benchmark.get("version"), "tasks": benchmark.get("tasks")}


def mixing_reasons(records: dict[str, dict]) -> list[str]:
    """Why the general.json records of several runs (by label) cannot be compared; empty where they can: same
    harness, lm-eval version and settings, and the same definition of every benchmark they share."""
    labels = list(records)
    first = records[labels[0]]
    reasons = []
    for label in labels[1:]:
        other = records[label]
        changed = [f"{k} {x!r} vs {y!r}" for k, x, y in differences(comparability(first), comparability(other))]
        common = [b for b in first["benchmarks"] if b in other["benchmarks"]]
        changed += [f"benchmark {b} defined differently (lm-eval task versions or configurations)" for b in common
                    if _definition(first["benchmarks"][b]) != _definition(other["benchmarks"][b])]
        if changed:
            reasons.append(f"{labels[0]} vs {label}: " + "; ".join(changed))
    return reasons


class GeneralEval:
    """The general-ability scores of one run under one set of settings, kept in RUN_DIR/general.json."""

    def __init__(self, run_dir: str | Path, benchmarks: list[str], settings: GeneralSettings = GeneralSettings(),
                 include_path: str | Path | None = None, device: str = "auto", *, config=None,
                 afresh: bool = False, options: dict[str, str] = CLI_OPTIONS):
        """`config`: the run's configuration where its config.yaml is not written yet (default: read from it);
        `afresh`: ignore a general.json already there (a run that starts over replaces it); `options`: how
        errors name the options."""
        lm_eval = require_lm_eval()
        self.root = Path(run_dir)
        self.config = config if config is not None else read_run_config(self.root)
        self.options = options
        self.benchmarks = list(dict.fromkeys(b.strip() for b in benchmarks if b.strip()))
        if not self.benchmarks:
            raise NloraError(f"option {options['tasks']}: name at least one lm-eval task, group or tag")
        self.settings = settings.validate()
        self.include_path = None if include_path is None else Path(include_path)
        if self.include_path is not None and not self.include_path.is_dir():
            raise NloraError(f"option {options['include_path']}: {self.include_path} is not a folder")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.path = self.root / GENERAL_FILE
        fresh = {"schema_version": SCHEMA_VERSION, "harness": "lm-evaluation-harness",
                 "lm_eval_version": lm_eval.__version__,
                 "run": {"model": self.config.model, "method": self.config.method, "tasks": list(self.config.tasks)},
                 "settings": {**self.settings.to_dict(), "dtype": None, "quantization": self._quantization()},
                 "benchmarks": {}, "scores": {}, "delta": {}}
        self.record = self._check_held(None if afresh else read_general(self.root), fresh)
        self._task_manager = None
        self._local_only = self.include_path is not None  # try the --include-path folder alone first
        self._checked = False

    def _quantization(self) -> str | None:
        from ..models import backbone_options

        return backbone_options(self.config)["quantization"]  # a 4-bit/8-bit base is scored as the run loaded it

    # ---------------------------------------------------------------- what general.json already holds

    def _refuse(self, what: str) -> None:
        raise NloraError(f"{self.path} holds scores computed with {what}. Scores computed with different settings "
                         f"are never mixed: ask with the same settings, or move {self.path.name} aside to start a "
                         "new one")

    def _check_held(self, held: dict | None, fresh: dict) -> dict:
        if held is None:
            return fresh
        if held.get("run") != fresh["run"]:
            raise NloraError(f"{self.path} belongs to another run: {held.get('run')} (this run: {fresh['run']})")
        # the dtype is known once the model is built (score_phase checks it)
        asked = {**comparability(fresh), "dtype": held.get("settings", {}).get("dtype")}
        changed = differences(comparability(held), asked)
        if changed:
            self._refuse("; ".join(f"{k} {x!r} (asked: {y!r})" for k, x, y in changed))
        return held

    def label(self, after: int) -> str:
        return "base" if after == 0 else self.config.tasks[after - 1]

    def pending(self, after: int) -> list[str]:
        """The benchmarks general.json holds no score for after task `after` (0: the base model)."""
        held = self.record["scores"].get(str(after), {})
        return [b for b in self.benchmarks if b not in held]

    # ---------------------------------------------------------------- benchmarks

    @property
    def task_manager(self):
        """lm-eval's task index: the --include-path folder alone where it defines every benchmark asked for (the
        index of the built-in tasks takes seconds to build), else the built-in tasks and that folder."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            path = None if self.include_path is None else str(self.include_path)
            if self._local_only:
                local = TaskManager(include_path=path, include_defaults=False)
                if all(b in local.all_tasks for b in self.benchmarks):
                    self._task_manager = local
                    return local
                self._local_only = False
            self._task_manager = TaskManager(include_path=path)
        return self._task_manager

    def _load(self, benchmark: str) -> dict:
        """lm-eval's tasks and groups of one benchmark; its data is read here, so errors name the benchmark."""
        try:
            return self.task_manager.load([benchmark])
        except KeyError:
            where = f", nor one defined in {self.include_path}" if self.include_path else ""
            raise NloraError(f"option {self.options['tasks']}: {benchmark!r} is not an lm-eval task, group or tag"
                             f"{where}") from None
        except Exception as e:  # lm-eval and datasets raise many kinds here
            if self._local_only:  # a local group may name built-in tasks: retry with the built-in index
                self._local_only, self._task_manager = False, None
                return self._load(benchmark)
            first_line = str(e).splitlines()[0] if str(e) else ""
            raise NloraError(f"benchmark {benchmark!r}: lm-eval cannot load it ({type(e).__name__}: {first_line}). "
                             "Offline, lm-eval's built-in benchmarks need their datasets in the Hugging Face cache "
                             "(load them once online); a benchmark of your own can be a local task file "
                             f"(dataset_path: json) in a folder given as {self.options['include_path']}") from None

    def fingerprint(self, benchmark: str) -> dict:
        """Version, configuration hash and number of documents of each lm-eval task of the benchmark."""
        loaded = self._load(benchmark)
        group, task = loaded["groups"].get(benchmark), loaded["tasks"].get(benchmark)
        if group is None and task is None:
            raise NloraError(f"option {self.options['tasks']}: {benchmark!r} is an lm-eval tag, a set of tasks with "
                             f"no score of its own; name its tasks ({', '.join(sorted(loaded['tasks']))}) or a group")
        if group is not None and not group.aggregate_metric_list:
            raise NloraError(f"option {self.options['tasks']}: lm-eval group {benchmark!r} has no aggregate score "
                             "(aggregate_metric_list); name its tasks instead")
        return {"version": group.version if group is not None else task.VERSION,
                "tasks": {name: {"version": t.VERSION, "config_sha256": _config_hash(t), "documents": len(t.eval_docs)}
                          for name, t in sorted(loaded["tasks"].items())}}

    def check_benchmarks(self) -> None:
        """Load every benchmark once: unknown names and unreadable data fail here, before any model is loaded, and
        a benchmark whose tasks changed since general.json scored it is refused."""
        if self._checked:
            return
        owners: dict[str, str] = {}
        for benchmark in self.benchmarks:
            now = self.fingerprint(benchmark)
            for task in now["tasks"]:
                if task in owners:
                    raise NloraError(f"option {self.options['tasks']}: {owners[task]!r} and {benchmark!r} both hold "
                                     f"lm-eval task {task!r}; name each task once")
                owners[task] = benchmark
            held = self.record["benchmarks"].get(benchmark)
            if held is not None and _definition(held) != now:
                self._refuse(f"another definition of benchmark {benchmark!r} (its lm-eval tasks, their versions, "
                             f"configurations or number of documents differ: {_changed_tasks(held, now)})")
            self.record["benchmarks"].setdefault(benchmark, now)
        self._checked = True

    # ---------------------------------------------------------------- scoring

    def score_phase(self, after: int, model: Callable[[], ScoredModel] | None = None) -> dict[str, dict]:
        """Score the model after task `after` (0: the base model) on the benchmarks general.json does not hold for
        it yet, and add them to general.json; returns the scores of every benchmark asked for. `model` builds the
        model to score (default: rebuilt from the run's adapters); it is not called when nothing is left to do."""
        if not 0 <= after <= len(self.config.tasks):
            raise NloraError(f"option --upto: must be between 1 and {len(self.config.tasks)} (the run's tasks), "
                             f"got {after}")
        self.check_benchmarks()  # also where nothing is left: a benchmark redefined since is refused, not reused
        missing = self.pending(after)
        if missing:
            scored = model() if model is not None else rebuild_model(self.root, after, self.device)
            held = self.record["settings"]["dtype"]
            if held not in (None, scored.dtype):
                self._refuse(f"weights in {held} (this model's: {scored.dtype}; a run's dtype 'auto' resolves by "
                             "device, so score on the same kind of device)")
            self.record["settings"]["dtype"] = scored.dtype
            results = evaluate_model(scored, missing, self.settings, self.task_manager)
            del scored
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._store(after, missing, results)
        return {b: self.record["scores"][str(after)][b] for b in self.benchmarks}

    def _store(self, after: int, benchmarks: list[str], results: dict) -> None:
        scores = self.record["scores"].setdefault(str(after), {})
        for benchmark in benchmarks:
            values = results["results"][benchmark]
            metric = primary_metric(values, benchmark)
            info = self.record["benchmarks"][benchmark]
            if info.setdefault("metric", metric) != metric:
                raise NloraError(f"benchmark {benchmark!r}: lm-eval now reports {metric} first, general.json "
                                 f"holds {info['metric']}")
            name = metric.split(",")[0]
            info.setdefault("higher_is_better", results.get("higher_is_better", {}).get(benchmark, {}).get(name))
            info.setdefault("n_shot", {t: results["n-shot"].get(t) for t in info["tasks"]})
            scores[benchmark] = {"score": float(values[metric]), "metrics": _numbers(values),
                                 "examples": sum(results["n-samples"].get(t, {}).get("effective", 0)
                                                 for t in info["tasks"])}
        self.record["scores"] = {k: self.record["scores"][k] for k in sorted(self.record["scores"], key=int)}
        self.record["labels"] = {k: self.label(int(k)) for k in self.record["scores"]}
        self.record["delta"] = summarize(self.record)
        write_json_atomic(self.path, self.record)


def _changed_tasks(held: dict, now: dict) -> str:
    before, after = held.get("tasks", {}), now["tasks"]
    changed = sorted(t for t in set(before) | set(after) if before.get(t) != after.get(t))
    return ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "") if changed else "the benchmark's version"


def score_phase(run_dir: str | Path, after: int, benchmarks: list[str], settings: GeneralSettings = GeneralSettings(),
                include_path: str | Path | None = None, model: Callable[[], ScoredModel] | None = None,
                device: str = "auto") -> dict[str, dict]:
    """One phase of `GeneralEval` (see there): what a runner calls after a task; skips what general.json holds."""
    return GeneralEval(run_dir, benchmarks, settings, include_path, device).score_phase(after, model)


# ------------------------------------------------------------------------------------------- during a run

def run_settings(config) -> GeneralSettings:
    """The settings of a run's general_eval_* options."""
    return GeneralSettings(num_fewshot=config.general_eval_num_fewshot, limit=config.general_eval_limit,
                           batch_size=config.general_eval_batch_size)


def check_run_options(config, method) -> None:
    """What RunConfig.validate checks of the run option general_eval, before any model or benchmark is loaded: the
    extra is installed and one process can score the run's model."""
    require_lm_eval()
    if config.sharding == "fsdp2":
        raise NloraError("option 'general_eval': not with sharding fsdp2, where each process holds a shard of the "
                         "base model and lm-eval scores a whole model in one process; score the run after "
                         f"training instead: nlora eval-general RUN_DIR --tasks {','.join(config.general_eval)} "
                         "--upto 1,2,...")
    if method.needs_task_id:
        raise NloraError(f"option 'general_eval': method '{config.method}' evaluates each task with its own adapter "
                         "(it needs the task id), so its tasks make no single model to score")
    if config.model_kind == "encoder":
        raise NloraError("option 'general_eval': lm-eval scores language models (decoder or seq2seq); an encoder "
                         "has no language-model head")
    if config.general_eval_include_path is not None and not Path(config.general_eval_include_path).is_dir():
        raise NloraError(f"option 'general_eval_include_path': {config.general_eval_include_path} is not a folder")


@contextmanager
def kept_for_training(model: torch.nn.Module):
    """Put back what lm-eval changes and training reads: lm-eval switches the model to eval mode and reseeds
    python's, numpy's and torch's generators (and might touch requires_grad or the grad mode)."""
    modes = [(m, m.training) for m in model.modules()]
    trains = [(p, p.requires_grad) for p in model.parameters()]
    grad_enabled = torch.is_grad_enabled()
    generators = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    mps = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in trains:
            p.requires_grad_(flag)
        torch.set_grad_enabled(grad_enabled)
        random.setstate(generators[0])
        np.random.set_state(generators[1])
        torch.set_rng_state(generators[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if mps is not None:
            torch.mps.set_rng_state(mps)


@contextmanager
def without_mixed_precision(model: torch.nn.Module):
    """The model's own forward, without the autocast that accelerate's `prepare` wraps around it under mixed
    precision (an attribute of the instance; put back after): the base model before the first task and
    eval-general's rebuilt model run without it, so every score is of the weights alone."""
    wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    if wrapped is not None:
        del model.forward  # the class's forward
    try:
        yield
    finally:
        if wrapped is not None:
            model.forward = wrapped


class RunScoring:
    """General ability scored during a run (run option general_eval): the base model before the first task, then
    the live model after every general_eval_every-th task and the last, into RUN_DIR/general.json as `nlora
    eval-general` writes it, so that the report shows it and eval-general with the same settings reuses it. A
    resumed run skips the scores held. The main process scores, the others wait; the model is put back as
    training left it (`kept_for_training`, the active adapters restored), so the run trains and evaluates the
    same bytes as without the option. The model scored is the one the run evaluates, without the training's
    mixed-precision autocast: eval-general's rebuild (the folded sum as its own LoRA path) gives the same
    numbers, up to float rounding where the run merges the folded adapters into float32 base weights."""

    WAIT = timedelta(days=7)  # lm-eval may score for hours; a NCCL barrier times out after 10 minutes

    def __init__(self, config, run_dir: str | Path, resume: bool, accelerator, backbone, phases: list[int]):
        from .plan import planned_rows

        if backbone.kind not in BACKENDS:
            raise NloraError(f"option 'general_eval': lm-eval scores language models (decoder or seq2seq); "
                             f"model '{config.model}' is an {backbone.kind}")
        self.evaluation = GeneralEval(run_dir, config.general_eval, run_settings(config),
                                      config.general_eval_include_path, str(accelerator.device), config=config,
                                      afresh=not resume, options=RUN_OPTIONS)
        self.evaluation.check_benchmarks()  # an unknown name or data missing offline fails before training
        self.after = {0} | {k + 1 for k in planned_rows("every", config.general_eval_every, phases)}
        self.accelerator, self.tokenizer, self.kind = accelerator, backbone.tokenizer, backbone.kind
        self._group = None
        if accelerator.num_processes > 1:  # called by every process at the same point, as new_group must be
            self._group = torch.distributed.new_group(backend="gloo", timeout=self.WAIT)

    def score(self, after: int, adapters, active: list[str]) -> None:
        """Score the model after task `after` (0: the base) with the adapters `active`, where it is one to score
        and general.json does not hold it yet."""
        if after not in self.after:
            return
        if self.accelerator.is_main_process:
            with kept_for_training(adapters.model), without_mixed_precision(adapters.model), \
                    adapters.using(active) as model:
                self.evaluation.score_phase(after, lambda: ScoredModel(model, self.tokenizer, self.kind,
                                                                       _dtype_name(adapters.base_model)))
        if self._group is not None:
            torch.distributed.barrier(group=self._group)


def eval_general(run_dir: str | Path, benchmarks: list[str], upto: list[int] | None = None,
                 settings: GeneralSettings = GeneralSettings(), include_path: str | Path | None = None,
                 device: str = "auto") -> dict:
    """Score the base model and the model after each task in `upto` (default: the last trained); returns the
    general.json record."""
    evaluation = GeneralEval(run_dir, benchmarks, settings, include_path, device)
    upto = [read_run(run_dir).upto] if upto is None else sorted(set(upto))
    for after in upto:  # every request is valid before anything is scored
        check_summable(read_run(run_dir, after))
    for after in [0, *upto]:
        evaluation.score_phase(after)
    return evaluation.record


def lm_eval_command(run_dir: str | Path, record: dict, after: int, benchmarks: list[str],
                    include_path: str | Path | None = None, adapter_dir: str = "ADAPTER_DIR",
                    model_dir: str = "MODEL_DIR") -> str:
    """The shell commands that score the same model with lm-eval's own CLI: export the summed adapter, load it
    on the base with PEFT. A built-in tiny model has no files lm-eval could load by its name: the model is written
    out first, as a full model (`nlora export --merge`, or the base as nlora builds it), and loaded from there."""
    settings = record["settings"]
    model = record["run"]["model"]
    if model in TINY_MODELS:
        model_args, prepare = f"pretrained={model_dir}", _write_tiny_model(run_dir, model, after, model_dir)
    else:
        model_args, prepare = f"pretrained={model}", f"nlora export {run_dir} {adapter_dir} --upto {after}"
        if after:
            model_args += f",peft={adapter_dir}"
    if settings.get("dtype"):
        model_args += f",dtype={settings['dtype']}"
    parts = ["lm_eval --model hf", f"--model_args {model_args}", f"--tasks {','.join(benchmarks)}",
             f"--batch_size {settings['batch_size']}"]
    if settings.get("num_fewshot") is not None:
        parts.append(f"--num_fewshot {settings['num_fewshot']}")
    if settings.get("limit") is not None:
        parts.append(f"--limit {settings['limit']}")
    if include_path is not None:
        parts.append(f"--include_path {include_path}")
    command = " ".join(parts)
    return f"{prepare} && {command}" if after or model in TINY_MODELS else command


def _write_tiny_model(run_dir: str | Path, model: str, after: int, model_dir: str) -> str:
    if after:  # the update merged into the weights: the last digits of a log-likelihood may differ
        return f"nlora export {run_dir} {model_dir} --upto {after} --merge"
    code = (f"from nlora.models import load_backbone; b = load_backbone('{model}'); "
            f"b.model.save_pretrained('{model_dir}'); b.tokenizer.save_pretrained('{model_dir}')")
    return f'python -c "{code}"'


def format_general(record: dict) -> list[str]:
    """The scores as a plain-text table: one row per scored task, one column per benchmark, then ΔG."""
    benchmarks = list(record["benchmarks"])
    header = ["after", *benchmarks, "ΔG (mean)"]
    rows = []
    for after, scores in record["scores"].items():
        cells = [f"{after} {record['labels'][after]}" if after != "0" else "base"]
        cells += [f"{scores[b]['score']:.4f}" if b in scores else "–" for b in benchmarks]
        mean = record["delta"].get(after, {}).get("mean")
        cells.append("" if after == "0" else f"{mean:+.4f}" if mean is not None else "–")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    metrics = ", ".join(f"{b}: {record['benchmarks'][b].get('metric')}" for b in benchmarks)
    lines.append(f"scores: {metrics}; ΔG = score − base score")
    if record["settings"].get("limit") is not None:
        lines.append(f"--limit {record['settings']['limit']}: a smoke test, not comparable with full benchmarks")
    return lines
