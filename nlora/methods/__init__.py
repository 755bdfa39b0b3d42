"""The methods: one file each, on the contract of `base.Method`; `registry` holds them by name."""

from .base import Method, MethodContext
from .registry import (METHODS, get_method, option_owner, per_task_pairs, register, resolve,  # noqa: F401
                       split_method_options)
from . import bounds, ewc, ilora, inc_lora, n_lora, o_lora, replay, seq_lora, slora  # noqa: F401,E402  (registers the methods)

__all__ = ["METHODS", "Method", "MethodContext", "register", "get_method", "resolve"]
