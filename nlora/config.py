"""The run configuration: one typed dataclass, the single source of the CLI options, the YAML keys and their
validation. Every key of a YAML config file is a field name below (`lambda` for `lambda_`)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .benchmarks import BENCHMARK_CHOICES, check_benchmark_order, load_preset
from .data import UNKNOWN_LABEL_POLICIES
from .evaluation_plan import EVAL_PLANS
from .paths import check_plain_name, folder_problem
from .prompts import PROMPT_FORMATS
from .errors import NloraError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_KINDS = ("auto", "seq2seq", "decoder", "encoder")
PENALTY_FORMS = ("delta", "reference", "factors")
EVAL_MODES = ("generate", "score")
L2_FORMS = ("squared", "reference")
# A scalar the user sets replaces the preset's per-task list of the same quantity (unless the user sets both).
PER_TASK_OF = {"lambda": "lambda_per_task", "orth_lambda": "orth_lambda_per_task",
               "l2_lambda": "l2_lambda_per_task", "epochs": "epochs_per_task"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
MAX_INT = 2**31 - 1  # the largest value an integer key takes

# Field names that are Python keywords get a trailing underscore; users write them without it.
_ALIASES = {"lambda": "lambda_"}
_PUBLIC_NAMES = {v: k for k, v in _ALIASES.items()}


def _opt(help: str, **kw) -> Any:
    default = kw.pop("default", dataclasses.MISSING)
    factory = kw.pop("default_factory", dataclasses.MISSING)
    meta = {"help": help, **kw}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Everything a run needs. Build it with `RunConfig(...)`, `RunConfig.from_dict(...)` or
    `load_config(path, overrides)`; `validate()` checks it and raises NloraError naming the bad key."""

    # a preset of the papers' benchmarks (see `nlora presets`); its keys sit under the config file and the flags
    benchmark: str = _opt("start from a paper preset: standard (orders 1-3) or long (orders 4-6) with N-LoRA's "
                          "protocol, o-lora-standard (1-3) or o-lora-long (6) with O-LoRA's; none: no preset",
                          default="none", choices=BENCHMARK_CHOICES)
    order: int | None = _opt("task order of the benchmark preset (standard: 1, 2, 3; long: 4, 5, 6)", default=None)

    # what to train
    model: str = _opt("hub name or local path of the base model, or a built-in tiny test model "
                      "(tiny-t5, tiny-llama, tiny-bert)", default=DEFAULT_MODEL)
    model_kind: str = _opt("seq2seq, decoder, encoder, or auto (from the model's config)", default="auto",
                           choices=MODEL_KINDS)
    method: str = _opt("continual-learning method (see `nlora methods`)", default="n-lora")
    tasks: list[str] = _opt("dataset names in training order", default_factory=list)
    data_dir: str | None = _opt("folder in the CL_Benchmark layout <group>/<dataset>/{train,test,labels}.json",
                                default=None)
    instructions: str | None = _opt("JSON file mapping task family or dataset name to an instruction (the "
                                    "reference's instruction_config.json is accepted as it is)",
                                    default=None)
    output_dir: str = _opt("run directory to write", default="runs/nlora")
    overwrite: bool = _opt("replace an existing run in output_dir", default=False)

    # prompts (nlora.prompts)
    prompt_format: str = _opt("nlora (own layout; long prompts lose the end of the text only) or reference (the "
                              "O-LoRA / N-LoRA code's prompts and truncation)", default="nlora",
                              choices=PROMPT_FORMATS)
    add_task_name: bool = _opt("reference prompt format: a 'Task:FAMILY' line in front", default=False)
    add_dataset_name: bool = _opt("reference prompt format: a 'Dataset:NAME' line in front", default=False)

    # labels not in labels.json (error, drop, or keep: kept test examples are scored as wrong)
    train_unknown_labels: str = _opt("training examples whose label is not in labels.json: error, drop or keep",
                                     default="error", choices=UNKNOWN_LABEL_POLICIES)
    test_unknown_labels: str = _opt("test examples whose label is not in labels.json: keep (scored as wrong, as the "
                                    "reference code scores them), drop or error", default="keep",
                                    choices=UNKNOWN_LABEL_POLICIES)

    # data sizes
    max_train_samples: int | None = _opt("training examples per task (random subset; all if unset)", default=None)
    max_eval_samples: int | None = _opt("test examples per task (random subset; all if unset)", default=None)
    max_source_length: int = _opt("prompt tokens kept", default=256)
    max_target_length: int = _opt("answer tokens generated at evaluation", default=16)

    # optimisation
    epochs: int = _opt("epochs per task", default=1)
    batch_size: int = _opt("training batch size, global: the examples of one forward/backward across all processes "
                           "(each process takes batch_size / processes); an optimizer step takes "
                           "batch_size x gradient_accumulation_steps examples", default=8)
    eval_batch_size: int = _opt("evaluation batch size, global like batch_size: the examples predicted at once "
                                "across all processes (each process predicts eval_batch_size / processes)",
                                default=32)
    lr: float = _opt("learning rate (AdamW, constant after warm-up)", default=1e-3)
    weight_decay: float = _opt("AdamW weight decay", default=0.0)
    warmup_steps: int = _opt("linear warm-up steps at the start of each task", default=0)
    max_grad_norm: float | None = _opt("gradient clipping norm (none if unset)", default=1.0)
    seed: int = _opt("random seed (sampling, shuffling, initialisation)", default=42)
    device: str = _opt("cpu, cuda, cuda:N, mps or auto", default="auto")

    # LoRA
    lora_r: int = _opt("LoRA rank of each task's adapter", default=8)
    lora_alpha: float = _opt("LoRA alpha (scaling = alpha / r)", default=32.0)
    lora_dropout: float = _opt("LoRA dropout", default=0.1)
    target_modules: list[str] | None = _opt("module names to adapt (default: the attention query and value "
                                            "projections of the architecture)", default=None)

    # adapters
    fold_adapters: bool = _opt("fold the frozen adapters of a method that sums them all into one frozen LoRA "
                               "path (no dropout) after each task, so the cost per step stays flat in the number "
                               "of tasks; false keeps one path per task", default=True)

    # N-LoRA
    lambda_: float = _opt("weight of N-LoRA's L1 penalty", default=0.4)
    penalty_form: str = _opt("N-LoRA penalty: delta (paper: |scaling*B*A|_1), reference (the public code's "
                             "r x r product |A*B|_1) or factors (|A|_1 + |B|_1)", default="delta",
                             choices=PENALTY_FORMS)
    lambda_per_task: list[float] | None = _opt("N-LoRA: one lambda per task in training order (overrides lambda)",
                                               default=None)
    penalty_chunk_size: int | None = _opt("rows of the update computed at once by the delta penalty (unset: 256 "
                                          "on CPU, 1024 on a GPU)", default=None)

    # O-LoRA
    orth_lambda: float = _opt("O-LoRA: weight of the orthogonality loss |A_s A_t^T|", default=0.5)
    l2_lambda: float = _opt("O-LoRA: weight of the L2 loss on the current adapter", default=0.0)
    orth_lambda_per_task: list[float] | None = _opt("O-LoRA: one orth_lambda per task in training order "
                                                    "(overrides orth_lambda)", default=None)
    l2_lambda_per_task: list[float] | None = _opt("O-LoRA: one l2_lambda per task in training order (overrides "
                                                  "l2_lambda)", default=None)
    l2_form: str = _opt("O-LoRA L2 loss: squared (sum of |theta|^2) or reference (the public code's sum of "
                        "unsquared norms |theta|_2 of A and B)", default="squared", choices=L2_FORMS)

    # per-task schedule (O-LoRA's long-order script trains MNLI for 2 epochs)
    epochs_per_task: list[float] | None = _opt("one epoch count per task in training order (overrides epochs)",
                                               default=None)

    # replay
    replay_per_task: int = _opt("replay: stored training examples of each earlier task", default=50)
    replay_base: str = _opt("replay: seq-lora (one shared adapter) or inc-lora (one adapter per task)",
                            default="seq-lora", choices=("seq-lora", "inc-lora"))

    # evaluation
    eval_mode: str = _opt("generate: greedy generation scored by exact match (the papers' protocol); score: the "
                          "label option with the highest log-likelihood, one batched pass (encoders always score)",
                          default="generate", choices=EVAL_MODES)
    eval_future: bool = _opt("also evaluate tasks not trained yet and the base model before training "
                             "(needed for forward transfer)", default=False)
    eval_plan: str = _opt("which rows of the accuracy matrix are evaluated: full (after every task; all metrics), "
                          "final (after the last task only: AP), every (after every eval_every-th task and the "
                          "last: AP and those rows)", default="full", choices=EVAL_PLANS)
    eval_every: int = _opt("eval_plan every: evaluate after tasks K, 2K, ... and the last", default=5)

    # reliability and scale
    checkpoint_steps: int = _opt("save the current adapter and optimizer every N steps within a task "
                                 "(0: only at task ends)", default=200)
    gradient_accumulation_steps: int = _opt("micro-batches per optimizer step", default=1)
    mixed_precision: str = _opt("no, fp16 or bf16 (passed to accelerate)", default="no",
                                choices=("no", "fp16", "bf16"))

    # sharding
    sharding: str = _opt("none, or fsdp2: shard the frozen base model across the launched processes (FSDP2, one "
                         "unit per transformer block; the LoRA factors stay whole)", default="none",
                         choices=("none", "fsdp2"))

    trust_remote_code: bool = _opt("allow the model's own code from the hub", default=False)

    # precision and memory
    dtype: str = _opt("dtype of the base model's weights: auto (float32 for seq2seq and encoder models and on CPU, "
                      "bfloat16 for decoders on a GPU), float32, bfloat16 or float16; config.yaml records the "
                      "resolved one. LoRA factors and penalties stay float32", default="auto", choices=DTYPES)
    gradient_checkpointing: bool = _opt("recompute each layer's activations in backward instead of keeping them "
                                        "(non-reentrant; less memory, about a third more compute)", default=False)
    attn_implementation: str = _opt("attention kernel: auto (the model's default), sdpa, eager or "
                                    "flash_attention_2 (needs CUDA and the flash-attn package)", default="auto",
                                    choices=ATTN_IMPLEMENTATIONS)
    load_in_4bit: bool = _opt("QLoRA: load the frozen base in 4-bit NF4 through bitsandbytes (CUDA; pip install "
                              "\"nlora[qlora]\")", default=False)
    load_in_8bit: bool = _opt("load the frozen base in 8-bit through bitsandbytes (CUDA; pip install "
                              "\"nlora[qlora]\")", default=False)

    # tracking
    log_steps: int = _opt("write a line to RUN_DIR/log.jsonl (and the trackers) every N optimizer steps, and at "
                          "the last step of each task", default=10)
    report_to: str = _opt("trackers through accelerate: tensorboard, wandb, mlflow (comma-separated), all (every "
                          "one installed) or none; log.jsonl is always written", default="none")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        """Build from user-facing keys, coercing strings (CLI) and checking names and types."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        unknown = []
        for key, value in values.items():
            name = _ALIASES.get(key, key).replace("-", "_")
            if name not in known or name in _ALIASES:
                unknown.append(key)
                continue
            kwargs[name] = _coerce(value, known[name], source)
        if unknown:
            valid = ", ".join(sorted(public_name(n) for n in known))
            raise NloraError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {valid}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {public_name(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        def bad(key: str, why: str):
            raise NloraError(f"option '{public_name(key)}': {why}")

        if not self.tasks:
            bad("tasks", "no tasks given (comma-separated dataset names in training order)")
        if len(set(self.tasks)) != len(self.tasks):
            bad("tasks", f"a task appears twice in {self.tasks}")
        for task in self.tasks:  # each names a folder of the data folder and of the run directory
            check_plain_name(task, "option 'tasks': task name")
        for key in ("epochs", "batch_size", "eval_batch_size", "lora_r", "max_source_length",
                    "max_target_length", "gradient_accumulation_steps", "log_steps"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_train_samples", "max_eval_samples", "penalty_chunk_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                bad(key, f"must be >= 1 when set, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be a positive number, got {self.lr}")
        if not (self.lambda_ >= 0 and math.isfinite(self.lambda_)):
            bad("lambda_", f"must be >= 0 and finite, got {self.lambda_}")
        if self.lambda_per_task is not None:
            if len(self.lambda_per_task) != len(self.tasks):
                bad("lambda_per_task", f"has {len(self.lambda_per_task)} values for {len(self.tasks)} tasks")
            if any(not (x >= 0 and math.isfinite(x)) for x in self.lambda_per_task):
                bad("lambda_per_task", f"values must be >= 0 and finite, got {self.lambda_per_task}")
        for key in ("orth_lambda_per_task", "l2_lambda_per_task", "epochs_per_task"):
            values = getattr(self, key)
            if values is not None and len(values) != len(self.tasks):
                bad(key, f"has {len(values)} values for {len(self.tasks)} tasks")
            if values is not None and any(not (x >= 0 and math.isfinite(x)) for x in values):
                bad(key, f"values must be >= 0 and finite, got {values}")
            if key == "epochs_per_task" and values is not None and any(x < 1 or x != int(x) or x > MAX_INT
                                                                       for x in values):
                bad(key, f"values must be whole numbers from 1 to {MAX_INT}, got {values}")
        for key in ("orth_lambda", "l2_lambda", "replay_per_task", "checkpoint_steps"):
            if not getattr(self, key) >= 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.lora_alpha <= 0:
            bad("lora_alpha", f"must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            bad("weight_decay" if self.weight_decay < 0 else "warmup_steps", "must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            bad("max_grad_norm", f"must be > 0 when set, got {self.max_grad_norm}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            bad("device", f"{self.device!r} is not one of cpu, cuda, cuda:N, mps, auto")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, f"{getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        if self.eval_every < 1:
            bad("eval_every", f"must be >= 1, got {self.eval_every}")
        if self.load_in_4bit and self.load_in_8bit:
            bad("load_in_8bit", "excludes option 'load_in_4bit'; choose one quantization")
        if (self.load_in_4bit or self.load_in_8bit) and self.model in ("tiny-t5", "tiny-llama", "tiny-bert"):
            bad("load_in_4bit" if self.load_in_4bit else "load_in_8bit",
                f"the built-in '{self.model}' is built in memory, not loaded from weights; save it with "
                "save_pretrained and pass its folder as 'model'")
        from .methods import get_method  # late import: methods import this module

        get_method(self.method)
        check_benchmark_order(self.benchmark, self.order)
        from .tracking import check_trackers

        check_trackers(self.report_to)  # a tracker asked for but not installed fails here, before any work
        if self.data_dir is not None and folder_problem(self.data_dir):
            bad("data_dir", folder_problem(self.data_dir))
        if self.instructions is not None and not Path(self.instructions).is_file():
            bad("instructions", f"file {self.instructions} does not exist")
        return self


def public_name(name: str) -> str:
    return _PUBLIC_NAMES.get(name, name)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(RunConfig))


def base_type(f: dataclasses.Field) -> type:
    """The non-None type of a field: int for `int | None`, list for `list[str]`."""
    hints = typing.get_type_hints(RunConfig)
    tp = hints[f.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def list_item_type(f: dataclasses.Field) -> type:
    tp = typing.get_type_hints(RunConfig)[f.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp)[0]


def is_optional(f: dataclasses.Field) -> bool:
    tp = typing.get_type_hints(RunConfig)[f.name]
    return type(None) in typing.get_args(tp)


def _coerce(value: Any, f: dataclasses.Field, source: str) -> Any:
    name = public_name(f.name)
    tp = base_type(f)

    def fail():
        raise NloraError(f"{source}: key '{name}' must be {_type_name(tp, f)}, got {value!r}")

    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and is_optional(f)):
        if is_optional(f):
            return None
        fail()
    if tp is list:
        item = list_item_type(f)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            fail()
        if item is float:
            if any(isinstance(v, bool) for v in value):
                fail()
            try:
                return [float(v) for v in value]
            except (TypeError, ValueError):
                fail()
        if not all(isinstance(v, str) for v in value):
            fail()
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        fail()
    if tp is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                fail()
        if not isinstance(value, int):
            fail()
        if abs(value) > MAX_INT:  # 1e10 epochs, or a seed numpy cannot take: a slip, not a setting
            raise NloraError(f"{source}: key '{name}' is out of range: {value} (at most {MAX_INT} in size)")
        return value
    if tp is float:
        if isinstance(value, bool):
            fail()
        try:
            out = float(value)
        except (TypeError, ValueError):
            fail()
        if math.isnan(out):
            fail()
        return out
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        fail()
    return value


def _type_name(tp: type, f: dataclasses.Field) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             list: "a list of strings (or a comma-separated string)"}
    text = names.get(tp, str(tp))
    if tp is list and list_item_type(f) is float:
        text = "a list of numbers (or a comma-separated string)"
    return text + " or null" if is_optional(f) else text


class _Refused(yaml.YAMLError):
    """Valid YAML that a config file may not hold."""


class _ConfigLoader(yaml.SafeLoader):
    """safe_load with two refusals: aliases (`*name`), whose nesting can expand a small file into gigabytes, and
    a key given twice in one mapping, which YAML would resolve silently to the last value."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"line {event.start_mark.line + 1}: aliases (*{event.anchor}) are not accepted; write "
                           "the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:`, resolved by the base class
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise _Refused(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NloraError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader)
    except _Refused as e:
        raise NloraError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise NloraError(f"config file {path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NloraError(f"config file {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig's defaults, then `defaults`, then the benchmark preset named by `benchmark`/`order` (wherever
    they are set), then the YAML file's keys, then `overrides` (e.g. the command line)."""
    values: dict[str, Any] = dict(defaults or {})
    user: dict[str, Any] = {}
    if path is not None:
        file_values = load_yaml_file(path)
        RunConfig.from_dict(file_values, source=f"config file {path}")  # names the file in errors
        user.update(file_values)
    user.update(overrides or {})
    values.update(_resolve_preset({**values, **user}, user))
    values.update(user)
    return RunConfig.from_dict(values, source="options")


def _resolve_preset(merged: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """The preset's keys for the `benchmark` and `order` of `merged` (none without a benchmark). A `lambda` (or
    `orth_lambda`, `l2_lambda`, `epochs`) the user sets replaces the preset's per-task list of it, unless the user
    sets that list too."""
    probe = RunConfig.from_dict({k: merged[k] for k in ("benchmark", "order") if k in merged}, source="options")
    if probe.benchmark == "none" and probe.order is None:
        return {}
    check_benchmark_order(probe.benchmark, probe.order)
    preset = load_preset(probe.benchmark, probe.order)
    for scalar, per_task in PER_TASK_OF.items():
        if scalar in user and per_task not in user:
            preset.pop(per_task, None)
    return {**preset, "benchmark": probe.benchmark, "order": probe.order}
