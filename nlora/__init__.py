"""nlora: continual learning of language models with per-task LoRA adapters.

    from nlora import RunConfig, run
    metrics = run(RunConfig(model="tiny-t5", tasks=["a", "b"], data_dir="data", output_dir="runs/x"))

The public API is `__all__`, in three parts; every other module is internal.
- Running: RunConfig, load_config, run, NloraError; study (a table of runs: nlora.studies).
- Writing a method (the contract, hook order and resume included: `Method`'s docstring): Method, MethodContext,
  MethodOptions, option, register, METHODS (the registry by name), LossTerm and LayerFactors (a penalty on the
  trained adapter's factors), Example (one task example), StepOutputs (a training forward's outputs),
  ContinualAdapters (`ctx.adapters`), Objective (`ctx.objective`), TaskData (`ctx.tasks`), to_device.
- Extra passes a method runs besides training (nlora.methods.passes): loss_gradients (of the task loss on given
  examples), task_loss_gradients (of the task loss alone on the step being trained), per_example_squared_gradients,
  auxiliary_outputs, layer_inputs, my_share, sum_over_processes, eval_mode.
The conformance kit for a method, built in or not, is `nlora.testing`.

The names are imported on first use, so `import nlora` (and `nlora --help`, `nlora status`) stays light: torch,
transformers and peft load only with what needs them.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

_LAZY = {
    "RunConfig": "config", "load_config": "config", "NloraError": "errors",
    "METHODS": "methods.registry", "register": "methods.registry",
    "Method": "methods.base", "MethodContext": "methods.base", "MethodOptions": "options", "option": "options",
    "LossTerm": "train.regularization", "LayerFactors": "adapters", "ContinualAdapters": "adapters",
    "Example": "tasks.data", "TaskData": "tasks.data",
    "StepOutputs": "objectives", "Objective": "objectives", "to_device": "objectives",
    **{name: "methods.passes" for name in (
        "loss_gradients", "task_loss_gradients", "per_example_squared_gradients", "auxiliary_outputs",
        "layer_inputs", "my_share", "sum_over_processes", "eval_mode")},
}
__all__ = ["__version__", "run", "study", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        if _LAZY[name].startswith("methods"):
            _import_module(".methods", __name__)  # the built-in methods registered with the registry
        return getattr(_import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


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
