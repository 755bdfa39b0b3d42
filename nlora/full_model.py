"""The trainable state of a method that trains the base model itself (`Method.trains == "base"`: SeqFT, the
full-parameter multi-task bound): every base parameter trains, there is no LoRA adapter, and the model after a
phase is saved whole, in the base model's own format (`save_pretrained`: config.json + safetensors, in the weights'
dtype), into the phase's folder `adapters/<k>-<task>/`, atomically, with the method's state beside it.

`FullModel` offers the engine the same surface as `ContinualAdapters` (model, names, current, add, activate,
save, load; no LoRA layers, nothing to fold), so the runner, the training loop, the checkpoints, predict and
export run it unchanged: a mid-task checkpoint holds every tensor that trains, i.e. the whole model, and its
optimizer state.

Disk. A full model per task is large (T5-large 2.95 GB in float32, a 7B model 13.5 GB in bfloat16), so by
default (`keep_every_phase` False) saving phase k's model removes the models of earlier phases: at rest the run
holds one model, the latest, and a resumed run starts from it; while a phase is being saved two exist for a
moment. Those earlier phases' predictions and metrics stay. A method keeps every phase's model when asked
(SeqFT: `seqft_save_every_task`). Within a phase, the mid-task checkpoint adds the model and its optimizer state
(AdamW: 3x the weights' bytes)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import NloraError
from .faults import fault_point
from .io import staged_dir
from .rundir import MODEL_FILE, MODEL_INDEX, model_files


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bar from save_pretrained: nlora's own bars (and --quiet) say what runs."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """`model.save_pretrained(folder)` (safetensors, the weights' own dtype), without progress bars."""
    with _quiet_transformers():
        model.save_pretrained(str(folder), safe_serialization=True)


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the weights saved in `folder` into `model`'s parameters and buffers in place. Tied parameters (T5's
    shared embedding and LM head) are saved once under one of their names: every storage of the model must be
    filled by some saved tensor, and every saved tensor must be the model's."""
    folder = Path(folder)
    files = model_files(folder)
    if not files:
        raise NloraError(f"model folder {folder} holds no {MODEL_FILE} (nor {MODEL_INDEX})")
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    filled: set[int] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for path in files:
            try:
                with safe_open(str(path), "pt") as handle:
                    for key in handle.keys():
                        target = targets.get(key)
                        if target is None:
                            unexpected.append(key)
                            continue
                        value = handle.get_tensor(key)
                        if value.shape != target.shape:
                            raise NloraError(f"model file {path}: {key} has shape {tuple(value.shape)}, the model "
                                             f"{tuple(target.shape)}")
                        target.copy_(value)
                        filled.add(target.data_ptr())
            except NloraError:
                raise
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise NloraError(f"model file {path} is unreadable: {e}") from None
    missing = [n for n, p in model.named_parameters() if p.data_ptr() not in filled]
    if missing or unexpected:
        raise NloraError(f"model folder {folder} does not match the model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")


class FullModel:
    """Every base parameter trainable; the phase's model saved whole (see the module's doc). The names are the
    method's `adapter_name`s, kept so that the engine's bookkeeping reads the same as with adapters."""

    peft_model = None  # no PEFT wrapper: evaluation runs the model as it is
    fold_form = None
    folded: tuple[str, ...] = ()  # nothing is ever folded

    def __init__(self, model: torch.nn.Module, keep_every_phase: bool = True):
        self.base_model = model
        self.keep_every_phase = keep_every_phase
        self.names: list[str] = []

    @property
    def model(self) -> torch.nn.Module:
        return self.base_model

    @property
    def current(self) -> str:
        return self.names[-1]

    def add(self, name: str, factors: str = "both") -> str:
        """Record phase name `name` and make every parameter train (`factors`: as ContinualAdapters.add's, which
        must be "both": there are no LoRA factors)."""
        if name not in self.names:
            self.names.append(name)
        self.activate(self.names, trainable=name, factors=factors)
        return name

    def activate(self, names: list[str], trainable: str | None = None, factors: str = "both") -> None:
        """There is one model and no adapter to choose: with `trainable`, make every parameter train."""
        if factors != "both":
            raise NloraError("option 'train_factors': a method that trains the whole base model has no LoRA "
                             f"factors; it must be 'both', got {factors!r}")
        if trainable is not None:
            for p in self.base_model.parameters():
                p.requires_grad_(True)

    @contextlib.contextmanager
    def using(self, names: list[str]):
        """As ContinualAdapters.using: there is one model, which runs as it is."""
        yield self.model

    def lora_layers(self) -> list:
        return []

    def factors(self, name: str) -> list:
        return []

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.base_model.parameters() if p.requires_grad]

    def save(self, name: str, folder: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
        """Write the whole model to `folder` (save_pretrained) with `extra`'s files (the method's state),
        atomically; then, unless every phase is kept, remove the models of the earlier phases beside it."""
        folder = Path(folder)
        with staged_dir(folder) as tmp:  # removed if the save fails (a full disk): it is a model's size
            save_model(self.base_model, tmp)
            if extra is not None:
                extra(tmp)
            fault_point("adapter_save")
        fault_point("model_saved")
        if not self.keep_every_phase:
            remove_earlier_models(folder)
        return folder

    def load(self, name: str, folder: str | Path) -> None:
        load_weights(self.base_model, folder)


def _phase(folder: Path) -> int | None:
    head = folder.name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def remove_earlier_models(folder: Path) -> None:
    """Remove the saved models of the phases before `folder`'s (adapters/<j>-<task>/ with j < k): `folder` now
    holds everything a resumed run needs."""
    k = _phase(folder)
    for other in folder.parent.iterdir():
        j = _phase(other)
        if other.is_dir() and j is not None and j < k and not other.name.startswith("."):
            shutil.rmtree(other)


def resume_point(folders: dict[int, Path], keep_every_phase: bool, remove: bool) -> int | None:
    """The last phase whose model is saved (`folders`: phase -> its folder), where a resumed run starts: the models
    of earlier phases may have been removed. With `remove` (one process) and not `keep_every_phase`, the earlier
    models that a crash between saving a model and removing them left behind are removed now. None: no model saved."""
    saved = [k for k, folder in folders.items() if folder.is_dir()]
    if not saved:
        return None
    latest = max(saved)
    if remove and not keep_every_phase:
        remove_earlier_models(folders[latest])
    return latest
