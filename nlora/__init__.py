"""nlora: continual learning of language models with per-task LoRA adapters.

    from nlora import RunConfig, run
    metrics = run(RunConfig(model="tiny-t5", tasks=["a", "b"], data_dir="data", output_dir="runs/x"))

The names below are imported on first use, so `import nlora` (and `nlora --help`, `nlora status`) stays light:
torch, transformers and peft load only with what needs them.
"""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "run", "study", "NloraError", "METHODS", "Method", "MethodContext", "MethodOptions",
           "option", "register", "__version__"]

_LAZY = {"RunConfig": "config", "load_config": "config", "NloraError": "errors", "METHODS": "methods",
         "Method": "methods", "MethodContext": "methods", "register": "methods", "MethodOptions": "options",
         "option": "options"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nlora' has no attribute {name!r}")


def run(config, progress: bool = True, resume: bool = False) -> dict:
    """Train `config.tasks` in order with `config.method`; returns metrics.json's content. With `resume`,
    continue the run in `config.output_dir` from where it stopped."""
    from .runner import run as _run

    return _run(config, progress=progress, resume=resume)


def study(spec, output_dir=None, workers: int = 1, rerun_failed: bool = False, fail_fast: bool = False,
          progress: bool = True, report: bool = True):
    """Run a study (a study file's path, the name of one nlora ships, or the same as a mapping) on this machine
    with `workers` cells at once, then write its report; returns what ran (nlora.studies.execute.Outcome).
    `nlora study run --executor slurm` runs one on a SLURM cluster."""
    from .studies.execute import run_study
    from .studies.local import LocalExecutor
    from .studies.report import write_study_report
    from .studies.spec import Study, read_study

    plan = Study.from_dict(spec) if isinstance(spec, dict) else read_study(spec)
    outcome = run_study(plan, output_dir, LocalExecutor(workers), rerun_failed=rerun_failed, fail_fast=fail_fast,
                        progress=progress)
    if report and outcome.ran + outcome.skipped:
        write_study_report(outcome.study_dir)
    return outcome
