"""The tasks of a run, of any kind, read before anything trains: classification tasks of the CL_Benchmark layout
(nlora.tasks.data) and free-text tasks in TRACE's layout or SuperNI task files (nlora.tasks.freetext), mixed in one sequence.

A task's format is declared (`task_format`) or detected per task (`auto`): a folder with labels.json is a
classification task; otherwise `<data>/<task>/train.json` (or `.jsonl`, also under `<data>/SuperNI/`) holding a
JSON object is a SuperNI task file, and one holding an array (or JSON lines) TRACE's {"prompt", "answer"} records.

Each task is scored with its own metric (nlora.tasks.scoring): `task_metrics` where it names the task, else the
default of its kind: exact_match for classification, TRACE's paper metric for TRACE's task names, rouge_l for
SuperNI and any other free-text task.

Free-text prompts take the run's `prompt_style`:
- `nlora`: a TRACE prompt followed by `answer_separator` (config.yaml records it); a SuperNI prompt ends with its
  own cue ("Output: "), so it gets none. Over max_source_length the end of the raw input is cut; the instruction
  and the separator stay.
- `trace`: the prompt as the data gives it, read as TRACE trains: BOS + prompt + answer + EOS, no separator, and
  over the limit the start of the prompt cut (nlora.tasks.prompts).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..errors import NloraError, did_you_mean
from ..paths import check_plain_name, folder_problem
from .data import TaskData, check_not_a_task_folder, load_instructions, load_task
from .freetext import load_superni_task, load_trace_task, split_file
from .prompts import PromptSpec
from .scoring import require_libraries

# The metric TRACE's paper reports for each of its tasks (BeyonderXX/TRACE metrics.py, evaluations/)
TRACE_METRICS = {
    "C-STANCE": "accuracy_raw", "FOMC": "accuracy_raw", "NumGLUE-cm": "accuracy_raw", "NumGLUE-ds": "accuracy_raw",
    "MeetingBank": "rouge_l", "Py150": "edit_similarity(py150_literals=true)", "ScienceQA": "first_char_accuracy",
    "20Minuten": "sari",
}
FREE_TEXT_METRIC = "rouge_l"
CLASSIFICATION_METRIC = "exact_match"


def detect_format(data_dir: str | Path, name: str) -> str:
    """cl_benchmark, trace or superni: how task `name` is stored in `data_dir`."""
    root = Path(data_dir)
    check_plain_name(name)
    if folder_problem(root):
        raise NloraError(f"data folder: {folder_problem(root)}")
    if any((c / "labels.json").is_file() for c in [root / name, *(p / name for p in root.iterdir() if p.is_dir())]):
        return "cl_benchmark"
    for folder in (root / name, root / "SuperNI" / name):
        train = split_file(folder, ("train",)) if folder.is_dir() else None
        if train is not None:
            return _format_of(train)
    if any((p / name / "train.json").is_file() for p in root.iterdir() if p.is_dir()):
        return "cl_benchmark"  # a classification task's group folder, its labels.json missing: its reader says so
    check_not_a_task_folder(root)
    # what `tasks` accepts: the dataset names, whatever folder (task family, SuperNI/) holds them
    classification = {p.name for p in root.glob("*/*") if (p / "labels.json").is_file()}
    free_text = {p.parent.name for p in [*root.glob("*/train.json*"), *root.glob("SuperNI/*/train.json*")]}
    available = sorted(classification | free_text)
    raise NloraError(f"task '{name}' not found in data folder {root}{did_you_mean(name, available)} (no "
                     f"{name}/labels.json of a classification task, no {name}/train.json or .jsonl of a free-text "
                     f"task); available: {', '.join(available) or 'none'}")


def _format_of(path: Path) -> str:
    """The format of a train split read from its start: a JSON object is a SuperNI task file; an array (or JSON
    lines) is TRACE's, unless its first record is a classification example (a CL_Benchmark task whose labels.json
    is missing, which that reader names)."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.suffix != ".jsonl" and head.startswith(b"{"):
        return "superni"
    first = head.split(b"}", 1)[0]
    if b'"sentence"' in first and b'"label"' in first and b'"prompt"' not in first:
        return "cl_benchmark"
    return "trace"


def default_metric(task: TaskData) -> str:
    if task.kind != "free_text":
        return CLASSIFICATION_METRIC
    if task.family == "trace":
        return TRACE_METRICS.get(task.name, FREE_TEXT_METRIC)
    return FREE_TEXT_METRIC


def styled(task: TaskData, style: str, separator: str) -> TaskData:
    """A free-text task's examples in a prompt style (see the module doc)."""
    def restyle(example):
        if style == "trace":
            return dataclasses.replace(example, prompt_format="trace")
        if task.family == "trace":
            return dataclasses.replace(example, prompt=example.prompt + separator, prompt_format="nlora")
        return dataclasses.replace(example, prompt_format="nlora")

    return dataclasses.replace(task, train=[restyle(e) for e in task.train], test=[restyle(e) for e in task.test],
                               dev=[restyle(e) for e in task.dev])


def load_one(config, name: str, metric: str | None, instructions: dict[str, str], prompt: PromptSpec) -> TaskData:
    fmt = config.task_format if config.task_format != "auto" else detect_format(config.data_dir, name)
    sizes = {"max_train": config.max_train_samples, "max_test": config.max_eval_samples, "seed": config.seed}
    if fmt == "cl_benchmark":
        policies = {"train": config.train_unknown_labels, "test": config.test_unknown_labels}
        task = load_task(config.data_dir, name, instructions, sizes["max_train"], sizes["max_test"], config.seed,
                         unknown_labels=policies, prompt=prompt)
    elif fmt == "trace":
        check_plain_name(name)
        task = load_trace_task(config.data_dir, name, metric or TRACE_METRICS.get(name, FREE_TEXT_METRIC), **sizes)
        task = styled(task, config.prompt_style, config.answer_separator)
    else:
        check_plain_name(name)
        task = load_superni_task(config.data_dir, name, metric or FREE_TEXT_METRIC, **sizes)
        task = styled(task, config.prompt_style, config.answer_separator)
    return dataclasses.replace(task, metric=metric or default_metric(task))


def load_run_tasks(config) -> list[TaskData]:
    """Every task of the run, read and checked; every task that cannot be read is named in one error (a data
    folder that lacks some of a preset's tasks or splits is refused at once, listing them all)."""
    if config.data_dir is None:
        raise NloraError("option 'data_dir': no data folder given (CL_Benchmark layout, TRACE's layout or SuperNI "
                         "task files)")
    instructions = load_instructions(config.instructions, config.prompt_format)
    prompt = PromptSpec.of(config)
    metrics = config.metric_of_task()
    tasks, problems = [], []
    for name in config.tasks:
        try:
            tasks.append(load_one(config, name, metrics.get(name), instructions, prompt))
        except NloraError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise NloraError(problems[0])
    if problems:
        raise NloraError(f"{len(problems)} of the {len(config.tasks)} tasks cannot be read from data folder "
                         f"{config.data_dir}:\n  " + "\n  ".join(problems))
    check_scoring(config, tasks)
    return tasks


def check_scoring(config, tasks: list[TaskData]) -> None:
    """What free-text tasks need of the options: generation (not score mode) and their metrics' libraries."""
    free = [t.name for t in tasks if t.kind == "free_text"]
    if free and config.eval_mode == "score":
        raise NloraError(f"option 'eval_mode': score picks one of a task's label options, and the free-text tasks "
                         f"{', '.join(free)} have none; use eval_mode generate")
    for t in tasks:
        require_libraries(t.metric, config.scoring_mode)


def check_model_kind(config, tasks: list[TaskData], kind: str) -> None:
    """Free-text answers need a model that generates; sampled decoding is announced as varying."""
    free = [t.name for t in tasks if t.kind == "free_text"]
    if free and kind == "encoder":
        raise NloraError(f"model '{config.model}' is an encoder, which only ranks label options; the free-text "
                         f"tasks {', '.join(free)} need a seq2seq or decoder model that generates")
    if free and config.decoding == "sample":
        print(f"nlora: warning: decoding 'sample' (temperature {config.temperature:g}, as TRACE's inference): the "
              "free-text tasks' scores vary with the seed by more than greedy decoding's; compare methods over "
              "several seeds, or with decoding greedy", file=sys.stderr)


def metric_columns(tasks: list[TaskData]) -> dict[str, str]:
    """{task: its metric}, what metrics.json records for the columns of the accuracy matrix."""
    return {t.name: t.metric for t in tasks}
