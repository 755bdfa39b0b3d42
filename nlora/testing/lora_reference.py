"""A model rebuilt from saved adapter folders alone, without nlora or PEFT's multi-adapter machinery: each adapted
layer of a fresh base model adds Σ_folders c · scaling · B @ A · x (forward hooks), scaling = lora_alpha / r from
the folder's adapter_config.json and c the folder's declared weight (1 unless a method learns one). The reference
for what a run evaluated and what its adapters contain. For a method that trains the base model itself, the
reference is its saved whole model loaded with plain transformers (`load_saved_model`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_adapter(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """layer path in the base model -> (A, B, scaling) of a PEFT adapter folder."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    state = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if ".lora_A." in key:
            layer = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            out[layer] = (a, state[key.replace(".lora_A.", ".lora_B.")], scaling)
    assert out and len(state) == 2 * len(out), f"{folder}: unexpected keys {sorted(state)[:4]}"
    return out


def add_adapters(model: torch.nn.Module, folders: list[str | Path], scales: list | None = None) -> torch.nn.Module:
    """`model` (a plain base model) with the summed updates of `folders`; no folders: the base model as is.
    `scales[i]` multiplies folder i's update: a number, or {PEFT layer name: number} (a method's learned weights,
    `Method.update_scales`); None or absent: 1."""
    updates: dict[str, list] = {}
    for i, folder in enumerate(folders):
        scale = scales[i] if scales else None
        for layer, (A, B, s) in read_adapter(folder).items():
            c = scale.get("base_model.model." + layer, 1.0) if isinstance(scale, dict) else scale
            updates.setdefault(layer, []).append((A, B, s * (1.0 if c is None else float(c))))
    modules = dict(model.named_modules())
    missing = sorted(set(updates) - set(modules))
    assert not missing, f"adapted layers not in the model: {missing[:3]}"

    def hook(factors):
        def add(module, inputs, output):
            x = inputs[0]
            return output + sum(s * (x @ A.T.to(x.dtype)) @ B.T.to(x.dtype) for A, B, s in factors)
        return add

    for layer, factors in updates.items():
        modules[layer].register_forward_hook(hook(factors))
    return model


def load_saved_model(folder: str | Path, kind: str) -> torch.nn.Module:
    """A whole model saved with save_pretrained, loaded with transformers' Auto classes alone (no nlora)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    loader = {"seq2seq": AutoModelForSeq2SeqLM, "decoder": AutoModelForCausalLM, "encoder": AutoModel}[kind]
    return loader.from_pretrained(str(folder)).eval()


def assert_run_reproduces(run_dir: str | Path) -> None:
    """Rebuild the model of each phase of a stacked-layout run from its adapter folders alone (phase k: the
    adapters of phases 0..k summed) and check that it predicts exactly the run's predictions/<k>-<task>/*.jsonl."""
    from nlora.config import load_config
    from nlora.eval.evaluate import evaluate
    from nlora.models import load_backbone
    from nlora.objectives import make_objective
    from nlora.runner import load_tasks

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    tasks = load_tasks(config)
    folders = sorted((run_dir / "adapters").iterdir(), key=lambda p: int(p.name.split("-")[0]))
    checked = 0
    for k, task in enumerate(tasks):
        predicted = run_dir / "predictions" / f"{k}-{task.name}"
        if not predicted.is_dir():
            continue
        backbone = load_backbone(config.model, config.model_kind)
        model = add_adapters(backbone.model, folders[: k + 1]).eval()
        objective = make_objective(backbone.kind, backbone.tokenizer, config.max_source_length,
                                   config.max_target_length, config.eval_mode)
        for path in sorted(predicted.glob("*.jsonl")):
            evaluated = next(t for t in tasks if t.name == path.stem)
            _, rows = evaluate(objective, model, evaluated.test, config.eval_batch_size, progress=False)
            assert rows == [json.loads(line) for line in path.open()], f"{path} is not reproduced"
            checked += 1
    assert checked, f"{run_dir}: no predictions to reproduce"
