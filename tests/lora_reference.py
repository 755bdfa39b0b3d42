"""A model rebuilt from saved adapter folders alone, without nlora or PEFT's multi-adapter machinery: each adapted
layer of a fresh base model adds Σ_folders scaling · B @ A · x (forward hooks), scaling = lora_alpha / r from
the folder's adapter_config.json. The reference for what a run evaluated and what its adapters contain."""

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


def add_adapters(model: torch.nn.Module, folders: list[str | Path]) -> torch.nn.Module:
    """`model` (a plain base model) with the summed updates of `folders`; no folders: the base model as is."""
    updates: dict[str, list] = {}
    for folder in folders:
        for layer, factors in read_adapter(folder).items():
            updates.setdefault(layer, []).append(factors)
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
