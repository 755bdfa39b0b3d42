"""Weight dtype, device and quantization options: how `auto` resolves, and the checks that refuse a combination
this machine cannot run, before anything is written.

`dtype: auto` does not depend on the transformers version (whose own `auto` reads each checkpoint's config:
LLaMA-2 fp16, Llama-3/Qwen bf16, T5 fp32): float32 for seq2seq models (T5 overflows in float16 and is trained
in float32 in the papers' scripts) and encoders, bfloat16 for decoders on a GPU that supports it, float32 on CPU.
LoRA factors are float32 whatever the base dtype (peft's `autocast_adapter_dtype`), so the optimizer states and the
penalties, which sum in float32 at least (nlora.methods.penalties), keep their precision.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import warnings

import torch

from .errors import NloraError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(option: str, kind: str, device: torch.device) -> str:
    """The weight dtype `option` stands for, for a model of `kind` on `device`."""
    if option != "auto":
        return option
    if kind != "decoder" or device.type == "cpu":
        return "float32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "float32"  # pre-Ampere GPUs emulate bfloat16; float16 would need loss scaling
    return "bfloat16"


def warn_precision(kind: str, dtype: str, mixed_precision: str) -> None:
    """T5-style models overflow in float16 (their feed-forward activations exceed 65504): warn, do not refuse."""
    if kind != "seq2seq":
        return
    if dtype == "float16":
        option = "option 'dtype': float16 weights"
    elif mixed_precision == "fp16":
        option = "option 'mixed_precision': fp16 autocast"
    else:
        return
    warnings.warn(f"{option} on a seq2seq (T5-style) model often overflow to inf/nan; use float32 weights "
                  "(with mixed_precision bf16 if memory is short) or dtype bfloat16", stacklevel=2)


def process_count() -> int:
    """Processes of this run, as the launcher (accelerate launch, torchrun) announces them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_runtime(config) -> None:
    """Refuse, with the option's name, what cannot run on this machine: a device that is not there, a GPU index
    under a multi-process launch, quantization without CUDA or bitsandbytes, flash attention without CUDA or
    flash-attn. Called before the output directory is touched."""
    device = config.device
    cuda_wanted = device.startswith("cuda")
    if cuda_wanted and not torch.cuda.is_available():
        raise NloraError(f"option 'device': {device} asked for, but CUDA is not available on this machine "
                         "(use --device cpu or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise NloraError("option 'device': mps asked for, but MPS is not available on this machine")
    index = re.fullmatch(r"cuda:(\d+)", device)
    if index:
        if int(index.group(1)) >= torch.cuda.device_count():
            raise NloraError(f"option 'device': {device}, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
        if process_count() > 1:
            raise NloraError(f"option 'device': {device} names one GPU, but {process_count()} processes were "
                             "launched; each process takes the GPU of its rank. Choose the GPUs with "
                             "CUDA_VISIBLE_DEVICES and leave 'device' at auto or cuda")
    for option in ("load_in_4bit", "load_in_8bit"):
        if not getattr(config, option):
            continue
        if device == "cpu" or device == "mps" or not torch.cuda.is_available():
            raise NloraError(f"option '{option}': bitsandbytes quantization needs a CUDA GPU "
                             f"({'none is available' if not torch.cuda.is_available() else f'device is {device}'}); "
                             "drop the option, or run on a GPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise NloraError(f"option '{option}' needs bitsandbytes: pip install \"nlora[qlora]\"")
    if config.attn_implementation == "flash_attention_2":
        if device in ("cpu", "mps") or not torch.cuda.is_available():
            raise NloraError("option 'attn_implementation': flash_attention_2 needs a CUDA GPU; use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise NloraError("option 'attn_implementation': flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn); use sdpa")


def select_device(option: str) -> None:
    """Honour `cuda:N` in a single process: accelerate places a lone process on the current CUDA device."""
    index = re.fullmatch(r"cuda:(\d+)", option)
    if index:
        torch.cuda.set_device(int(index.group(1)))


def placed(device: torch.device) -> torch.device:
    """`device` with its index (the current one for a bare `cuda`), the form a device_map needs."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def autocast_off(device: torch.device):
    """A context without autocast on `device` (a no-op for device types autocast does not know, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
