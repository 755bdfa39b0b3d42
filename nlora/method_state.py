"""A method's state on disk: tensors in `method_state.safetensors`, everything else in `method_state.json`, where a
tensor stands as {"__tensor__": key}. Dicts and lists nest freely. No pickle: only tensors and JSON values load back.
Written into a staging folder by the caller, so it appears atomically with the adapter or checkpoint beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import NloraError

STATE_TENSORS = "method_state.safetensors"
STATE_JSON = "method_state.json"


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"method state {path or '<root>'}: dict keys must be strings")
        return {k: _split(v, f"{path}/{k}" if path else k, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"method state {path}: {type(value).__name__} is neither a tensor nor a JSON value")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_state(state: dict[str, Any], folder: Path) -> None:
    """Write `state` into `folder` (nothing for an empty state)."""
    if not state:
        return
    tensors: dict[str, torch.Tensor] = {}
    plain = _split(state, "", tensors)
    if tensors:
        save_file(tensors, str(Path(folder) / STATE_TENSORS))
    (Path(folder) / STATE_JSON).write_text(json.dumps(plain, sort_keys=True))


def load_state(folder: Path) -> dict[str, Any] | None:
    """The state saved in `folder`, or None where none was saved."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        return None
    try:
        plain = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS)) if (folder / STATE_TENSORS).is_file() else {}
        return _join(plain, tensors)
    except Exception as e:  # written atomically with its folder: this is outside damage
        raise NloraError(f"method state in {folder} is unreadable ({e})") from None
