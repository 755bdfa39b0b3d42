"""`nlora predict RUN_DIR`: the predictions of the model a run trained (as it was after task K), on tasks of a
data folder (`--tasks`) or on the examples of a JSONL file (`--input`), written as JSONL. The model is rebuilt
from the run's saved adapters as the run itself rebuilds it on resume, and predicted with the evaluation code of
training (nlora.eval.evaluate.evaluate, the run's eval_mode), so on a run's own test examples it gives exactly the
predictions the run wrote.

An --input line: {"sentence": "...", "options": ["a", "b", ...]} plus, optionally, "label" (the gold answer:
then "correct" is reported), "task" (recorded; picks the adapter for methods that need the task id and, for a
task the run trained, the family and instruction its prompts were trained with, as run.json records them) and
"instruction" (the prompt's instruction; default: the task's, else a generic one).

A line of a free-text task: {"prompt": "..."} plus, optionally, "answer" (then its "score" with the task's
metric, where the run scored that task, else exact match) and "task"; the prompt takes the run's prompt style
(nlora: answer_separator after it; trace: as it is)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .adapters import ContinualAdapters, folding
from .config import RunConfig
from .errors import NloraError
from .eval.evaluate import evaluate, generation_of, scoring_of
from .full_model import FullModel
from .io import write_jsonl_atomic
from .models import Backbone, backbone_options, load_backbone
from .objectives import make_objective
from .provenance import recorded_tasks
from .rundir import RunPaths, read_metrics
from .trained_run import TrainedRun, read_run
from .runner import load_tasks
from .tasks.data import (GENERIC_INSTRUCTION, Example, TaskData, find_task_dir, load_instructions, task_family,
                   task_instruction)
from .tasks.prompts import TRACE_FORMAT, PromptSpec, build_prompt


def load_base(config: RunConfig, device: str = "cpu") -> Backbone:
    """The run's base model as the run loaded it (dtype, quantization, attention), for inference."""
    options = {**backbone_options(config), "gradient_checkpointing": False}
    return load_backbone(config.model, config.model_kind, config.trust_remote_code, device=device, **options)


def load_model(run: TrainedRun, device: str = "cpu", merge_fp32: bool = True) -> tuple[ContinualAdapters, object]:
    """The run's base model with its adapters after task `run.upto`, as (adapters, objective). A method that sums
    its adapters gets them folded as the run folded them (nlora.adapters: the same sum); `merge_fp32` False keeps
    the folded sum as its own LoRA path (the concat form) even where the run merged it into the weights. A method
    that trains the base gets its saved whole model."""
    config, method = run.config, run.method
    backbone = load_base(config, device)  # as the run loaded it, so the sum folds the way the run's did
    if method.trains == "base":  # the whole model saved after the phase (nlora.full_model)
        adapters = FullModel(backbone.model)
        adapters.load(method.adapter_name(run.phase), run.folders[-1])
    else:
        adapters = ContinualAdapters(backbone.model, backbone.kind, config.lora_r, config.lora_alpha,
                                     config.lora_dropout, config.target_modules, merge_fp32=merge_fp32)
        phases = [run.phase] if method.adapter_layout == "snapshot" else range(run.upto)
        for k, folder in zip(phases, run.folders):
            name = method.adapter_name(k)
            if name not in adapters.names:
                adapters.add(name)
            adapters.load(name, folder)
        if folding(method, config):  # as the run did: an unfolded run evaluated one path per task
            adapters.fold(dict(zip(adapters.names, run.folders)))
        for name, scale in zip(run.adapter_names, run.scales()):  # learned weights of the saved adapters
            if scale is not None:
                adapters.scale_by(name, scale)
    backbone.model.eval()
    objective = make_objective(backbone.kind, backbone.tokenizer, config.max_source_length,
                               config.max_target_length, config.eval_mode)
    return adapters, objective


def _task_index(run: TrainedRun, task: str | None) -> int:
    """The task index the method's active_for_eval gets: the run's index of the task; a method that sums all
    its adapters does not read it, one that needs the task id (per-task) must know the task."""
    trained = run.config.tasks[: run.upto]
    if task in trained:
        return trained.index(task)
    if run.method.needs_task_id:
        raise NloraError(f"method '{run.config.method}' needs the task id: task {task!r} is not one of the tasks "
                         f"the run trained up to task {run.upto} ({', '.join(trained)})")
    return run.phase


def task_prompt_source(run: TrainedRun, task: str, instructions: dict[str, str]) -> tuple[str, str | None]:
    """(family, instruction) that the run built task `task`'s prompts with: as its run.json records them; for a
    run written before that record, read from its data folder where that is still there. A task the run did not
    train: its name stands for its family, and no instruction is known."""
    recorded = recorded_tasks(run.root / "run.json").get(task)
    if isinstance(recorded, dict) and isinstance(recorded.get("instruction"), str):
        return recorded.get("family") or task, recorded["instruction"]
    data_dir = run.config.data_dir
    if task in run.config.tasks and data_dir and Path(data_dir).is_dir():
        try:
            family = task_family(data_dir, find_task_dir(data_dir, task), task)
            return family, task_instruction(instructions, family, task, run.config.prompt_format)
        except NloraError:
            pass
    return task, None


def read_input(path: str | Path, run: TrainedRun) -> list[tuple[Example, bool]]:
    """The examples of a JSONL file, each with whether it has a gold label; errors name the line. Prompts take
    the run's prompt format and, for a task the run trained, the family and instruction it trained with."""
    path = Path(path)
    spec = PromptSpec.of(run.config)
    instructions = load_instructions(run.config.instructions, spec.format)
    sources: dict[str, tuple[str, str | None]] = {}
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise NloraError(f"option --input: cannot read {path} ({e.strerror or e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NloraError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and "options" not in row:
            out.append(free_text_input(row, run, f"{path}:{n}"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("sentence"), str):
            raise NloraError(f"{path}:{n}: expected an object with a \"sentence\" string (and \"options\"), or "
                             "with a \"prompt\" string (a free-text task)")
        options = row.get("options")
        if not (isinstance(options, list) and options and all(isinstance(o, str) for o in options)):
            raise NloraError(f"{path}:{n}: \"options\" must be a non-empty list of strings (the labels to choose "
                             "from)")
        label, task = row.get("label"), row.get("task")
        if label is not None and not isinstance(label, str) or task is not None and not isinstance(task, str):
            raise NloraError(f"{path}:{n}: \"label\" and \"task\" must be strings when given")
        if task not in sources:
            sources[task] = task_prompt_source(run, task or "", instructions)
        family, known = sources[task]
        instruction = row.get("instruction") or (known if known is not None else
                                                 instructions.get(task or "") or GENERIC_INSTRUCTION)
        prompt = build_prompt(spec, instruction, family, task or "", tuple(options), row["sentence"])
        out.append((Example(task or "", row["sentence"], label or "", tuple(options), prompt, spec.format),
                    label is not None))
    if not out:
        raise NloraError(f"option --input: {path} holds no examples")
    return out


def free_text_input(row: dict, run: TrainedRun, where: str) -> tuple[Example, bool]:
    """A free-text --input line, {"prompt"} plus optionally "answer" and "task", in the run's prompt style."""
    answer, task = row.get("answer"), row.get("task")
    if answer is not None and not isinstance(answer, str) or task is not None and not isinstance(task, str):
        raise NloraError(f"{where}: \"answer\" and \"task\" must be strings when given")
    config, prompt = run.config, row["prompt"]
    if config.prompt_style == "trace":
        example = Example(task or "", prompt, answer or "", (), prompt, TRACE_FORMAT)
    else:
        example = Example(task or "", prompt, answer or "", (), prompt + config.answer_separator, "nlora")
    return example, answer is not None


def _input_task(run: TrainedRun, name: str, free_text: bool) -> TaskData:
    """What scoring and generation need of a task given only by --input lines: the run's metric for a task it
    scored, else exact match."""
    recorded = read_metrics(RunPaths(run.root)) or {}
    metric = (recorded.get("metrics") or {}).get(name, "exact_match")
    return TaskData(name, "trace" if free_text else name, run.root, [], "", [], [], metric=metric,
                    kind="free_text" if free_text else "classification")


def _task_settings(run: TrainedRun, task: TaskData):
    """(scoring, generation) of a task as the run evaluated it after task `run.upto`: its metric, its number of
    new tokens where the run trained it, the same sampling seed."""
    config = run.config
    j = config.tasks.index(task.name) if task.name in config.tasks else None
    if j is None and config.max_new_tokens_per_task:
        config = config.replace(max_new_tokens_per_task=None)
    return scoring_of(config, task), generation_of(config, task, j or 0, run.phase)


def predict_run(run_dir: str | Path, tasks: list[str] | None = None, data_dir: str | None = None,
                input_file: str | Path | None = None, upto: int | None = None, output: str | Path | None = None,
                batch_size: int | None = None, max_samples: int | None = None, device: str = "auto",
                progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Predict with the run's model after task `upto` (default: its last); returns the records (also written to
    `output` as JSONL, else to stdout; an existing `output` is replaced only with `overwrite`). Each record: task,
    input, prediction, and target/correct when known."""
    if (tasks is None) == (input_file is None):
        raise NloraError("give either --tasks (with the run's or another --data-dir) or --input FILE.jsonl")
    if output is not None and Path(output).exists() and not overwrite:
        raise NloraError(f"option --output: {output} already exists; choose another file or pass --overwrite")
    run = read_run(run_dir, upto)
    config = run.config
    groups: dict[str, list[tuple[int, Example, bool]]] = {}  # task → (position in the output, example, labelled)
    task_data: dict[str, TaskData] = {}
    if tasks is not None:
        data_dir = data_dir or config.data_dir
        if data_dir is None:
            raise NloraError("option --data-dir: the run records no data folder; give one")
        limit = config.max_eval_samples if max_samples is None else max_samples or None
        for name in tasks:
            _task_index(run, name)
        # read as the run read its tasks: prompt format, instructions, label policies, the same test subset
        kept_metrics = [m for m in config.task_metrics if m.partition("=")[0].strip() in tasks]
        loaded = load_tasks(config.replace(tasks=list(tasks), data_dir=data_dir, max_train_samples=1,
                                           max_eval_samples=limit, task_metrics=kept_metrics))
        position = 0
        for task in loaded:
            groups[task.name] = [(position + i, e, True) for i, e in enumerate(task.test)]
            task_data[task.name] = task
            position += len(task.test)
    else:
        for i, (example, labelled) in enumerate(read_input(input_file, run)):
            kind = "free text" if example.free_text else "classification"
            groups.setdefault(example.task, []).append((i, example, labelled))
            task_data.setdefault(example.task, _input_task(run, example.task, example.free_text))
            if (task_data[example.task].kind == "free_text") != example.free_text:
                raise NloraError(f"option --input: task {example.task!r} has both free-text and classification "
                                 f"lines (line {i + 1} is {kind}); give each task one kind")
        for task in groups:
            _task_index(run, task or None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    adapters, objective = load_model(run, device)
    records: dict[int, dict] = {}
    for task, items in groups.items():
        adapters.activate(run.method.active_for_eval(run.phase, _task_index(run, task or None), adapters.names))
        scoring, generation = _task_settings(run, task_data[task])
        _, rows = evaluate(objective, adapters.model, [e for _, e, _ in items], batch_size or config.eval_batch_size,
                           desc=f"predict {task or 'input'}", progress=progress, scoring=scoring,
                           generation=generation)
        for (position, _, labelled), row in zip(items, rows):
            record = {"task": task or None, **row}
            if not labelled:
                for key in ("target", "references", "correct", "score"):
                    record.pop(key, None)
            records[position] = record
    out = [records[i] for i in sorted(records)]
    if output is not None:
        write_jsonl_atomic(output, out)
    else:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    return out


def accuracy_lines(records: list[dict]) -> list[str]:
    """Per task, the score of the labelled records: its metric's where there is one ("score"), else the
    accuracy (exact match)."""
    by_task: dict[str, list[float]] = {}
    scored: set[str] = set()
    for r in records:
        task = r["task"] or "input"
        if "score" in r:
            scored.add(task)
            by_task.setdefault(task, []).append(float(r["score"]))
        elif "correct" in r:
            by_task.setdefault(task, []).append(100.0 * r["correct"])
    return [f"{task}: {sum(v) / len(v):.2f}{' (score)' if task in scored else '%'} of {len(v)}"
            for task, v in by_task.items()]
