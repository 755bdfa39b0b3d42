"""Checks that need the loaded model or the launched processes, run by `runner.run` before anything is written:
a bad combination must fail in seconds with one NloraError, not at the first training step after the output
directory was prepared (with --overwrite, the old run deleted). The options' own ranges are checked in
RunConfig.validate and the output directory in rundir.check_output_dir; add any further such check here."""

from __future__ import annotations

import torch

from typing import TYPE_CHECKING

from .errors import NloraError

if TYPE_CHECKING:
    from .config import RunConfig
    from .methods import Method
    from .models import Backbone


def preflight(config: "RunConfig", method: "Method", backbone: "Backbone", target_modules: list[str],
              num_processes: int) -> None:
    check_batch_split(config, num_processes)
    check_trained_state(config, method)
    method.check_model(backbone.model, target_modules)


def check_trained_state(config: "RunConfig", method: "Method") -> None:
    """A method that trains every base parameter (Method.trains "base") cannot train a quantized base, nor one
    sharded by nlora's FSDP2 (which keeps the base frozen and only the adapters whole), and has no LoRA factors
    (to train one of, or to mask the gradients of)."""
    if method.trains not in ("adapters", "base"):
        raise NloraError(f"method '{method.name}': trains must be 'adapters' or 'base', got {method.trains!r}")
    if method.trains != "base":
        return
    for option in ("load_in_4bit", "load_in_8bit"):
        if getattr(config, option):
            raise NloraError(f"option '{option}': method '{method.name}' trains every base weight, which a "
                             "quantized base cannot; load it in bfloat16 (--dtype bfloat16) instead")
    if config.sharding != "none":
        raise NloraError(f"option 'sharding': method '{method.name}' trains every base weight, but nlora's "
                         f"{config.sharding} keeps the sharded base frozen; use sharding none (DDP or DeepSpeed "
                         "ZeRO-2 through accelerate launch)")
    if config.train_factors != "both":
        raise NloraError(f"option 'train_factors': method '{method.name}' trains every base weight and has no "
                         "LoRA factors; leave it at both")
    if config.grad_mask != "none":  # it masks rows of the trained LoRA factors: with none it would do nothing
        raise NloraError(f"option 'grad_mask': {config.grad_mask} masks the gradients of LoRA factors, and method "
                         f"'{method.name}' trains the base weights, which it does not cover; leave it at none")


def check_batch_split(config: "RunConfig", num_processes: int) -> None:
    if config.batch_size % num_processes:
        raise NloraError(f"option 'batch_size': {config.batch_size} does not split evenly across "
                         f"{num_processes} processes (batch_size is the global batch)")


def layer_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of a layer LoRA can adapt: torch Linear, or transformers' Conv1D (weight stored d_in x d_out)."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.nf, module.weight.shape[0]
    return None


def targeted_layers(model: torch.nn.Module, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """Layer name -> (d_out, d_in) of every layer a target module name matches (name or name suffix)."""
    out = {}
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in target_modules):
            shape = layer_shape(module)
            if shape is not None:
                out[name] = shape
    return out
