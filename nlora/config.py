"""The run configuration: one typed dataclass of the core options (what every run has), the single source of the
CLI options, the YAML keys and their validation. A method's own options live in its file (`Method.Options`, see
nlora.options); a run holds the chosen method's in `method_options`, and config.yaml records them flat beside the
core keys (`lambda: 0.4` for n-lora)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import NloraError
from .eval.plan import EVAL_PLANS
from .options import base_type as _base_type
from .options import MAX_INT, check_fields, coerce, field_name, public_name
from .paths import check_plain_name, folder_problem
from .tasks.benchmarks import BENCHMARK_CHOICES, check_benchmark_order, load_preset
from .tasks.data import UNKNOWN_LABEL_POLICIES
from .tasks.prompts import PROMPT_FORMATS

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_KINDS = ("auto", "seq2seq", "decoder", "encoder")
EVAL_MODES = ("generate", "score")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
TRAIN_FACTORS = ("both", "A", "B")
GRAD_MASKS = ("none", "migu")  # nlora.train.migu
# Keys that hold per-task lists of a core scalar (a scalar the user sets drops a preset's list).
CORE_PER_TASK_OF = {"epochs": "epochs_per_task", "max_new_tokens": "max_new_tokens_per_task"}
# free-text tasks (nlora.tasks.loading, nlora.tasks.freetext)
TASK_FORMATS = ("auto", "cl_benchmark", "trace", "superni")
PROMPT_STYLES = ("nlora", "trace")
DECODINGS = ("greedy", "sample")


def _opt(help: str, **kw) -> Any:
    default = kw.pop("default", dataclasses.MISSING)
    factory = kw.pop("default_factory", dataclasses.MISSING)
    meta = {"help": help, **kw}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(init=False)
class RunConfig:
    """Everything a run needs. Build it with `RunConfig(...)`, `RunConfig.from_dict(...)` or
    `load_config(path, overrides)`; `validate()` checks it and raises NloraError naming the bad key. Keywords
    that are not core fields are the method's options (`RunConfig(method="n-lora", lambda_=0.4)`), kept in
    `method_options` under their public names and readable as attributes (`config.lambda_`)."""

    # a preset of the papers' benchmarks (see `nlora presets`); its keys sit under the config file and the flags
    benchmark: str = _opt("start from a paper preset: standard (orders 1-3) or long (orders 4-6) with N-LoRA's "
                          "protocol, o-lora-standard (1-3) or o-lora-long (6) with O-LoRA's, trace (1) or superni "
                          "(1, 2) for free-text tasks; none: no preset",
                          default="none", choices=BENCHMARK_CHOICES)
    order: int | None = _opt("task order of the benchmark preset (standard: 1, 2, 3; long: 4, 5, 6; trace: 1; "
                             "superni: 1, 2)", default=None)

    # what to train
    model: str = _opt("hub name or local path of the base model, or a built-in tiny test model "
                      "(tiny-t5, tiny-llama, tiny-bert)", default=DEFAULT_MODEL)
    model_kind: str = _opt("seq2seq, decoder, encoder, or auto (from the model's config)", default="auto",
                           choices=MODEL_KINDS)
    method: str = _opt("continual-learning method (see `nlora methods`; `nlora methods NAME` lists its options)",
                       default="n-lora")
    method_module: list[str] = _opt("modules or .py files to import before the method is looked up: they register "
                                    "methods of your own with @nlora.register (also found through the "
                                    "'nlora.methods' entry-point group)", default_factory=list)
    tasks: list[str] = _opt("dataset names in training order", default_factory=list)
    data_dir: str | None = _opt("data folder: tasks in the CL_Benchmark layout <group>/<dataset>/{train,test,"
                                "labels}.json, TRACE's <task>/{train,eval,test}.json or SuperNI task files",
                                default=None)
    task_format: str = _opt("how the tasks are read: auto (a folder with labels.json is a classification task "
                            "of the CL_Benchmark layout, one of {\"prompt\", \"answer\"} records TRACE's layout, "
                            "a SuperNI task file SuperNI), cl_benchmark, trace or superni", default="auto",
                            choices=TASK_FORMATS)
    task_metrics: list[str] = _opt("TASK=METRIC for each task not scored by its default (classification: "
                                   "exact_match; SuperNI: rouge_l; TRACE's tasks: their paper's; other free-text "
                                   "tasks: rouge_l), e.g. MeetingBank=rouge_l,Py150=edit_similarity(py150_literals"
                                   "=true); metrics: nlora.tasks.scoring", default_factory=list)
    instructions: str | None = _opt("JSON file mapping task family or dataset name to an instruction (the "
                                    "reference's instruction_config.json is accepted as it is)",
                                    default=None)
    output_dir: str = _opt("run directory to write", default="runs/nlora")
    overwrite: bool = _opt("replace an existing run in output_dir", default=False)

    # prompts (nlora.tasks.prompts)
    prompt_format: str = _opt("nlora (own layout; long prompts lose the end of the text only) or reference (the "
                              "O-LoRA / N-LoRA code's prompts and truncation)", default="nlora",
                              choices=PROMPT_FORMATS)
    add_task_name: bool = _opt("reference prompt format: a 'Task:FAMILY' line in front", default=False)
    add_dataset_name: bool = _opt("reference prompt format: a 'Dataset:NAME' line in front", default=False)
    prompt_style: str = _opt("prompts of free-text tasks: nlora (the prompt, then answer_separator on TRACE's "
                             "prompts; over max_source_length the end of the input is cut) or trace (BOS + prompt "
                             "+ answer + EOS, no separator, the start of the prompt cut: TRACE's training)",
                             default="nlora", choices=PROMPT_STYLES)
    answer_separator: str = _opt("prompt style nlora: the text put between a TRACE prompt and its answer",
                                 default="\nAnswer: ")

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
    max_target_length: int = _opt("answer tokens trained on and, for classification, generated at evaluation",
                                  default=16)
    max_new_tokens: int | None = _opt("free-text tasks: tokens generated at evaluation (default: "
                                      "max_target_length)", default=None)
    max_new_tokens_per_task: list[float] | None = _opt("free-text tasks: one max_new_tokens per task in training "
                                                       "order (overrides max_new_tokens)", default=None)

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
    seed: int = _opt("random seed (sampling, shuffling, initialisation)", default=42, minimum=0)
    device: str = _opt("cpu, cuda, cuda:N, mps or auto", default="auto")
    threads: int | None = _opt("CPU threads of torch's operations (unset: OMP_NUM_THREADS if set, else half the "
                               "cores on a CPU run, which stays fast when another job shares the machine; "
                               "nlora.threads)", default=None, minimum=1)

    # LoRA
    lora_r: int = _opt("LoRA rank of each task's adapter", default=8)
    lora_alpha: float = _opt("LoRA alpha (scaling = alpha / r)", default=32.0)
    lora_dropout: float = _opt("LoRA dropout", default=0.1)
    target_modules: list[str] | None = _opt("module names to adapt (default: the attention query and value "
                                            "projections of the architecture)", default=None)

    train_factors: str = _opt("which LoRA factors of a new adapter train: both, A or B (the other stays at its "
                              "random initialisation: LoRA-FA trains B, RAC-LoRA's asymmetric step one of them)",
                              default="both", choices=TRAIN_FACTORS)

    grad_mask: str = _opt("none, or migu: in every task but the first, each trained LoRA factor updates only the "
                          "rows whose outputs had the largest summed magnitude over the optimizer step, the top "
                          "1 - migu_q of them (MIGU); any LoRA method", default="none", choices=GRAD_MASKS)
    migu_q: float = _opt("grad_mask migu: the quantile of a factor's row output magnitudes below which a row's "
                         "gradient is zeroed", default=0.7, minimum=0, maximum=1)

    # adapters
    fold_adapters: bool = _opt("fold the frozen adapters of a method that sums them all into one frozen LoRA "
                               "path (no dropout) after each task, so the cost per step stays flat in the number "
                               "of tasks; false keeps one path per task", default=True)

    # per-task schedule (O-LoRA's long-order script trains MNLI for 2 epochs)
    epochs_per_task: list[float] | None = _opt("one epoch count per task in training order (overrides epochs)",
                                               default=None)

    # evaluation
    eval_mode: str = _opt("generate: greedy generation scored by exact match (the papers' protocol); score: the "
                          "label option with the highest log-likelihood, one batched pass (encoders always score)",
                          default="generate", choices=EVAL_MODES)
    decoding: str = _opt("free-text tasks: greedy (default), or sample at `temperature` as TRACE's inference does "
                         "(scores then vary with the seed; seeded per batch, so a run is reproducible)",
                         default="greedy", choices=DECODINGS)
    temperature: float = _opt("decoding sample: the sampling temperature (TRACE: 0.1)", default=0.1)
    scoring_mode: str = _opt("standard, or trace_reference: the TRACE scripts' arithmetic (to compare with numbers "
                             "published from them; see nlora.tasks.scoring)", default="standard",
                             choices=("standard", "trace_reference"))
    bwt_denominator: str = _opt("t-1 (default: the mean over the tasks before the last) or t (TRACE, SAPT: the "
                                "same sum over T tasks)", default="t-1", choices=("t-1", "t"))
    eval_future: bool = _opt("also evaluate tasks not trained yet and the base model before training "
                             "(needed for forward transfer)", default=False)
    eval_plan: str = _opt("which rows of the accuracy matrix are evaluated: full (after every task; all metrics), "
                          "final (after the last task only: AP), every (after every eval_every-th task and the "
                          "last: AP and those rows)", default="full", choices=EVAL_PLANS)
    eval_every: int = _opt("eval_plan every: evaluate after tasks K, 2K, ... and the last", default=5)

    # general ability along the run (nlora.eval.general; pip install "nlora[general]")
    general_eval: list[str] = _opt("lm-eval benchmarks, as `nlora eval-general --tasks` takes them (e.g. "
                                   "mmlu,gsm8k): score the base model before the first task, then the model after "
                                   "tasks K, 2K, ... and the last (K = general_eval_every) into RUN_DIR/general.json; "
                                   "empty: off", default_factory=list)
    general_eval_every: int = _opt("general_eval: score after tasks K, 2K, ... and the last", default=1, minimum=1)
    general_eval_num_fewshot: int | None = _opt("general_eval: few-shot examples (default: each benchmark's own)",
                                                default=None, minimum=0)
    general_eval_limit: int | None = _opt("general_eval: only the first N examples of each benchmark (a smoke "
                                          "test, not comparable with full benchmarks)", default=None, minimum=1)
    general_eval_batch_size: int = _opt("general_eval: lm-eval's batch size", default=8, minimum=1)
    general_eval_include_path: str | None = _opt("general_eval: folder of lm-eval task YAML files of your own "
                                                 "(local data: dataset_path: json)", default=None)

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

    # the chosen method's options (public names); see nlora.options and `Method.Options`
    method_options: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    def __init__(self, **values: Any):
        fields = {f.name: f for f in dataclasses.fields(self)}
        method_options = dict(values.pop("method_options", None) or {})
        for name, f in fields.items():
            if name == "method_options":
                continue
            if name in values:
                setattr(self, name, values.pop(name))
            else:
                setattr(self, name, f.default_factory() if f.default_factory is not dataclasses.MISSING
                        else f.default)
        if isinstance(self.task_metrics, Mapping):  # the Python form of the TASK=METRIC items
            self.task_metrics = [f"{task}={metric}" for task, metric in self.task_metrics.items()]
        method_options.update({public_name(k): v for k, v in values.items()})  # RunConfig(lambda_=0.4)
        self.method_options = method_options

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("method_options") or {}
        if public_name(name) in options and not name.startswith("__"):
            return options[public_name(name)]
        raise AttributeError(f"RunConfig has no option {name!r}" + (
            f" (method '{self.__dict__.get('method')}' has no such option either)" if "method" in self.__dict__
            else ""))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config", lenient: set[str] = frozenset(),
                  saved_run: bool = False) -> "RunConfig":
        """Build from user-facing keys, coercing strings (CLI) and checking names and types; each key is a core
        option or an option of the chosen method (nlora.methods.split_method_options: a key of another method is
        an error naming it, unless in `lenient`, or, in a run's saved config.yaml, at its default)."""
        from .methods import split_method_options  # methods never import this module at run time: no cycle

        known = {f.name: f for f in config_fields()}
        core = {k: v for k, v in values.items() if field_name(k) in known}
        kwargs = {field_name(k): coerce(cls, known[field_name(k)], v, source) for k, v in core.items()}
        probe = cls(**{k: v for k, v in kwargs.items() if k in ("method", "method_module")})
        rest = {k: v for k, v in values.items() if field_name(k) not in known and k != "method_options"}
        rest.update(values.get("method_options") or {})
        try:
            _, options = split_method_options(probe.method, probe.method_module, rest, lenient, saved_run, source)
        except NloraError as e:  # named once: a value's error names its source already
            raise NloraError(str(e) if str(e).startswith(f"{source}: ") else f"{source}: {e}") from None
        return cls(**kwargs, method_options=options)

    def to_dict(self) -> dict[str, Any]:
        """The core keys, then the method's options, flat (config.yaml)."""
        core = {public_name(f.name): _plain(getattr(self, f.name)) for f in config_fields()}
        return {**core, **{k: _plain(v) for k, v in self.method_options.items()}}

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        """Check every option: the core ones here, the method's through its Options (nlora.methods.resolve, which
        also normalises `method_options` to the method's full set)."""
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
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                bad(key, f"must be >= 1 when set, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be a positive number, got {self.lr}")
        for key in ("epochs_per_task", "max_new_tokens_per_task"):
            values = getattr(self, key)
            if values is not None and len(values) != len(self.tasks):
                bad(key, f"has {len(values)} values for {len(self.tasks)} tasks")
            if values is not None and any(not (x >= 0 and math.isfinite(x)) for x in values):
                bad(key, f"values must be >= 0 and finite, got {values}")
            if values is not None and any(x < 1 or x != int(x) or x > MAX_INT for x in values):
                bad(key, f"values must be whole numbers from 1 to {MAX_INT}, got {values}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            bad("max_new_tokens", f"must be >= 1 when set, got {self.max_new_tokens}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            bad("temperature", f"must be a positive number, got {self.temperature}")
        self.metric_of_task()  # each TASK=METRIC names a task of the run and a metric
        if not self.checkpoint_steps >= 0:
            bad("checkpoint_steps", f"must be >= 0, got {self.checkpoint_steps}")
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
        check_fields(self, len(self.tasks))
        if self.eval_every < 1:
            bad("eval_every", f"must be >= 1, got {self.eval_every}")
        if self.load_in_4bit and self.load_in_8bit:
            bad("load_in_8bit", "excludes option 'load_in_4bit'; choose one quantization")
        if (self.load_in_4bit or self.load_in_8bit) and self.model in ("tiny-t5", "tiny-llama", "tiny-bert"):
            bad("load_in_4bit" if self.load_in_4bit else "load_in_8bit",
                f"the built-in '{self.model}' is built in memory, not loaded from weights; save it with "
                "save_pretrained and pass its folder as 'model'")
        # a .py file recorded as typed would not be found by `nlora predict` or `nlora resume` from another folder
        self.method_module = [str(Path(m).resolve()) if m.endswith(".py") else m for m in self.method_module]
        from .methods import resolve  # methods never import this module at run time: no cycle

        method = resolve(self)
        if any(not b.strip() for b in self.general_eval):
            bad("general_eval", f"an empty benchmark name in {self.general_eval}")
        if self.general_eval:
            from .eval.general import check_run_options

            check_run_options(self, method)
        check_benchmark_order(self.benchmark, self.order)
        from .tracking import check_trackers

        check_trackers(self.report_to)  # a tracker asked for but not installed fails here, before any work
        if self.data_dir is not None and folder_problem(self.data_dir):
            bad("data_dir", folder_problem(self.data_dir))
        if self.instructions is not None and not Path(self.instructions).is_file():
            bad("instructions", f"file {self.instructions} does not exist")
        return self


    def metric_of_task(self) -> dict[str, str]:
        """{task: canonical metric spec} of the tasks `task_metrics` names (the others take their default)."""
        from .tasks.scoring import parse_metric

        out = {}
        for item in self.task_metrics:
            task, eq, spec = (s.strip() for s in item.partition("="))
            if not eq or not task or not spec:
                raise NloraError(f"option 'task_metrics': {item!r} is not TASK=METRIC")
            if task not in self.tasks:
                raise NloraError(f"option 'task_metrics': task {task!r} is not one of the run's tasks "
                                 f"({', '.join(self.tasks)})")
            if task in out:
                raise NloraError(f"option 'task_metrics': task {task!r} is given twice")
            out[task] = str(parse_metric(spec, where=f"option 'task_metrics' of task {task!r}"))
        return out

    def max_new_tokens_of(self, k: int) -> int:
        """Tokens generated for free-text task k."""
        if self.max_new_tokens_per_task:
            return int(self.max_new_tokens_per_task[k])
        return self.max_new_tokens or self.max_target_length


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_fields() -> list[dataclasses.Field]:
    """The core options (method_options excluded)."""
    return [f for f in dataclasses.fields(RunConfig) if f.name != "method_options"]


def base_type(f: dataclasses.Field) -> type:
    return _base_type(RunConfig, f)


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
                defaults: dict[str, Any] | None = None, saved_run: bool = False) -> RunConfig:
    """RunConfig's defaults, then `defaults`, then the benchmark preset named by `benchmark`/`order` (wherever
    they are set), then the YAML file's keys, then `overrides` (e.g. the command line). The method's options are
    resolved against its Options: a preset's options of another method are dropped (a preset is for any method),
    the user's are an error naming the method that owns them. `saved_run`: the file is a run's config.yaml, where
    older releases recorded every method's options; those of other methods are dropped where they hold their
    defaults."""
    values: dict[str, Any] = dict(defaults or {})
    user: dict[str, Any] = {}
    if path is not None:
        file_values = load_yaml_file(path)
        RunConfig.from_dict(file_values, source=f"config file {path}", saved_run=saved_run)  # names the file
        user.update(file_values)
    user.update(overrides or {})
    preset = _resolve_preset({**values, **user}, user)
    return RunConfig.from_dict({**values, **preset, **user}, source="options", lenient=set(preset) - set(user),
                               saved_run=saved_run)


def _resolve_preset(merged: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """The preset's keys for the `benchmark` and `order` of `merged` (none without a benchmark). A scalar option
    the user sets (`lambda`, `epochs`, ...) replaces the preset's per-task list of it, unless the user sets that
    list too."""
    probe = RunConfig.from_dict({k: merged[k] for k in ("benchmark", "order", "method", "method_module")
                                 if k in merged}, source="options")
    if probe.benchmark == "none" and probe.order is None:
        return {}
    check_benchmark_order(probe.benchmark, probe.order)
    preset = load_preset(probe.benchmark, probe.order)
    from .methods import per_task_pairs

    for scalar, per_task in {**CORE_PER_TASK_OF, **per_task_pairs()}.items():
        if scalar in user and per_task not in user:
            preset.pop(per_task, None)
    if "tasks" in user and isinstance(preset.get("task_metrics"), dict):  # the metrics of the tasks kept
        tasks = RunConfig.from_dict({"tasks": user["tasks"]}, source="options").tasks
        preset["task_metrics"] = {t: m for t, m in preset["task_metrics"].items() if t in tasks}
    return {**preset, "benchmark": probe.benchmark, "order": probe.order}
