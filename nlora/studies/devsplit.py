"""The dev view of a study's data: for each task, a pool drawn from its train split with a dev set carved off it
(nlora.tasks.data.carve_dev), written in the CL_Benchmark layout as train.json (the rest of the pool) and test.json
(the dev set). Dev cells run on it, so no selection reads a task's test split. Deterministic: the same study writes
the same files, and a view already written is kept."""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

from ..errors import NloraError
from ..io import staged_dir, write_json_atomic
from ..tasks.data import carve_dev, load_task
from ..tasks.loading import detect_format

VIEW_SEED = 0  # draws the pool and the dev set, whatever the cells' seeds
DONE_FILE = "view.json"


def pool_and_dev(study, config) -> tuple[int | None, int]:
    """Training pool per task (None: all of train.json) and dev examples carved from it."""
    pool = study.select.train_samples or config.max_train_samples
    dev = study.select.dev_samples or (max(1, pool // 5) if pool else None)
    if dev is None:
        raise NloraError(f"{study.source}: select.dev_samples: set the dev examples carved from each task's "
                         "training data (or select.train_samples, of which a fifth is carved)")
    if pool is not None and dev >= pool:
        raise NloraError(f"{study.source}: select.dev_samples ({dev}) must be smaller than the training pool "
                         f"({pool})")
    return pool, dev


def write_dev_view(folder: Path, config, pool: int | None, dev: int) -> Path:
    """The dev view of `config.tasks` from `config.data_dir` in `folder` (kept where complete)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / DONE_FILE).is_file():
            return folder
        with staged_dir(folder) as tmp:
            sizes = {}
            for name in config.tasks:
                if detect_format(config.data_dir, name) != "cl_benchmark":
                    raise NloraError(f"task {name!r}: a dev split is carved from classification tasks of the "
                                     "CL_Benchmark layout only; leave the options of free-text studies untuned "
                                     "(one value each)")
                task = load_task(config.data_dir, name, max_train=pool, max_test=1, seed=VIEW_SEED)
                # a smaller task than the pool: the same share of it
                fit, held = carve_dev(task.train, dev / (pool or len(task.train)), seed=VIEW_SEED)
                out = tmp / task.family / name
                out.mkdir(parents=True, exist_ok=True)
                write_json_atomic(out / "labels.json", task.labels)
                for split, examples in (("train", fit), ("test", held)):
                    write_json_atomic(out / f"{split}.json", [{"label": e.label, "sentence": e.sentence}
                                                              for e in examples])
                sizes[name] = {"train": len(fit), "dev": len(held)}
            write_json_atomic(tmp / DONE_FILE, {"source": str(Path(config.data_dir).resolve()), "pool": pool,
                                                "dev": dev, "seed": VIEW_SEED, "tasks": sizes})
    return folder
