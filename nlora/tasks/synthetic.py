"""A small task stream that nlora generates itself, for the offline demo and tests.

All tasks share one pool of keywords; each task has its own label words and its own random assignment of the
keywords to its labels (two keywords per label), plus a distractor word. A pretrained model starts near chance
(the assignment is arbitrary) and must learn each task; since later tasks re-map the same keywords, training
them disturbs what earlier tasks learned, which is what a continual-learning method has to withstand.
Written in the CL_Benchmark layout, so the demo runs through exactly the same data path as the real benchmark.

`write_synthetic_trace` writes a second stream, of free-text tasks in TRACE's layout (see below).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..io import write_json_atomic

FAMILY = "synthetic"
KEYWORDS = ("sailor", "captain", "fisher", "pilot", "merchant", "diver")
DISTRACTORS = ("at dawn", "in fog", "at noon", "in rain", "at dusk", "in snow", "on monday", "by the sea")
FILLER = ("today", "again", "quietly", "somehow", "maybe", "indeed", "later", "often", "still", "really")
LABEL_WORDS = {
    "harbor": ("amber", "cobalt", "jade"),
    "orchard": ("lyre", "drum", "flute"),
    "library": ("north", "south", "east"),
    "kitchen": ("granite", "velvet", "copper"),
}
TASK_NAMES = tuple(LABEL_WORDS)


def keyword_labels(task: str, seed: int) -> dict[str, str]:
    """The task's arbitrary keyword → label assignment, two keywords per label."""
    labels = LABEL_WORDS[task]
    keywords = list(KEYWORDS)
    random.Random(f"{seed}/{task}/assignment").shuffle(keywords)
    return {k: labels[i % len(labels)] for i, k in enumerate(keywords)}


def _example(assignment: dict[str, str], rng: random.Random) -> dict:
    keyword = rng.choice(KEYWORDS)
    filler = " ".join(rng.sample(FILLER, 2))
    return {"label": assignment[keyword], "sentence": f"the {keyword} {filler}, {rng.choice(DISTRACTORS)}"}


def write_synthetic_benchmark(root: str | Path, n_train: int = 300, n_test: int = 150, seed: int = 0,
                              tasks: tuple[str, ...] = TASK_NAMES) -> Path:
    """Write the tasks to `root/synthetic/<task>/{train,dev,test,labels}.json`; deterministic from `seed`.
    dev.json is a copy of test.json, as in the benchmark's own release."""
    root = Path(root)
    for name in tasks:
        if name not in LABEL_WORDS:
            raise ValueError(f"unknown synthetic task {name!r}; available: {', '.join(TASK_NAMES)}")
        assignment = keyword_labels(name, seed)
        rng = random.Random(f"{seed}/{name}/examples")
        folder = root / FAMILY / name
        train = [_example(assignment, rng) for _ in range(n_train)]
        test = [_example(assignment, rng) for _ in range(n_test)]
        write_json_atomic(folder / "labels.json", list(LABEL_WORDS[name]))
        write_json_atomic(folder / "train.json", train)
        write_json_atomic(folder / "test.json", test)
        write_json_atomic(folder / "dev.json", test)
    return root


# ----------------------------------------------------------------------------------------------------------------
# A free-text stream in TRACE's layout: `<root>/<Task>/{train,eval,test}.json`, arrays of {"prompt", "answer"},
# each prompt its task's instruction line followed by the raw input (nlora.tasks.freetext). One task per kind of answer
# and metric (nlora.tasks.scoring).

TRACE_TASKS = {
    # name: (instruction prefix of its prompts, metric)
    "reverse": ("Reverse the letters of the word.\n", "edit_similarity"),
    "headline": ("Write the first three words of the sentence.\n", "rouge_l"),
    "sum": ("Add the two numbers.\n", "accuracy_raw"),
    "simplify": ("Remove the words in brackets.\n", "sari"),
    "choice": ("Which of these is a colour? Answer with its letter and a reason.\n", "first_char_accuracy"),
}
TRACE_TASK_NAMES = tuple(TRACE_TASKS)
_LETTERS = "abcdefghijklmnoprstuvw"
_NOUNS = ("sailor", "captain", "fisher", "pilot", "merchant", "diver", "harbor", "boat", "river", "island")
_WORDS = _NOUNS + ("old", "quiet", "early", "walked", "slowly", "home", "across", "the", "sea", "again", "found")
_HEDGES = ("very", "quite", "rather", "really", "somewhat")
_COLOURS = ("red", "green", "blue", "amber")


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    return word, word[::-1]


def _headline(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 9))]
    return " ".join(words), " ".join(words[:3])


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} + {b}", str(a + b)


def _simplify(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 7))]
    marked = list(words)
    for at in sorted(rng.sample(range(len(words) + 1), 2), reverse=True):
        marked.insert(at, f"[{rng.choice(_HEDGES)}]")
    return " ".join(marked), " ".join(words)


def _choice(rng: random.Random) -> tuple[str, str]:
    options = rng.sample(_NOUNS, 2) + [rng.choice(_COLOURS)]
    rng.shuffle(options)
    letter = "ABC"[next(i for i, o in enumerate(options) if o in _COLOURS)]
    colour = next(o for o in options if o in _COLOURS)
    return " ".join(f"{tag}. {o}" for tag, o in zip("ABC", options)), f"{letter}\nBecause {colour} is a colour."


_MAKERS = {"reverse": _reverse, "headline": _headline, "sum": _sum, "simplify": _simplify, "choice": _choice}


def trace_records(task: str, n: int, rng: random.Random) -> list[dict]:
    prefix = TRACE_TASKS[task][0]
    return [{"prompt": prefix + source, "answer": answer} for source, answer in (_MAKERS[task](rng) for _ in range(n))]


def write_synthetic_trace(root: str | Path, n_train: int = 40, n_eval: int = 15, n_test: int = 15, seed: int = 0,
                          tasks: tuple[str, ...] = TRACE_TASK_NAMES) -> Path:
    """Write the tasks to `root/<task>/{train,eval,test}.json`, deterministic from `seed`; returns root. Each
    task's prefix and metric are in TRACE_TASKS (the loader needs the prefix to find the raw input)."""
    root = Path(root)
    for name in tasks:
        if name not in TRACE_TASKS:
            raise ValueError(f"unknown synthetic TRACE task {name!r}; available: {', '.join(TRACE_TASK_NAMES)}")
        rng = random.Random(f"{seed}/{name}/trace")
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("eval", n_eval), ("test", n_test)):
            # a plain write, not fsync'ed: generated data is cheap to write again, and a cut file fails to parse
            text = json.dumps(trace_records(name, n, rng), indent=1, ensure_ascii=False) + "\n"
            (root / name / f"{split}.json").write_text(text, encoding="utf-8")
    return root
