"""A continual-learning run: train the tasks one after another, evaluate after each, and write the run directory
(its contract: nlora.rundir).

The run directory is also the checkpoint: `run(config, resume=True)` reloads what is finished (adapters of
trained phases with the method's state after them, matrix rows of evaluated ones), continues a phase from its last
checkpoint, and ends with the same metrics.json as an uninterrupted run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import set_seed

from .adapters import ContinualAdapters, folding
from .config import RunConfig, load_config, load_yaml_file
from .errors import NloraError
from .eval.continual import summarize_run
from .eval.evaluate import evaluate, generation_of, scoring_of
from .eval.general import RunScoring
from .eval.plan import planned_rows
from .faults import fault_point
from .full_model import FullModel, resume_point
from .io import write_json_atomic, write_jsonl_atomic, write_yaml_atomic
from .method_state import load_state, save_state
from .methods import Method, MethodContext, resolve
from .models import Backbone, backbone_options, default_target_modules, load_backbone
from .objectives import make_objective
from .precision import check_runtime, warn_precision
from .preflight import preflight
from .provenance import collect as collect_provenance
from .provenance import check_config_digest, config_digest, record_run, warn_other_release
from .rundir import (RESUME_FREE_KEYS, check_output_dir, check_same_config, check_scored_as_configured,
                     declared_scales, prepare_output_dir, read_metrics, write_update_scales)
from .runlock import RunLock
from .tasks.data import TaskData
from .tasks.loading import check_model_kind, load_run_tasks, metric_columns
from .tasks.prompts import check_prompt_budget
from .threads import use_threads
from .tracking import RunLogger
from .train.checkpoint import load_checkpoint, remove_checkpoint
from .train.engine import make_accelerator, shard_model
from .train.loop import train_task

SCHEMA_VERSION = 1


def load_tasks(config: RunConfig) -> list[TaskData]:
    """Read and validate every task before any training starts, so bad data fails in seconds (nlora.tasks.loading:
    classification and free-text tasks)."""
    return load_run_tasks(config)


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


def build_metrics(config: RunConfig, method: Method, tasks: list[TaskData], matrix, phases_done: list[int],
                  baseline, train_stats: dict, eval_seconds: dict, fold_form: str | None = None) -> dict:
    summary = summarize_run(matrix, phases_done, baseline, config.eval_plan != "full", config.bwt_denominator)
    return {
        "schema_version": SCHEMA_VERSION,
        "method": config.method,
        "model": config.model,
        "seed": config.seed,
        "tasks": [t.name for t in tasks],
        # the metric of each column of the matrix (nlora.tasks.scoring), and how the scores and BWT were computed
        "metrics": metric_columns(tasks),
        "scoring_mode": config.scoring_mode,
        "bwt_denominator": config.bwt_denominator,
        "accuracy_matrix": matrix,
        "average_accuracy": summary.get("average_accuracy"),
        "bwt": summary.get("bwt"),
        "fwt": summary.get("fwt"),
        "forgetting": summary.get("forgetting"),
        "baseline_accuracy": baseline,
        "phases": method.phases(len(tasks)),
        "phases_completed": phases_done,
        "complete": phases_done == method.phases(len(tasks)),
        "adapter_layout": method.adapter_layout,
        "fold_form": fold_form,  # how the frozen adapters are folded (nlora.adapters): merge, concat, or none yet
        "train": train_stats,
        "eval_seconds": eval_seconds,
        "eval_mode": config.eval_mode,
        "eval_plan": config.eval_plan if config.eval_plan != "every" else f"every {config.eval_every}",
        "n_train": [len(t.train) for t in tasks],
        "n_test": [len(t.test) for t in tasks],
        # examples whose label is not in labels.json, kept by the label policy (scored as wrong when tested)
        "unknown_labels": {t.name: t.unknown_labels for t in tasks if t.unknown_labels},
    }


def run(config: RunConfig, progress: bool = True, resume: bool = False) -> dict:
    """Run a whole continual-learning sequence; returns the final metrics (also in RUN_DIR/metrics.json).
    With `resume`, continue the run in `config.output_dir` from where it stopped."""
    threads = torch.get_num_threads()  # the run sets its own (nlora.threads); the caller's comes back after it
    try:
        with RunLock() as lock:  # taken before the first change to the run directory, released however it ends
            return _run(config, progress, resume, lock)
    finally:
        torch.set_num_threads(threads)


def _run(config: RunConfig, progress: bool, resume: bool, lock: RunLock) -> dict:
    config.validate()
    check_runtime(config)
    tasks = load_tasks(config)
    method = resolve(config)
    paths = check_output_dir(config, resume)
    # Before loading: each process loads the base straight onto its own device.
    accelerator = make_accelerator(config)
    use_threads(config.threads, accelerator.device)

    set_seed(config.seed)
    backbone = load_backbone(config.model, config.model_kind, config.trust_remote_code, device=accelerator.device,
                             **backbone_options(config))
    warn_precision(backbone.kind, backbone.dtype, config.mixed_precision)
    resolved = config.replace(model_kind=backbone.kind, dtype=backbone.dtype,
                              attn_implementation=backbone.attn_implementation,
                              target_modules=resolve_target_modules(config, backbone))
    check_prompt_budget(backbone.tokenizer, tasks, config.max_source_length, backbone.kind)
    check_model_kind(resolved, tasks, backbone.kind)
    previous = read_metrics(paths) if resume else None
    if previous:
        check_scored_as_configured(previous, config, paths.metrics)
    if resume:
        saved = load_config(paths.config, {"output_dir": config.output_dir}, saved_run=True).to_dict()
        check_same_config(saved, resolved.to_dict(), paths.config)
        check_config_digest(paths.root / "run.json", load_yaml_file(paths.config), paths.config, RESUME_FREE_KEYS)
        if accelerator.is_main_process:
            warn_other_release(paths.root / "run.json")
    preflight(resolved, method, backbone, resolved.target_modules, accelerator.num_processes)
    general = RunScoring(resolved, paths.root, resume, accelerator, backbone, method.phases(len(tasks))) \
        if config.general_eval else None  # its benchmarks load here: a bad one fails before anything is written
    # Every process has checked the output dir above; one changes it, once everything above has passed.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        lock.acquire(paths.root)  # a second writer is refused here, having written nothing
        prepare_output_dir(config, resume)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # versions, devices, data hashes (the slow part: done first, so that config.yaml and run.json, which a
        # resume needs both of, are written one right after the other)
        provenance = collect_provenance(tasks, config.instructions, accelerator.device, accelerator.num_processes)
        if not resume:  # overwrite was an instruction to this invocation; saved, `nlora resume` would refuse
            write_yaml_atomic(paths.config, resolved.replace(overwrite=False).to_dict())
        record_run(paths.root / "run.json", provenance, resume,  # with the digest of config.yaml as it reads back
                   config_digest(load_yaml_file(paths.config), RESUME_FREE_KEYS))
    # flushed line by line, so a crash loses nothing: closed (and the trackers finished) when the run ends
    logger = RunLogger(paths.root, accelerator, [t.name for t in tasks]).start(resolved.to_dict(), resumed=resume)

    if method.trains == "base":  # every base parameter trains; a phase saves the whole model (nlora.full_model)
        adapters = FullModel(backbone.model, keep_every_phase=method.keeps_saved())
    else:
        adapters = ContinualAdapters(backbone.model, backbone.kind, config.lora_r, config.lora_alpha,
                                     config.lora_dropout, resolved.target_modules)
    objective = make_objective(backbone.kind, backbone.tokenizer, config.max_source_length,
                               config.max_target_length, config.eval_mode)
    shard_model(backbone.model, accelerator, config)  # before any adapter: adapters stay whole (nlora.train.engine)
    ctx = MethodContext(resolved, adapters, objective, accelerator, tasks, paths.root)
    method.setup(ctx)
    n = len(tasks)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    phases_done: list[int] = []
    train_stats: dict[str, dict] = {}
    eval_seconds: dict[str, float] = {}
    baseline = None
    if previous:
        matrix = previous["accuracy_matrix"]
        phases_done = list(previous["phases_completed"])
        train_stats, eval_seconds = previous["train"], previous["eval_seconds"]
        baseline = previous.get("baseline_accuracy")

    def save_metrics() -> dict:
        metrics = build_metrics(config, method, tasks, matrix, phases_done, baseline, train_stats, eval_seconds,
                                adapters.fold_form)
        if accelerator.is_main_process:
            write_json_atomic(paths.metrics, metrics)
        return metrics

    def evaluate_into(k: int, j: int, names: list[str], label: str) -> float:
        adapters.activate(method.active_for_eval(k, j, names)) if adapters.peft_model else None
        start = time.perf_counter()
        acc, records = evaluate(objective, adapters.model, tasks[j].test, config.eval_batch_size, accelerator,
                                desc=f"{label} eval {tasks[j].name}", progress=progress,
                                scoring=scoring_of(config, tasks[j]), generation=generation_of(config, tasks[j], j, k))
        if accelerator.is_main_process:
            write_jsonl_atomic(paths.predictions(k, tasks[k].name, tasks[j].name) if k >= 0
                               else paths.base_predictions(tasks[j].name), records)
        logger.log_eval(k, tasks[j].name, round(acc, 4), len(records), time.perf_counter() - start, tasks[j].metric)
        return round(acc, 4)

    if previous is None:  # the phases and sizes on disk from the start: `nlora status` reads them, not the method
        save_metrics()
    if config.eval_future and baseline is None:  # the base model's score: the reference of forward transfer
        logger.eval_begin(-1)
        baseline = [evaluate_into(-1, j, [], "[base]") for j in range(n)]
        save_metrics()

    if general is not None:  # the base model, the reference of ΔG
        general.score(0, adapters, [])

    eval_rows = planned_rows(config.eval_plan, config.eval_every, method.phases(n))
    # a method that trains the base may keep only the latest phase's model: a resumed run starts from it
    resume_from = resume_point({k: paths.adapter(k, tasks[k].name) for k in method.phases(n)}, method.keeps_saved(),
                               accelerator.is_main_process) if method.trains == "base" else None
    for k in method.phases(n):
        if resume_from is not None and k < resume_from:  # trained and evaluated; a later saved model supersedes it
            continue
        label = f"[{k + 1}/{n}]"
        set_seed(config.seed + k)
        name = method.adapter_name(k)
        adapter_dir = paths.adapter(k, tasks[k].name)
        added = name not in adapters.names
        if added:
            adapters.add(name, factors=method.train_factors(k))
        if adapter_dir.is_dir():  # trained before the run stopped: the adapter and the method's state after it
            adapters.load(name, adapter_dir)
            state = load_state(adapter_dir)
            if state is not None:
                method.load_state_dict(state)
            if accelerator.is_main_process:  # killed between saving the phase and removing its checkpoint
                remove_checkpoint(paths.root, done_phase=k)
        else:
            hook_start = time.perf_counter()
            if added:
                method.init_adapter(k, ctx)
            adapters.activate(method.active_for_training(k, adapters.names), trainable=name,
                              factors=method.train_factors(k))
            method.before_task(k, ctx)
            before_seconds = time.perf_counter() - hook_start
            checkpoint = load_checkpoint(paths.root) if resume else None
            if checkpoint is not None and checkpoint[0].phase != k:
                checkpoint = None
            phase_config = config.replace(epochs=int(config.epochs_per_task[k])) if config.epochs_per_task \
                else config
            stats = train_task(adapters, objective, method, method.training_examples(tasks, k), phase_config, k,
                               accelerator, run_dir=paths.root, resume=checkpoint,
                               desc=f"{label} train {tasks[k].name}", progress=progress, logger=logger, ctx=ctx)
            hook_start = time.perf_counter()
            method.after_task(k, ctx)
            hooks = {"before_task": round(before_seconds, 3), "after_task": round(time.perf_counter() - hook_start, 3)}
            train_stats[tasks[k].name] = {**stats.to_dict(), "hook_seconds": hooks}
            if accelerator.is_main_process:
                state = method.state_dict()
                # the training stats first: a run killed after the adapter is saved does not train the phase again
                save_metrics()
                adapters.save(name, adapter_dir, extra=lambda folder: save_method_files(method, k, state, folder))
                remove_checkpoint(paths.root)
            accelerator.wait_for_everyone()
            fault_point("task_trained")
        if folding(method, config):  # the frozen adapters become one path, rebuilt from the saved files
            adapters.fold({method.adapter_name(j): paths.adapter(j, tasks[j].name) for j in range(k + 1)})
        if general is not None:  # the model as the run evaluates it after this task
            general.score(k + 1, adapters, method.active_for_eval(k, k, adapters.names))
        if k in phases_done:
            continue
        start = time.perf_counter()
        columns = range(n) if config.eval_future else range(k + 1)
        if k not in eval_rows:  # not in the evaluation plan: the row stays null
            columns = range(0)
        logger.eval_begin(k)
        for j in columns:
            matrix[k][j] = evaluate_into(k, j, adapters.names, label)
        if columns:
            eval_seconds[tasks[k].name] = round(time.perf_counter() - start, 3)
        phases_done.append(k)
        save_metrics()
    metrics = save_metrics()
    if metrics["complete"]:
        logger.log_summary(metrics)
    logger.close()
    if accelerator.is_main_process and metrics["complete"]:
        write_diagnostics(paths.root)
    return metrics


def save_method_files(method, k: int, state: dict, folder: Path) -> None:
    """What a method saves beside its adapter of phase k: its state, and the learned weight of each adapter in the
    model after phase k where it declares one (read by readers that do not load the method, e.g. diagnostics)."""
    save_state(state, folder)
    if method.has_hook("update_scales") and method.adapter_layout == "stacked":
        write_update_scales(folder, declared_scales(method, k))


def write_diagnostics(root: Path) -> None:
    """diagnostics.json of a complete run. The run itself is already on disk, so a failure here only warns."""
    from .analysis.diagnostics import diagnose_run

    try:
        diagnose_run(root)
    except (NloraError, OSError) as e:
        print(f"nlora: warning: parameter diagnostics not written ({e}); retry with `nlora diagnose {root}`",
              file=sys.stderr)
