"""Per-task LoRA adapters on one frozen base model, through PEFT's multi-adapter support.

Every adapter added so far is active in the forward pass (PEFT sums the active adapters' updates, so inference
needs no task id); only the current task's adapter has requires_grad. Adapters are saved one folder each, in
PEFT's own format, so `PeftModel.from_pretrained(base, folder)` loads any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from .errors import NloraError
from .faults import fault_point
from .io import replace_dir_atomic, staging_dir

TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "decoder": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION"}


@dataclass
class LoraFactors:
    """One adapted layer of one adapter: ΔW = scaling · B @ A."""
    layer: str
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float


class ContinualAdapters:
    def __init__(self, model: torch.nn.Module, kind: str, r: int, alpha: float, dropout: float,
                 target_modules: list[str]):
        self.base_model = model
        self.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                                task_type=TASK_TYPES[kind])
        self.peft_model: PeftModel | None = None
        self.names: list[str] = []

    @property
    def model(self) -> torch.nn.Module:
        return self.peft_model if self.peft_model is not None else self.base_model

    @property
    def current(self) -> str:
        return self.names[-1]

    def add(self, name: str) -> str:
        """Add a fresh adapter, activate it with all earlier ones, and make only it trainable."""
        config = LoraConfig(**self.lora_config)
        if self.peft_model is None:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
            try:
                self.peft_model = get_peft_model(self.base_model, config, adapter_name=name)
            except ValueError as e:
                raise NloraError(f"option 'target_modules': {e}") from None
        else:
            self.peft_model.add_adapter(name, config)
        self.names.append(name)
        self.activate(self.names, trainable=name)
        return name

    def activate(self, names: list[str], trainable: str | None = None) -> None:
        """Make `names` the summed active adapters (none: the bare base model); freeze all but `trainable`."""
        if not names:
            self.peft_model.base_model.disable_adapter_layers()
            return
        self.peft_model.base_model.enable_adapter_layers()
        self.peft_model.base_model.set_adapter(list(names), inference_mode=True)
        if trainable is not None:
            for p in self.adapter_parameters(trainable):
                p.requires_grad_(True)

    def lora_layers(self) -> list[tuple[str, LoraLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def factors(self, name: str) -> list[LoraFactors]:
        out = []
        for layer_name, layer in self.lora_layers():
            if name in layer.lora_A:
                out.append(LoraFactors(layer_name, layer.lora_A[name].weight, layer.lora_B[name].weight,
                                       float(layer.scaling[name])))
        return out

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for f in self.factors(name) for p in (f.A, f.B)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, name: str, folder: str | Path) -> Path:
        """Write adapter `name` to `folder` in PEFT's format (adapter_config.json + adapter_model.safetensors),
        atomically: the folder appears complete or not at all."""
        folder = Path(folder)
        tmp = staging_dir(folder)
        state = get_peft_model_state_dict(self.peft_model, adapter_name=name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        self.peft_model.peft_config[name].save_pretrained(str(tmp))
        fault_point("adapter_save")
        replace_dir_atomic(tmp, folder)
        return folder

    def load(self, name: str, folder: str | Path) -> None:
        """Load weights saved by `save` into the existing adapter `name`."""
        path = Path(folder) / "adapter_model.safetensors"
        try:
            state = load_file(str(path))
        except Exception as e:
            raise NloraError(f"adapter file {path} is unreadable: {e}") from None
        result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise NloraError(f"adapter file {path} does not match the model: missing {missing[:3]}, "
                             f"unexpected {list(result.unexpected_keys)[:3]}")
