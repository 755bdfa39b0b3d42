"""A continual-learning run: train the tasks one after another, evaluate every task seen so far after each, and
write the run directory.

Run directory (the contract every feature writes into):
    config.yaml                         the fully resolved configuration
    metrics.json                        accuracy matrix and summary metrics, rewritten after each task
    adapters/<k>-<task>/                task k's adapter (PEFT format)
    predictions/<k>-<task>/<task>.jsonl predictions on each evaluated task after training task k
Every file is written atomically.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from .adapters import ContinualAdapters
from .config import RunConfig
from .data import TaskData, load_instructions, load_task
from .errors import NloraError
from .evaluation import evaluate
from .io import write_json_atomic, write_jsonl_atomic, write_yaml_atomic
from .methods import Method, get_method
from .metrics import summarize
from .models import Backbone, default_target_modules, load_backbone
from .objectives import make_objective
from .training import make_accelerator, train_task

SCHEMA_VERSION = 1
RUN_ENTRIES = ("config.yaml", "metrics.json", "diagnostics.json", "adapters", "predictions", "report")


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def adapter(self, k: int, task: str) -> Path:
        return self.root / "adapters" / f"{k}-{task}"

    def predictions(self, k: int, train_task: str, eval_task: str) -> Path:
        return self.root / "predictions" / f"{k}-{train_task}" / f"{eval_task}.jsonl"


def load_tasks(config: RunConfig) -> list[TaskData]:
    """Read and validate every task before any training starts, so bad data fails in seconds."""
    if config.data_dir is None:
        raise NloraError("option 'data_dir': no data folder given (a folder in the CL_Benchmark layout)")
    instructions = load_instructions(config.instructions)
    return [load_task(config.data_dir, name, instructions, config.max_train_samples, config.max_eval_samples,
                      config.seed) for name in config.tasks]


def prepare_output_dir(config: RunConfig) -> RunPaths:
    root = Path(config.output_dir)
    existing = [e for e in RUN_ENTRIES if (root / e).exists()]
    if existing and not config.overwrite:
        raise NloraError(f"output dir {root} already holds a run ({', '.join(existing)}); choose another "
                         "'output_dir' or pass --overwrite to replace it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".nlora-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise NloraError(f"output dir {root} is not writable: {e.strerror}") from None
    for entry in existing:  # --overwrite: remove only what a run writes
        path = root / entry
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return RunPaths(root)


def resolve_target_modules(config: RunConfig, backbone: Backbone) -> list[str]:
    targets = config.target_modules or default_target_modules(backbone.model_type)
    names = [n for n, _ in backbone.model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise NloraError(f"option 'target_modules': {missing} not found in model '{config.model}'; "
                         f"its linear layers are named {', '.join(linear)}")
    return list(targets)


def build_metrics(config: RunConfig, method: Method, tasks: list[TaskData], matrix, train_stats: list[dict],
                  eval_seconds: list[float]) -> dict:
    done = len(train_stats)  # a partial run is summarised over the tasks trained so far
    summary = summarize([row[:done] for row in matrix[:done]])
    return {
        "schema_version": SCHEMA_VERSION,
        "method": config.method,
        "model": config.model,
        "seed": config.seed,
        "tasks": [t.name for t in tasks],
        "accuracy_matrix": matrix,
        "average_accuracy": summary["average_accuracy"],
        "bwt": summary["bwt"],
        "forgetting": summary.get("forgetting"),
        "tasks_completed": len(train_stats),
        "adapter_layout": method.adapter_layout,
        "train": train_stats,
        "eval_seconds": eval_seconds,
    }


def run(config: RunConfig, progress: bool = True) -> dict:
    """Run a whole continual-learning sequence; returns the final metrics (also in RUN_DIR/metrics.json)."""
    config.validate()
    tasks = load_tasks(config)
    method = get_method(config.method)(config)
    paths = prepare_output_dir(config)

    set_seed(config.seed)
    backbone = load_backbone(config.model, config.model_kind, config.trust_remote_code)
    target_modules = resolve_target_modules(config, backbone)
    resolved = config.replace(model_kind=backbone.kind, target_modules=target_modules)
    write_yaml_atomic(paths.config, resolved.to_dict())

    accelerator = make_accelerator(config)
    adapters = ContinualAdapters(backbone.model, backbone.kind, config.lora_r, config.lora_alpha,
                                 config.lora_dropout, target_modules)
    objective = make_objective(backbone.kind, backbone.tokenizer, config.max_source_length,
                               config.max_target_length)
    n = len(tasks)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    train_stats: list[dict] = []
    eval_seconds: list[float] = []
    metrics: dict = {}
    for k, task in enumerate(tasks):
        set_seed(config.seed + k)
        name = method.adapter_name(k)
        if name in adapters.names:
            adapters.activate(adapters.names, trainable=name)
        else:
            adapters.add(name)
        stats = train_task(adapters, objective, method, task.train, config, k, accelerator,
                           desc=f"[{k + 1}/{n}] train {task.name}", progress=progress)
        train_stats.append({"task": task.name, **stats.to_dict()})
        if accelerator.is_main_process:
            adapters.save(name, paths.adapter(k, task.name))
        start = time.perf_counter()
        for j in range(k + 1):
            acc, records = evaluate(objective, adapters.model, tasks[j].test, config.eval_batch_size,
                                    accelerator.device, desc=f"[{k + 1}/{n}] eval {tasks[j].name}",
                                    progress=progress)
            matrix[k][j] = round(acc, 4)
            if accelerator.is_main_process:
                write_jsonl_atomic(paths.predictions(k, task.name, tasks[j].name), records)
        eval_seconds.append(round(time.perf_counter() - start, 3))
        metrics = build_metrics(config, method, tasks, matrix, train_stats, eval_seconds)
        if accelerator.is_main_process:
            write_json_atomic(paths.metrics, metrics)
    return metrics
