"""The model a run trained, for use outside nlora: `nlora export RUN_DIR OUT_DIR` writes it as one PEFT LoRA
adapter that holds every task's update summed (rank r·K, loads with `PeftModel.from_pretrained`, needs no task
id), or with `--merge` as a full model with the updates merged into the base weights (`save_pretrained`,
loads with `AutoModel*.from_pretrained`). `--upto K` takes the model as it was after the first K tasks.

The summed adapter is the run's own saved per-task adapters stacked along the rank (nlora.adapters.
concatenate_saved), so it computes B·A = Σ_t c_t·scaling_t·B_t·A_t: what the run evaluated after task K, c_t being
the weight a method with learned scales gives each adapter (Method.update_scales; 1 otherwise)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from .adapters import ADAPTER_FILE, concatenate_saved
from .config import RunConfig, load_config
from .errors import NloraError
from .io import replace_dir_atomic, staging_dir, write_json_atomic
from .method_state import load_state
from .methods import Method, get_method
from .runner import RunPaths

EXPORT_INFO = "nlora_export.json"


@dataclass
class TrainedRun:
    """A run directory read back: the model after its first `upto` tasks is the sum of `folders` (stacked
    methods) or the one adapter in `folders` (snapshot methods)."""
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
        phases = [self.phase] if self.method.adapter_layout == "snapshot" else range(self.upto)
        return [self.method.adapter_name(k) for k in phases]

    def scales(self) -> list[float | dict[str, float] | None]:
        """The multiplier of each of `folders` in the model (`Method.update_scales`, from the method's state saved
        with the last of them); None where the adapter counts once."""
        if not self.method.has_hook("update_scales"):
            return [None] * len(self.folders)
        state = load_state(self.folders[-1])
        if state is not None:
            self.method.load_state_dict(state)
        declared = self.method.update_scales(self.phase)
        return [declared.get(name) for name in self.adapter_names]


def read_run(run_dir: str | Path, upto: int | None = None) -> TrainedRun:
    """The run in `run_dir` after task `upto` (default: the last task whose adapter is saved)."""
    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise NloraError(f"{root} is not a run directory (no config.yaml)")
    config = load_config(root / "config.yaml", {"output_dir": str(root)})
    method = get_method(config.method)(config)
    tasks, paths = config.tasks, RunPaths(root)
    saved = [k for k in method.phases(len(tasks)) if (paths.adapter(k, tasks[k]) / ADAPTER_FILE).is_file()]
    if not saved:
        raise NloraError(f"{root}: no trained adapter yet (adapters/ is empty); nothing to use")
    if upto is None:
        upto = saved[-1] + 1
    if not 1 <= upto <= len(tasks):
        raise NloraError(f"option --upto: must be between 1 and {len(tasks)} (the run's tasks), got {upto}")
    if upto - 1 not in saved:
        raise NloraError(f"option --upto {upto}: the run has no model after task {upto} "
                         f"({tasks[upto - 1]}); it has one after task(s) {', '.join(str(k + 1) for k in saved)}")
    k = upto - 1
    phases = [k] if method.adapter_layout == "snapshot" else range(k + 1)
    folders = [paths.adapter(j, tasks[j]) for j in phases]
    return TrainedRun(root, config, method, upto, folders)


def _check_summable(run: TrainedRun) -> None:
    if run.method.needs_task_id:
        raise NloraError(f"method '{run.config.method}' evaluates each task with its own adapter (it needs the "
                         "task id), so its tasks do not make one model; each adapters/<k>-<task>/ folder is a "
                         "PEFT adapter of its own")


def write_summed_adapter(run: TrainedRun, folder: Path) -> int:
    """Write the run's model after task `run.upto` as one PEFT adapter into `folder`; returns its rank."""
    from peft import LoraConfig

    _check_summable(run)
    layers = concatenate_saved(run.folders, run.scales())
    rank = next(iter(layers.values()))[0].shape[0]
    state = {}
    for layer, (A, B) in layers.items():
        state[f"{layer}.lora_A.weight"] = A.contiguous()
        state[f"{layer}.lora_B.weight"] = B.contiguous()
    save_file(state, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    config = LoraConfig.from_pretrained(str(run.folders[0]))
    config.r, config.lora_alpha, config.lora_dropout = rank, rank, 0.0  # scaling 1: it is folded into B
    config.base_model_name_or_path = run.config.model
    config.inference_mode = True
    config.save_pretrained(str(folder))
    return rank


def export_run(run_dir: str | Path, out_dir: str | Path, merge: bool = False, upto: int | None = None,
               overwrite: bool = False) -> Path:
    """Write the run's model (after task `upto`) to `out_dir`: a PEFT adapter, or with `merge` a full model.
    The folder appears complete or not at all."""
    run = read_run(run_dir, upto)
    _check_summable(run)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise NloraError(f"output folder {out} already exists and is not empty; choose another or pass "
                         "--overwrite")
    tmp = staging_dir(out)
    try:
        rank = write_summed_adapter(run, tmp)
        if merge:
            _merge_into_base(run, tmp)
        write_json_atomic(tmp / EXPORT_INFO, {
            "run_dir": str(run.root.resolve()), "method": run.config.method, "model": run.config.model,
            "tasks": run.config.tasks[: run.upto], "upto": run.upto, "rank": rank,
            "form": "merged model" if merge else "PEFT LoRA adapter", "eval_mode": run.config.eval_mode})
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _merge_into_base(run: TrainedRun, folder: Path) -> None:
    """Replace the adapter files in `folder` by the base model with the adapter merged in (save_pretrained) and
    its tokenizer."""
    from peft import PeftModel

    from .models import load_backbone

    # in the run's dtype (a bf16 run's model is written in bf16), never quantized: a merge needs the full weights
    backbone = load_backbone(run.config.model, run.config.model_kind, run.config.trust_remote_code,
                             dtype=run.config.dtype)
    merged = PeftModel.from_pretrained(backbone.model, str(folder)).merge_and_unload()
    for name in (ADAPTER_FILE, "adapter_config.json"):
        (folder / name).unlink()
    merged.save_pretrained(str(folder))
    backbone.tokenizer.save_pretrained(str(folder))

