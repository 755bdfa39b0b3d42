"""A small task stream that nlora generates itself, for the offline demo and tests.

All tasks share one pool of keywords; each task has its own label words and its own random assignment of the
keywords to its labels (two keywords per label), plus a distractor word. A pretrained model starts near chance
(the assignment is arbitrary) and must learn each task; since later tasks re-map the same keywords, training
them disturbs what earlier tasks learned, which is what a continual-learning method has to withstand.
Written in the CL_Benchmark layout, so the demo runs through exactly the same data path as the real benchmark.
"""

from __future__ import annotations

import random
from pathlib import Path

from .io import write_json_atomic

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
