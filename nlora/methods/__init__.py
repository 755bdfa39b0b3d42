"""The method registry: `get_method(name)` returns a Method class; each method is one small module."""

from ..errors import NloraError
from . import bounds, inc_lora, n_lora, o_lora, replay, seq_lora  # noqa: F401  (registers the methods)
from .base import METHODS, Method, register

__all__ = ["METHODS", "Method", "register", "get_method"]


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise NloraError(f"option 'method': unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
