"""The run directory's contract, in one place: where each file lives (RunPaths), what a run writes (RUN_ENTRIES),
the checks before a run writes into a folder, reading back metrics.json and the saved adapters' files. Used by the
runner and by every reader of run directories (export, predict, status, report, diagnose, eval-general); the run
read back with its configuration and method is nlora.trained_run, above this module.

    config.yaml                          the fully resolved configuration (core options + the method's options)
    run.json                             versions, devices and data-file hashes of each start (nlora.provenance)
    metrics.json                         accuracy matrix and summary metrics, rewritten after each task
    log.jsonl                            training and evaluation log (nlora.tracking), appended line by line
    tensorboard/                         TensorBoard event files, with --report-to tensorboard
    adapters/<k>-<task>/                 the adapter trained in phase k (PEFT format) and the method's state after
                                         it (method_state.{safetensors,json}, nlora.method_state), and, for a
                                         method with learned adapter scales, the weight of each adapter in the
                                         model after phase k (update_scales.json); for a method
                                         that trains the base, the whole model after phase k (save_pretrained:
                                         config.json, model*.safetensors), by default only the latest one kept
                                         (nlora.full_model)
    predictions/<k>-<task>/<task>.jsonl  predictions on each evaluated task after phase k (the generated text of
                                         free-text tasks: `nlora rescore` scores them again)
    predictions/base/<task>.jsonl        the base model's predictions, with eval_future
    checkpoint/                          mid-task checkpoint of the phase in progress (removed when it ends)
    diagnostics.json                     parameter diagnostics of the saved adapters (nlora.analysis.diagnostics), at the end
    general.json                         general-ability scores (`nlora eval-general`, run option general_eval)
    report/                              plots and report.md, written by `nlora report RUN_DIR`

This module imports no torch, no configuration and no method: it sits low in the package, below both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NloraError
from .io import recover_replaced_dirs

if TYPE_CHECKING:  # annotations only: this module imports neither at run time
    from .config import RunConfig
    from .methods.base import Method

ADAPTER_FILE = "adapter_model.safetensors"
MODEL_FILE = "model.safetensors"  # a whole model's weights (save_pretrained), in one shard
MODEL_INDEX = "model.safetensors.index.json"  # its index where they are saved in several shards
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
BASE_PREDICTIONS = "base"
GENERAL_FILE = "general.json"  # general-ability scores (nlora.eval.general)
UPDATE_SCALES_FILE = "update_scales.json"  # a saved adapter's weights in the model (Method.update_scales)
RUN_ENTRIES = ("config.yaml", "metrics.json", "diagnostics.json", "adapters", "predictions", "report",
               CHECKPOINT_DIR, "run.json", LOG_FILE, TENSORBOARD_DIR, GENERAL_FILE)
# Keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = ("overwrite", "output_dir", "log_steps", "report_to")
# Options a run resolves when it loads the model, from these values: config.yaml records what they resolved to.
RESOLVED_AT_LOAD = {"model_kind": "auto", "dtype": "auto", "attn_implementation": "auto", "target_modules": None}


def changed_options(saved: dict, current: dict) -> list[str]:
    """The options of `current` that a run's config.yaml (`saved`) holds otherwise, less those free to differ on
    resume and those `current` leaves for the run to resolve at load."""
    return sorted(k for k, v in current.items()
                  if k not in RESUME_FREE_KEYS and not (k in RESOLVED_AT_LOAD and v == RESOLVED_AT_LOAD[k])
                  and saved.get(k) != v)


class RunPaths:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.json"

    def adapter(self, k: int, task: str) -> Path:
        return self.root / "adapters" / f"{k}-{task}"

    def predictions(self, k: int, train_task: str, eval_task: str) -> Path:
        return self.root / "predictions" / f"{k}-{train_task}" / f"{eval_task}.jsonl"

    def base_predictions(self, eval_task: str) -> Path:
        """The base model's predictions (eval_future: the reference scores of forward transfer)."""
        return self.root / "predictions" / BASE_PREDICTIONS / f"{eval_task}.jsonl"


def check_output_dir(config: "RunConfig", resume: bool) -> RunPaths:
    """Everything `prepare_output_dir` would refuse, checked without changing anything on disk."""
    paths = RunPaths(config.output_dir)
    root = paths.root
    existing = [e for e in RUN_ENTRIES if (root / e).exists()]
    if resume and config.overwrite:
        raise NloraError("options 'resume' and 'overwrite' exclude each other")
    if resume and not paths.config.is_file():
        raise NloraError(f"cannot resume: {root} holds no run (no config.yaml)")
    if existing and not (config.overwrite or resume):
        raise NloraError(f"output dir {root} already holds a run ({', '.join(existing)}); pass --resume to "
                         "continue it, --overwrite to replace it, or choose another 'output_dir'")
    linked = [e for e in existing if (root / e).is_symlink()]
    if config.overwrite and linked:  # removing it would remove a link, or files outside the run, not the run's
        raise NloraError(f"output dir {root}: {linked[0]} is a symbolic link to {os.readlink(root / linked[0])}; "
                         "--overwrite replaces only what a run wrote there: remove the link yourself, or choose "
                         "another 'output_dir'")
    nearest = next(p for p in (root, *root.parents) if p.exists())  # the folder the run's files will go under
    if not nearest.is_dir():
        raise NloraError(f"output dir {root} cannot be created: {nearest} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=nearest) as probe:  # nameless on Linux, removed on close
            probe.write(b"ok")
            probe.flush()
    except OSError as e:
        raise NloraError(f"output dir {root} is not writable ({nearest}: {e.strerror or e})") from None
    return paths


def prepare_output_dir(config: "RunConfig", resume: bool) -> RunPaths:
    paths = check_output_dir(config, resume)
    root = paths.root
    existing = [e for e in RUN_ENTRIES if (root / e).exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NloraError(f"output dir {root} cannot be created: {e.strerror or e}") from None
    if resume:  # temporary files of writes a crash interrupted; never read, so safe to drop
        recover_replaced_dirs(root)
        for stale in sorted(root.rglob(".*.tmp"), reverse=True):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if config.overwrite:  # remove only what a run writes
        for entry in existing:
            path = root / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return paths


def check_same_config(saved: dict, current: dict, path: Path) -> None:
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in RESUME_FREE_KEYS and saved.get(k) != current.get(k))
    if differ:
        def was(k):  # a key an older nlora did not write is named as such, not as a None the run never had
            return f"{saved[k]!r} in the run" if k in saved else "not in the run's config.yaml (an older nlora)"
        detail = "; ".join(f"{k}: {was(k)}, {current.get(k)!r} now" for k in differ)
        if any(k not in saved for k in differ):  # `nlora resume` would refuse too: say how to go on
            advice = f"To continue it, add those keys to {path} with the values to continue with"
        else:
            advice = "Resume with the saved configuration (`nlora resume RUN_DIR`)"
        raise NloraError(f"cannot resume {path.parent}: the configuration changed ({detail}). {advice}, or pass "
                         "--overwrite to start over")


def check_scored_as_configured(metrics: dict, config: "RunConfig", path: Path) -> None:
    """A run whose metrics.json `nlora rescore` rewrote with another scoring mode or BWT denominator continues
    only once scored as its config.yaml says again (its next rows would be scored otherwise)."""
    for key in ("scoring_mode", "bwt_denominator"):
        if key in metrics and metrics[key] != getattr(config, key):
            raise NloraError(f"cannot resume {path.parent}: {path.name} was rescored with {key} {metrics[key]!r}, "
                             f"the run scores with {getattr(config, key)!r}; run `nlora rescore {path.parent} "
                             f"--{key.replace('_', '-')} {getattr(config, key)}` first")


def read_log(path: str | Path) -> list[dict]:
    """The lines of a log.jsonl; a line that is not a JSON object (the last one, cut by a crash) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def read_json_object(path: Path) -> dict | None:
    """A JSON object file of a run directory: None where it is absent (or not an object); corrupt is an error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NloraError(f"{path} is corrupt ({e})") from None
    return data if isinstance(data, dict) else None


def read_metrics(paths: RunPaths) -> dict | None:
    if not paths.metrics.is_file():
        return None
    try:
        return json.loads(paths.metrics.read_text())
    except json.JSONDecodeError as e:
        raise NloraError(f"{paths.metrics} is corrupt ({e}); it is written atomically, so it was changed "
                         "outside nlora") from None


def model_adapter_names(method: "Method", phase: int) -> list[str]:
    """The method's names of the saved adapters that make up its model after `phase`, in task order."""
    phases = [phase] if method.adapter_layout == "snapshot" else range(phase + 1)
    return [method.adapter_name(k) for k in phases]


def declared_scales(method: "Method", phase: int) -> list:
    """The weight `Method.update_scales` gives each adapter of the model after `phase` (`model_adapter_names`
    order): a number, {layer: number}, or None where the adapter counts once."""
    declared = method.update_scales(phase)
    return [declared.get(name) for name in model_adapter_names(method, phase)]


def layer_scale(scale: "float | dict[str, float] | None", layer: str) -> float:
    """A declared multiplier of one saved adapter (`Method.update_scales`) in `layer`, the PEFT model's module name
    (a saved adapter's key prefix): 1 where none is declared."""
    if isinstance(scale, dict):
        scale = scale.get(layer)
    return 1.0 if scale is None else float(scale)


def write_update_scales(folder: Path, scales: list) -> None:
    """Record, beside the adapter of phase k, the multiplier of each phase's adapter (0..k) in the model after
    phase k: a number, {layer: number}, or None (counts once). Read back without the method's code (diagnostics)."""
    (Path(folder) / UPDATE_SCALES_FILE).write_text(json.dumps({"phases": scales}, indent=1) + "\n")


def read_update_scales(folder: Path) -> list | None:
    """The multipliers written by `write_update_scales`, one per phase 0..k; None where the folder has none (a
    method without learned scales, or a run of an older release)."""
    path = Path(folder) / UPDATE_SCALES_FILE
    data = read_json_object(path)
    if data is None:
        return None
    if not isinstance(data.get("phases"), list):
        raise NloraError(f"{path}: field 'phases' must be a list, one entry per phase")
    return data["phases"]


def check_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` if it holds a run's config.yaml; an error naming it otherwise."""
    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise NloraError(f"{root} is not a run directory (no config.yaml)")
    return root


def model_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a whole model saved by `save_pretrained` in `folder`: its one file, or the shards
    its index names; empty where there is none."""
    folder = Path(folder)
    index = folder / MODEL_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise NloraError(f"model index {index} is unreadable ({e})") from None
        return [folder / shard for shard in shards]
    return [folder / MODEL_FILE] if (folder / MODEL_FILE).is_file() else []


def phase_saved(method: "Method", folder: Path) -> bool:
    """Whether `folder` holds a trained phase: its adapter, or for a method that trains the base its whole model."""
    return bool(model_files(folder)) if method.trains == "base" else (folder / ADAPTER_FILE).is_file()
