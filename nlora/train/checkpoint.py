"""Mid-task checkpoints: the current adapter's weights (safetensors), the optimizer/scheduler/RNG state
(`torch.load(weights_only=True)`, no pickled code), the method's state (nlora.method_state), and the position in
the data, in one folder that is replaced
atomically, so a resumed task continues exactly where the last checkpoint left it."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import NloraError
from ..faults import fault_point
from ..io import naming_the_file, replace_dir_atomic, staging_dir
from ..method_state import load_state, save_state
from ..rundir import CHECKPOINT_DIR



@dataclass
class Progress:
    phase: int  # index of the task being trained
    epoch: int
    batch: int  # micro-batches of this epoch already consumed
    step: int  # optimizer steps taken in this phase
    loss_sum: float
    reg_sum: float
    window: dict | None = None  # the logging window since the last logged step (nlora.tracking.StepWindow.state)


def save_checkpoint(run_dir: Path, progress: Progress, params: dict[str, torch.Tensor], optimizer, scheduler,
                    method_state: dict | None = None) -> Path:
    final = Path(run_dir) / CHECKPOINT_DIR
    tmp = staging_dir(final)
    with naming_the_file(final / "adapter.safetensors"):
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "adapter.safetensors"))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    buffer = io.BytesIO()  # torch.save to a file reports a full disk as an obscure RuntimeError; a write names it
    torch.save(state, buffer)
    with naming_the_file(final / "trainer_state.pt"):
        (tmp / "trainer_state.pt").write_bytes(buffer.getvalue())
    with naming_the_file(final):  # the method's state: one or two files
        save_state(method_state or {}, tmp)
    with naming_the_file(final / "progress.json"):
        (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
    fault_point("checkpoint_save")
    replace_dir_atomic(tmp, final)
    return final


def load_checkpoint(run_dir: Path) -> tuple[Progress, dict[str, torch.Tensor], dict] | None:
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not (folder / "progress.json").is_file():
        return None
    try:
        progress = Progress(**json.loads((folder / "progress.json").read_text()))
        params = load_file(str(folder / "adapter.safetensors"))
        state = torch.load(folder / "trainer_state.pt", weights_only=True, map_location="cpu")
        method_state = load_state(folder)
        if method_state is not None:
            state["method"] = method_state
    except Exception as e:  # the folder is replaced atomically, so this means outside damage
        raise NloraError(f"checkpoint {folder} is unreadable ({e}); delete it to redo the task from its "
                         "start") from None
    return progress, params, state


def remove_checkpoint(run_dir: Path, done_phase: int | None = None) -> None:
    """Remove the mid-task checkpoint; with `done_phase`, only one of that phase or an earlier one (a run killed
    between saving a phase and removing its checkpoint left it; a later phase's checkpoint is still needed)."""
    import shutil

    folder = Path(run_dir) / CHECKPOINT_DIR
    if done_phase is not None:
        try:
            if json.loads((folder / "progress.json").read_text())["phase"] > done_phase:
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no checkpoint, or one without its progress: nothing a resumed phase can continue from
    if folder.exists():
        shutil.rmtree(folder)
