"""A run directory read back with its configuration and its method (above nlora.rundir, which knows the files
alone): the configuration as `nlora resume` resolves it, and the saved adapters that make the model after task K."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, load_config
from .errors import NloraError
from .method_state import load_state
from .methods import Method
from .methods.registry import resolve
from .paths import check_plain_name
from .rundir import RunPaths, check_run_dir, declared_scales, model_adapter_names, phase_saved


@dataclass
class TrainedRun:
    """A run directory read back: the model after its first `upto` tasks is the sum of `folders` (stacked
    methods) or the one adapter in `folders` (snapshot methods), or the whole model saved in `folders[-1]` (a
    method that trains the base)."""
    root: Path
    config: RunConfig
    method: Method
    upto: int  # tasks trained, 1-based: the model after task `upto`
    folders: list[Path]  # the saved adapters that make up that model, in task order

    @property
    def phase(self) -> int:
        return self.upto - 1

    @property
    def adapter_names(self) -> list[str]:
        """The method's names of the adapters in `folders`, in the same order."""
        return model_adapter_names(self.method, self.phase)

    def scales(self) -> list:
        """The multiplier of each of `folders` in the model (`Method.update_scales`, from the method's state saved
        with the last of them); None where the adapter counts once."""
        if not self.method.has_hook("update_scales"):
            return [None] * len(self.folders)
        state = load_state(self.folders[-1])
        if state is not None:
            self.method.load_state_dict(state)
        return declared_scales(self.method, self.phase)


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration saved in a run directory, resolved as `nlora resume` resolves it (a config.yaml of an
    older release, with every method's options, reads the same)."""
    root = check_run_dir(run_dir)
    return load_config(root / "config.yaml", {"output_dir": str(root)}, saved_run=True)


def read_run(run_dir: str | Path, upto: int | None = None) -> TrainedRun:
    """The run in `run_dir` after task `upto` (default: the last task whose adapter is saved)."""
    root = Path(run_dir)
    config = read_run_config(root)
    method = resolve(config)
    tasks, paths = config.tasks, RunPaths(root)
    for task in tasks:  # each becomes part of an adapter's path
        check_plain_name(task, f"{root / 'config.yaml'}: task name")
    saved = [k for k in method.phases(len(tasks)) if phase_saved(method, paths.adapter(k, tasks[k]))]
    if not saved:
        raise NloraError(f"{root}: no trained {'model' if method.trains == 'base' else 'adapter'} yet (adapters/ "
                         "is empty); nothing to use")
    if upto is None:
        upto = saved[-1] + 1
        if saved[-1] != method.phases(len(tasks))[-1]:  # the run stopped, or runs, before its last task
            print(f"nlora: warning: {root} is not finished: this is the partial model after task {upto} of "
                  f"{len(tasks)} ({tasks[upto - 1]}), not the run's final model", file=sys.stderr)
    if not 1 <= upto <= len(tasks):
        raise NloraError(f"option --upto: must be between 1 and {len(tasks)} (the run's tasks), got {upto}")
    if upto - 1 not in saved:
        kept = (" (a method that trains the base keeps only its latest model unless its option to keep every "
                "task's is on)") if method.trains == "base" else ""
        raise NloraError(f"option --upto {upto}: the run has no model after task {upto} "
                         f"({tasks[upto - 1]}); it has one after task(s) {', '.join(str(k + 1) for k in saved)}"
                         f"{kept}")
    k = upto - 1
    phases = [k] if method.adapter_layout == "snapshot" else range(k + 1)
    folders = [paths.adapter(j, tasks[j]) for j in phases]
    return TrainedRun(root, config, method, upto, folders)


