"""nlora: continual learning of language models with per-task LoRA adapters.

    from nlora import RunConfig, run
    metrics = run(RunConfig(model="tiny-t5", tasks=["a", "b"], data_dir="data", output_dir="runs/x"))
"""

from .config import RunConfig, load_config
from .errors import NloraError
from .methods import METHODS, Method, register

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "run", "NloraError", "METHODS", "Method", "register", "__version__"]


def run(config: RunConfig, progress: bool = True, resume: bool = False) -> dict:
    """Train `config.tasks` in order with `config.method`; returns metrics.json's content. With `resume`,
    continue the run in `config.output_dir` from where it stopped."""
    from .runner import run as _run

    return _run(config, progress=progress, resume=resume)
