"""The built-in methods: one file each, on the contract of `base.Method`; `registry` holds them by name.

Internal to the package: a method author imports what they need from `nlora` (its `__all__`)."""

from .base import Method, MethodContext
from .registry import (METHODS, get_method, load_methods, option_owner, per_task_pairs, register, resolve,  # noqa: F401
                       split_method_options)
# each module registers its method(s)
from . import (bounds, clora, ewc, ilora, inc_lora, inflora, lwf, n_lora, o_lora, replay,  # noqa: F401,E402
               seq_ft, seq_lora, slora)

__all__ = ["METHODS", "Method", "MethodContext", "register", "get_method", "resolve"]
