"""The model a run trained, for use outside nlora: `nlora export RUN_DIR OUT_DIR` writes it as one PEFT LoRA
adapter that holds every task's update summed (rank r·K, loads with `PeftModel.from_pretrained`, needs no task
id), or with `--merge` as a full model with the updates merged into the base weights (`save_pretrained`,
loads with `AutoModel*.from_pretrained`). `--upto K` takes the model as it was after the first K tasks. A method
that trains the base (SeqFT) saved the whole model: its export is a copy of it, with the tokenizer.

The summed adapter is the run's own saved per-task adapters stacked along the rank (nlora.adapters.
concatenate_saved), so it computes B·A = Σ_t c_t·scaling_t·B_t·A_t: what the run evaluated after task K, c_t being
the weight a method with learned scales gives each adapter (Method.update_scales; 1 otherwise)."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from .adapters import ADAPTER_FILE, concatenate_saved, quiet_peft_wrap
from .errors import NloraError
from .io import staged_dir, write_json_atomic
from .paths import check_holds_no_run
from .trained_run import TrainedRun, read_run, read_run_config  # noqa: F401  (export's API)

EXPORT_INFO = "nlora_export.json"


def check_summable(run: TrainedRun) -> None:
    """Refuse a run whose tasks make no single model (its method picks an adapter by the task id)."""
    if run.method.needs_task_id:
        raise NloraError(f"method '{run.config.method}' evaluates each task with its own adapter (it needs the "
                         "task id), so its tasks do not make one model; each adapters/<k>-<task>/ folder is a "
                         "PEFT adapter of its own")


def write_summed_adapter(run: TrainedRun, folder: Path) -> int:
    """Write the run's model after task `run.upto` as one PEFT adapter into `folder`; returns its rank."""
    from peft import LoraConfig

    check_summable(run)
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
    check_summable(run)
    out = Path(out_dir)
    check_holds_no_run(out, [run.root], "output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise NloraError(f"output folder {out} already exists and is not empty; choose another or pass "
                         "--overwrite")
    with staged_dir(out) as tmp:
        if run.method.trains == "base":  # the saved model is whole already: --merge changes nothing
            rank, form = None, "full model"
            _copy_full_model(run, tmp)
        else:
            rank, form = write_summed_adapter(run, tmp), "merged model" if merge else "PEFT LoRA adapter"
            if merge:
                _merge_into_base(run, tmp)
        write_json_atomic(tmp / EXPORT_INFO, {
            "run_dir": str(run.root.resolve()), "method": run.config.method, "model": run.config.model,
            "tasks": run.config.tasks[: run.upto], "upto": run.upto, "rank": rank,
            "form": form, "eval_mode": run.config.eval_mode})
    return out


def _merge_into_base(run: TrainedRun, folder: Path) -> None:
    """Replace the adapter files in `folder` by the base model with the adapter merged in (save_pretrained) and
    its tokenizer."""
    from peft import PeftModel

    from .models import load_backbone

    # in the run's dtype (a bf16 run's model is written in bf16), never quantized: a merge needs the full weights
    backbone = load_backbone(run.config.model, run.config.model_kind, run.config.trust_remote_code,
                             dtype=run.config.dtype)
    with quiet_peft_wrap():
        merged = PeftModel.from_pretrained(backbone.model, str(folder)).merge_and_unload()
    for name in (ADAPTER_FILE, "adapter_config.json"):
        (folder / name).unlink()
    merged.save_pretrained(str(folder))
    backbone.tokenizer.save_pretrained(str(folder))



def _copy_full_model(run: TrainedRun, folder: Path) -> None:
    """A method that trains the base saved the whole model (save_pretrained): copy it, without the method's state,
    and add the base model's tokenizer, so that the folder loads with `AutoModel*.from_pretrained` alone."""
    from .method_state import STATE_JSON, STATE_TENSORS
    from .models import load_tokenizer

    for path in sorted(run.folders[-1].iterdir()):
        if path.is_file() and path.name not in (STATE_JSON, STATE_TENSORS):
            shutil.copy2(path, folder / path.name)
    load_tokenizer(run.config.model, run.config.model_kind, run.config.trust_remote_code).save_pretrained(
        str(folder))
