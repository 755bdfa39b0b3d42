"""Task data in the CL_Benchmark layout and the instruction prompts built from it.

A data folder holds `<group>/<dataset>/{train,dev,test,labels}.json` (or `<dataset>/...` directly); each split
is a JSON array of {"label": str, "sentence": str} and labels.json a list of label strings. The group folder
(TC, SC, NLI, ...) is the task family that picks the instruction.
"""

from __future__ import annotations

import json
import random
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NloraError, did_you_mean
from ..eval.continual import normalize_answer
from ..paths import check_plain_name, folder_problem
from .prompts import REFERENCE_INSTRUCTIONS, PromptSpec, build_prompt, read_instruction_file, reference_instruction

# Our own instruction texts, one per task family of the benchmark; a user file can replace any of them.
DEFAULT_INSTRUCTIONS = {
    "TC": "Classify the topic of the text.",
    "SC": "Classify the sentiment of the text.",
    "NLI": "Decide whether the premise entails the hypothesis, contradicts it, or neither.",
    "QQP": "Decide whether the two questions ask the same thing.",
    "BoolQA": "Answer the question about the passage with true or false.",
    "COPA": "Pick the more plausible cause or effect for the premise.",
    "MultiRC": "Decide whether the answer to the question about the passage is correct.",
    "WiC": "Decide whether the word means the same in both sentences.",
    "synthetic": "Classify the text by the rule of this task.",
}
GENERIC_INSTRUCTION = "Choose the correct label for the text."
SPLITS = ("train", "test")
# What to do with examples whose label is not in labels.json (e.g. MNLI's test examples labelled '-', which have
# no gold label): error; drop them; or keep them, so that they are scored like any example (the reference code's
# behaviour on its test sets): '-' normalises to "", so only an empty or punctuation-only prediction matches it.
UNKNOWN_LABEL_POLICIES = ("error", "drop", "keep")


@dataclass(frozen=True)
class Example:
    """One example. A classification example has its label options; a free-text example (nlora.tasks.freetext) has none:
    its `label` is the answer it is trained on, `sentence` its raw input without the instruction, and
    `references` every acceptable answer when there are several (empty: the label alone)."""
    task: str
    sentence: str
    label: str
    options: tuple[str, ...]
    prompt: str
    prompt_format: str = "nlora"  # how the prompt is cut to max_source_length (nlora.tasks.prompts)
    references: tuple[str, ...] = ()

    @property
    def free_text(self) -> bool:
        return not self.options

    @property
    def answers(self) -> tuple[str, ...]:
        """What a prediction is scored against."""
        return self.references or (self.label,)


@dataclass
class TaskData:
    name: str
    family: str
    path: Path
    labels: list[str]
    instruction: str
    train: list[Example]
    test: list[Example]
    # split -> {label not in labels.json: number of such examples kept in that split}
    unknown_labels: dict[str, dict[str, int]] = field(default_factory=dict)
    # free-text tasks (nlora.tasks.freetext): their held-out dev split where the data has one, and their metric
    # (a nlora.tasks.scoring spec); classification tasks are scored by exact match
    dev: list[Example] = field(default_factory=list)
    metric: str = "exact_match"
    kind: str = "classification"  # or "free_text"
    files: list[Path] = field(default_factory=list)  # the files read (default: labels, train and test .json)


def format_prompt(instruction: str, options: list[str] | tuple[str, ...], sentence: str) -> str:
    """nlora's own prompt layout (nlora.tasks.prompts has the reference's too)."""
    return build_prompt(PromptSpec(), instruction, "", "", tuple(options), sentence)


def find_task_dir(data_dir: str | Path, name: str) -> Path:
    """`<data_dir>/<group>/<name>` or `<data_dir>/<name>`; a clear error listing what exists otherwise."""
    root = Path(data_dir)
    check_plain_name(name)
    if folder_problem(root):
        raise NloraError(f"data folder: {folder_problem(root)}")
    candidates = [root / name] + sorted(p / name for p in root.iterdir() if p.is_dir())
    for c in candidates:
        if (c / "labels.json").is_file() or (c / "train.json").is_file():
            return c
    check_not_a_task_folder(root)
    available = sorted({p.name for p in [*root.glob("*/*"), *root.glob("*")] if (p / "labels.json").is_file()})
    raise NloraError(f"task '{name}' not found in data folder {root}{did_you_mean(name, available)}; available: "
                     f"{', '.join(available) or 'none'}")


def check_not_a_task_folder(root: Path) -> None:
    """An error naming the folder to give when `root`, given as the data folder, is one task's own folder."""
    if (root / "labels.json").is_file() or (root / "train.json").is_file():
        raise NloraError(f"data folder {root} is the folder of one task ({root.name}), not a data folder: give the "
                         f"folder that holds the task family folders, {root.parent.parent} in the CL_Benchmark "
                         f"layout (<data>/{root.parent.name}/{root.name})")


def load_instructions(path: str | Path | None, prompt_format: str = "nlora") -> dict[str, str]:
    """The format's default instructions, updated with a user JSON file: nlora's own mapping of family or dataset
    name to text, or the reference's instruction_config.json as it is."""
    instructions = dict(REFERENCE_INSTRUCTIONS if prompt_format == "reference" else DEFAULT_INSTRUCTIONS)
    if path is not None:
        instructions.update(read_instruction_file(path))
    return instructions


def task_family(data_dir: str | Path, task_dir: Path, name: str) -> str:
    """The family of the task found at `task_dir`: its group folder's name (the task's own name without one)."""
    return task_dir.parent.name if task_dir.parent != Path(data_dir) else name


def task_instruction(instructions: dict[str, str], family: str, name: str, prompt_format: str) -> str:
    """The instruction of task `name` of `family` in a prompt format: by dataset name, else by family."""
    if prompt_format == "reference":
        return reference_instruction(instructions, family, name)
    return instructions.get(name) or instructions.get(family) or GENERIC_INSTRUCTION


def load_task(data_dir: str | Path, name: str, instructions: dict[str, str] | None = None,
              max_train: int | None = None, max_test: int | None = None, seed: int = 0,
              unknown_labels: dict[str, str] | None = None, prompt: PromptSpec | None = None) -> TaskData:
    """Read and validate one task; subsample train/test deterministically from (seed, task name).
    `unknown_labels` maps a split to its policy for labels not in labels.json (UNKNOWN_LABEL_POLICIES; default:
    error in train, keep in test). `prompt` picks the prompt format (default: nlora's own)."""
    path = find_task_dir(data_dir, name)
    family = task_family(data_dir, path, name)
    prompt = prompt or PromptSpec()
    if instructions is None:
        instructions = load_instructions(None, prompt.format)
    instruction = task_instruction(instructions, family, name, prompt.format)
    labels = _read_labels(path / "labels.json")
    policies = {"train": "error", "test": "keep", **(unknown_labels or {})}
    splits, unknown = {}, {}
    for split, limit in (("train", max_train), ("test", max_test)):
        rows = _read_split(path / f"{split}.json")
        rows = _apply_label_policy(rows, labels, path / f"{split}.json", split, policies[split])
        rows = _subsample(rows, limit, seed, f"{name}/{split}")
        kept = Counter(r["label"] for r in rows if r["label"] not in labels)
        if kept:
            unknown[split] = dict(sorted(kept.items()))
        options = tuple(labels)
        splits[split] = [Example(name, r["sentence"], r["label"], options,
                                 build_prompt(prompt, instruction, family, name, options, r["sentence"]),
                                 prompt.format) for r in rows]
    return TaskData(name, family, path, labels, instruction, splits["train"], splits["test"], unknown)


def carve_dev(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split a held-out dev set off the training examples (the benchmark's dev.json is a copy of its test.json,
    so it must never be used for selection)."""
    if not 0 < fraction < 1:
        raise NloraError(f"dev fraction must be in (0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, round(fraction * len(examples)))
    dev_idx = set(order[:n_dev])
    return ([e for i, e in enumerate(examples) if i not in dev_idx],
            [e for i, e in enumerate(examples) if i in dev_idx])


def _subsample(rows: list[dict], limit: int | None, seed: int, key: str) -> list[dict]:
    if limit is None or limit >= len(rows):
        return rows
    rng = random.Random(seed * 1_000_003 + zlib.crc32(key.encode()))
    keep = sorted(rng.sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _read_json(path: Path):
    if not path.is_file():
        raise NloraError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NloraError(f"{path}: not UTF-8 text ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NloraError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _read_labels(path: Path) -> list[str]:
    labels = _read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise NloraError(f"{path}: expected a non-empty JSON list of label strings")
    for i, label in enumerate(labels):
        if not label.strip():
            raise NloraError(f"{path}: label {i} is blank ({label!r}); each label must be an answer text")
    if len(set(labels)) != len(labels):
        raise NloraError(f"{path}: duplicate labels in {labels}")
    same_answer: dict[str, list[str]] = {}
    for label in labels:
        same_answer.setdefault(normalize_answer(label), []).append(label)
    for group in same_answer.values():
        if len(group) > 1:  # exact match could not tell them apart: two classes would be scored as one
            raise NloraError(f"{path}: labels {' and '.join(map(repr, group))} are one answer to exact match, which "
                             "ignores case, punctuation and spacing; rename them so that they differ otherwise")
    return labels


def _read_split(path: Path) -> list[dict]:
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise NloraError(f"{path}: expected a JSON array of {{\"label\", \"sentence\"}} objects")
    if not rows:
        raise NloraError(f"{path}: the split is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise NloraError(f"{path}: example {i} is not an object")
        for key in ("label", "sentence"):
            if key not in row:
                raise NloraError(f"{path}: example {i} has no string field '{key}'")
            if not isinstance(row[key], str):
                raise NloraError(f"{path}: example {i} has no string field '{key}' (its '{key}' is "
                                 f"{type(row[key]).__name__} {row[key]!r}, not a string)")
    return rows


def _apply_label_policy(rows: list[dict], labels: list[str], path: Path, split: str, policy: str) -> list[dict]:
    """Rows whose label is not in labels.json: an error, dropped, or kept (one warning per file either way)."""
    if policy not in UNKNOWN_LABEL_POLICIES:
        raise NloraError(f"option '{split}_unknown_labels': {policy!r} is not one of "
                         f"{', '.join(UNKNOWN_LABEL_POLICIES)}")
    known = set(labels)
    unknown = [i for i, r in enumerate(rows) if r["label"] not in known]
    if not unknown:
        return rows
    counts = Counter(rows[i]["label"] for i in unknown)
    listed = ", ".join(f"{label!r} x {n}" for label, n in sorted(counts.items()))
    if policy == "error":
        i = unknown[0]
        raise NloraError(f"{path}: example {i} has label {rows[i]['label']!r}, which is not in labels.json "
                         f"({', '.join(sorted(known))}); {len(unknown)} example(s) have such labels ({listed}). "
                         f"Set option '{split}_unknown_labels' to drop or keep to accept them")
    if policy == "drop":
        print(f"nlora: warning: {path}: dropped {len(unknown)} of {len(rows)} examples whose label is not in "
              f"labels.json ({listed})", file=sys.stderr)
        return [r for r in rows if r["label"] in known]
    effect = "trained on as given" if split == "train" else \
        "scored as any example: correct where the prediction equals the label after normalisation"
    print(f"nlora: warning: {path}: kept {len(unknown)} of {len(rows)} examples whose label is not in labels.json "
          f"({listed}); {effect}", file=sys.stderr)
    return rows
