"""Tasks whose answers are free text, read as the generative continual-learning benchmarks ship them.

TRACE's layout (BeyonderXX/TRACE; TreeLoRA's 24-task set and LLMCL read the same): a folder per task,
`<root>/<Task>/{train,eval,test}.json`, each a JSON array of {"prompt": str, "answer": str} records (or the same
records one per line, `.jsonl`; `dev` may stand for `eval`). The instruction is inside the prompt: the example's
`sentence`, the raw input that SARI compares against, is the prompt without its task's instruction prefix
(`TRACE_PROMPT_PREFIXES`, the prefix given, or the lines all its training prompts share), or the whole prompt when it does not start with it. The prompt is
used as it is, with no separator before the answer, as TRACE trains; its examples carry prompt format "trace".

SuperNI task files as SAPT and GainLoRA use them: `<root>/<task>/{train,dev,test}.json` (or under
`<root>/SuperNI/`), each a whole Natural Instructions task object, of which `Definition` (a list of strings, the
first one used, or a string) and `Instances` ([{"id", "input", "output"}]) are read. The prompt is SAPT's
zero-shot one (src/cl_dataset.py): "Definition: {definition}\\n\\nNow complete the following example -\\n
Input: {input}\\nOutput: ". An output that is a list of answers is trained on one of them, picked at random as
SAPT does but reproducibly from the seed; all of them are the example's references. Over the length limit such a
prompt loses the end of its input, as nlora's own format does (prompt format "nlora").

Both give the `TaskData` / `Example` objects of nlora.tasks.data, with no label options, `kind` "free_text" and the
task's metric (a nlora.tasks.scoring spec).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..errors import NloraError
from .data import Example, TaskData, _read_json, _subsample
from .scoring import parse_metric

# TRACE's instruction prefix of each task (inference/ICL.py TASK_PROMT): its prompts start with it
TRACE_PROMPT_PREFIXES = {
    "C-STANCE": "判断以下文本对指定对象的态度，选择一项：A.支持，B.反对，C.中立。输出A，B或者C。\n",
    "FOMC": "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral. "
            "Choose one from A, B and C.\n",
    "MeetingBank": "Write a summary of the following meeting transcripts.\n",
    "Py150": "Continue writing the code.\n",
    "ScienceQA": "Choose an answer for the following question and give your reasons.\n\n",
    "NumGLUE-cm": "Solve the following math problem.\n",
    "NumGLUE-ds": "Solve the following math problem.\n",
    "20Minuten": "Provide a simplified version of the following paragraph in German.\n\n",
}
# split -> the file names that hold it, in the order they are looked for
TRACE_SPLIT_FILES = {"train": ("train",), "dev": ("eval", "dev"), "test": ("test",)}
SUPERNI_SPLIT_FILES = {"train": ("train",), "dev": ("dev",), "test": ("test",)}
TRACE_FORMAT = "trace"
SUPERNI_FORMAT = "nlora"


# ----------------------------------------------------------------------------------------------------- locating


def find_freetext_task_dir(data_dir: str | Path, name: str, group: str | None = None) -> Path:
    """`<data_dir>/<name>` or `<data_dir>/<group>/<name>` holding a train split; an error listing the tasks there
    otherwise."""
    root = Path(data_dir)
    if not root.is_dir():
        raise NloraError(f"data folder {root} does not exist")
    for folder in [root / name] + ([root / group / name] if group else []):
        if _has_split(folder, "train"):
            return folder
    available = sorted(p.name for p in root.iterdir() if _has_split(p, "train"))
    if group and (root / group).is_dir():
        available += sorted(f"{group}/{p.name}" for p in (root / group).iterdir() if _has_split(p, "train"))
    raise NloraError(f"task '{name}' not found in data folder {root} (no {name}/train.json or .jsonl); "
                     f"available: {', '.join(available) or 'none'}")


def _has_split(folder: Path, stem: str) -> bool:
    return folder.is_dir() and any((folder / f"{stem}{ext}").is_file() for ext in (".json", ".jsonl"))


def split_file(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """The one file of a split (`<stem>.json` or `.jsonl`, for the first stem present); None if there is none."""
    for stem in stems:
        found = [folder / f"{stem}{ext}" for ext in (".json", ".jsonl") if (folder / f"{stem}{ext}").is_file()]
        if len(found) > 1:
            raise NloraError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one")
        if found:
            return found[0]
    return None


def _split_files(folder: Path, layout: dict[str, tuple[str, ...]], require_dev: bool) -> dict[str, Path | None]:
    files = {split: split_file(folder, stems) for split, stems in layout.items()}
    for split in ("test", "dev") if require_dev else ("test",):
        if files[split] is None:
            names = " or ".join(f"{s}.json" for s in layout[split])
            raise NloraError(f"{folder}: no {names} (the task's {split} split)")
    return files


# ----------------------------------------------------------------------------------------------------- TRACE


def read_records(path: Path) -> list:
    """A JSON array, or one JSON value per non-blank line for `.jsonl`."""
    if path.suffix != ".jsonl":
        return _read_json(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise NloraError(f"{path}: not UTF-8 text ({e})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise NloraError(f"{path}: record {len(records)} (line {number}) is malformed JSON at column "
                             f"{e.colno}: {e.msg}") from None
    return records


def read_trace_split(path: str | Path) -> list[dict[str, str]]:
    """The {"prompt", "answer"} records of one split file, checked: a non-empty array of objects whose prompt is a
    non-blank string and whose answer is a string (it may be empty, as in TRACE's unanswered prompt sets)."""
    path = Path(path)
    rows = read_records(path)
    if not isinstance(rows, list):
        raise NloraError(f"{path}: expected a JSON array of {{\"prompt\", \"answer\"}} objects")
    if not rows:
        raise NloraError(f"{path}: the split is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise NloraError(f"{path}: record {i} is not an object")
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str):
                found = "no such field" if key not in row else f"{type(row[key]).__name__} {row[key]!r}"
                raise NloraError(f"{path}: record {i} has no string field '{key}' ({found})")
        if not row["prompt"].strip():
            raise NloraError(f"{path}: record {i} has an empty 'prompt'")
    return rows


def trace_example(task: str, row: dict[str, str], prefix: str) -> Example:
    prompt = row["prompt"]
    source = prompt[len(prefix):] if prefix and prompt.startswith(prefix) else prompt
    return Example(task, source, row["answer"], (), prompt, TRACE_FORMAT)


def shared_instruction(prompts: list[str]) -> str:
    """The instruction every prompt starts with, as far as it can be told: the prompts' longest common prefix, up
    to and including its last line break ("" where they share no whole line, or for fewer than two prompts)."""
    if len(prompts) < 2:
        return ""
    common = os.path.commonprefix(prompts)
    return common[: common.rfind("\n") + 1]


def load_trace_task(data_dir: str | Path, name: str, metric: str = "exact_match", prefix: str | None = None,
                    max_train: int | None = None, max_dev: int | None = None, max_test: int | None = None,
                    seed: int = 0, require_dev: bool = False) -> TaskData:
    """Read one task of TRACE's layout. `metric` is a nlora.tasks.scoring spec; `prefix` the instruction that starts its
    prompts (default: TRACE's own for its task names, else the lines all its training prompts start with,
    `shared_instruction`). `require_dev`: refuse a task without eval.json, as some releases lack it. Subsamples
    are deterministic from (seed, task, split), as for classification tasks."""
    spec = parse_metric(metric, where=f"task '{name}' metric")
    folder = find_freetext_task_dir(data_dir, name)
    files = _split_files(folder, TRACE_SPLIT_FILES, require_dev)
    rows = {split: read_trace_split(files[split]) if files[split] else [] for split in TRACE_SPLIT_FILES}
    if prefix is None:
        prefix = TRACE_PROMPT_PREFIXES.get(name) or shared_instruction([r["prompt"] for r in rows["train"]])
    splits = {}
    for split, limit in (("train", max_train), ("dev", max_dev), ("test", max_test)):
        kept = _subsample(rows[split], limit, seed, f"{name}/{split}")
        splits[split] = [trace_example(name, row, prefix) for row in kept]
    return TaskData(name, "trace", folder, [], prefix, splits["train"], splits["test"], dev=splits["dev"],
                    metric=str(spec), kind="free_text", files=[f for f in files.values() if f])


# ----------------------------------------------------------------------------------------------------- SuperNI


def superni_prompt(definition: str, text: str) -> str:
    """SAPT's zero-shot prompt (no positive examples)."""
    return (f"Definition: {definition.strip()}\n\n"
            f"Now complete the following example -\nInput: {text}\nOutput: ")


def read_superni_file(path: str | Path) -> tuple[str, list[dict]]:
    """(definition, instances) of a SuperNI task file, checked: a definition string (or a non-empty list of
    them, the first one used) and a non-empty list of instances with a string input and an output that is a
    string or a non-empty list of strings."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise NloraError(f"{path}: expected a SuperNI task object with 'Definition' and 'Instances'")
    definition = data.get("Definition")
    if isinstance(definition, list) and definition:
        definition = definition[0]
    if not isinstance(definition, str) or not definition.strip():
        raise NloraError(f"{path}: 'Definition' must be a non-empty string or a list whose first item is one")
    instances = data.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise NloraError(f"{path}: 'Instances' must be a non-empty list")
    for i, inst in enumerate(instances):
        where = f"{path}: Instances[{i}]"
        if isinstance(inst, dict) and "id" in inst:
            where += f" (id {inst['id']!r})"
        if not isinstance(inst, dict):
            raise NloraError(f"{where} is not an object")
        if not isinstance(inst.get("input"), str):
            raise NloraError(f"{where} has no string field 'input'")
        output = inst.get("output")
        outputs = [output] if isinstance(output, str) else output
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise NloraError(f"{where}: 'output' must be a string or a non-empty list of strings")
    return definition, instances


def superni_example(task: str, definition: str, instance: dict, rng: random.Random) -> Example:
    output = instance["output"]
    outputs = (output,) if isinstance(output, str) else tuple(output)
    label = outputs[0] if len(outputs) == 1 else rng.choice(outputs)
    return Example(task, instance["input"], label, (), superni_prompt(definition, instance["input"]),
                   SUPERNI_FORMAT, outputs if len(outputs) > 1 else ())


def load_superni_task(data_dir: str | Path, name: str, metric: str = "rouge_l", max_train: int | None = None,
                      max_dev: int | None = None, max_test: int | None = None, seed: int = 0,
                      require_dev: bool = False) -> TaskData:
    """Read one SuperNI task (`<data_dir>/<name>/` or `<data_dir>/SuperNI/<name>/`). Default metric: ROUGE-L with
    the Google tokenizer and stemming, as SAPT scores every SuperNI task."""
    spec = parse_metric(metric, where=f"task '{name}' metric")
    folder = find_freetext_task_dir(data_dir, name, group="SuperNI")
    files = _split_files(folder, SUPERNI_SPLIT_FILES, require_dev)
    splits, definition = {}, ""
    for split, limit in (("train", max_train), ("dev", max_dev), ("test", max_test)):
        if files[split] is None:
            splits[split] = []
            continue
        definition, instances = read_superni_file(files[split])
        rng = random.Random(f"{seed}/{name}/{split}/outputs")
        examples = [superni_example(name, definition, inst, rng) for inst in instances]
        splits[split] = _subsample(examples, limit, seed, f"{name}/{split}")
    return TaskData(name, "superni", folder, [], definition, splits["train"], splits["test"], dev=splits["dev"],
                    metric=str(spec), kind="free_text", files=[f for f in files.values() if f])
