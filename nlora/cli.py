"""The `nlora` command line. The options of `run` and `demo` are generated from RunConfig's fields, so the CLI,
the YAML keys and the Python API stay one and the same."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import yaml

from .config import config_fields, load_config
from .errors import NloraError, did_you_mean
from .io import is_disk_full
from .method_catalog import method_catalog, option_spec, unknown_method
from .studies.cli import add_parser as add_study_parser
from .studies.cli import main as study_main

# Commands whose flags include every method's options (read from the methods' catalog: nlora.method_catalog).
METHOD_COMMANDS = ("run", "demo")
# Commands that read the run directory RUN_DIR names (and the model it trained: they import torch).
RUN_DIR_COMMANDS = ("export", "predict", "rescore")


def _shown_default(default) -> object:
    return default if default not in (None, []) else "unset"


def _add_flags(parser, specs: list[dict]) -> None:
    """One flag per option (nlora.method_catalog.option_spec)."""
    for spec in specs:
        flag = "--" + spec["name"].replace("_", "-")
        dest = "cfg__" + spec["name"]
        help_text = f"{spec['help']} (default: {_shown_default(spec['default'])})"
        if spec["kind"] == "on":  # on by default: --no-<flag> turns it off
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif spec["kind"] == "flag":
            parser.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=dest, default=None, metavar=spec["name"].upper(), help=help_text)


def _add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                        catalog: dict | None = None) -> None:
    """The core options, then one group per method of `catalog` (nlora.method_catalog) with its own."""
    from .config import RunConfig

    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the keys below")
    _add_flags(parser, [option_spec(RunConfig, f) for f in config_fields() if f.name not in skip])
    seen: set[str] = set()
    for name, entry in sorted((catalog or {}).items()):
        specs = [o for o in entry["options"] if o["name"] not in seen]
        if specs:
            seen.update(o["name"] for o in specs)
            _add_flags(parser.add_argument_group(f"{name} options"), specs)


def _overrides(args: argparse.Namespace) -> dict:
    return {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}


def _method_modules(argv: list[str]) -> list[str]:
    """--method-module values in argv, read before parsing: their methods' options become flags."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--method-module" and i + 1 < len(argv):
            out += [m for m in argv[i + 1].split(",") if m]
        elif arg.startswith("--method-module="):
            out += [m for m in arg.split("=", 1)[1].split(",") if m]
    return out


def _catalog_for(argv: list[str]) -> dict | None:
    """The methods' catalog when the command's flags include their options (run, demo), else None."""
    return method_catalog(_method_modules(argv)) if argv and argv[0] in METHOD_COMMANDS else None


def build_parser(argv: list[str] | None = None, catalog: dict | None = None) -> argparse.ArgumentParser:
    """The parser of `argv`'s command; `catalog`: the methods' (default: read for run and demo)."""
    parser = argparse.ArgumentParser(prog="nlora", description="Continual learning of language models with "
                                     "per-task LoRA adapters (N-LoRA, IncLoRA, ...).")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.set_defaults(command_parsers=sub.choices)  # each command's parser reports its own errors

    argv = list(argv or [])
    catalog = _catalog_for(argv) if catalog is None else catalog
    p_run = sub.add_parser("run", help="train a model on a sequence of tasks and write a run directory",
                           usage="nlora run [--config FILE.yaml] [OPTION ...]  (`nlora run --help` lists them)")
    _add_config_options(p_run, catalog=catalog if argv[:1] == ["run"] else None)
    p_run.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from where it stopped (same configuration)")
    p_run.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_launch_option(p_run)
    p_run.add_argument("--dry-run", action="store_true",
                       help="print the resolved configuration (preset, config file and flags applied) and exit")

    p_resume = sub.add_parser("resume", help="continue a stopped run with the configuration saved in it")
    p_resume.add_argument("run_dir", help="the run directory")
    p_resume.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_launch_option(p_resume)

    p_demo = sub.add_parser("demo", help="the offline default job: N-LoRA vs IncLoRA on generated tasks",
                            usage="nlora demo [--config FILE.yaml] [OPTION ...]  (`nlora demo --help` lists them)")
    _add_config_options(p_demo, skip=("method", "benchmark", "order"),
                        catalog=catalog if argv[:1] == ["demo"] else None)
    p_demo.add_argument("--num-seeds", type=int, default=3, metavar="N",
                        help="run both methods on seeds SEED, SEED+1, ..., SEED+N-1 (default: 3)")
    p_demo.add_argument("--quiet", action="store_true", help="no progress bars")
    p_demo.add_argument("--generative", action="store_true",
                        help="free-text tasks instead: nlora's generated TRACE-layout stream, one task per metric, "
                             "mixed with a classification task, on a built-in tiny model (a minute or two)")

    p_methods = sub.add_parser("methods", help="list the available methods, or one method's options")
    p_methods.add_argument("name", nargs="?", help="a method: print its options with their defaults")
    p_methods.add_argument("--method-module", default=None, metavar="MODULE",
                           help="modules or .py files registering methods of your own (comma-separated)")
    p_presets = sub.add_parser("presets", help="list the benchmark presets, or print one (a YAML file to copy)")
    p_presets.add_argument("benchmark", nargs="?", help="standard, long (N-LoRA's protocol), o-lora-standard or "
                           "o-lora-long (O-LoRA's), trace or superni (free-text tasks)")
    p_presets.add_argument("order", nargs="?", type=int, help="the task order (standard: 1-3, long: 4-6, "
                           "o-lora-long: 6, trace: 1, superni: 1-2)")

    p_report = sub.add_parser("report", help="plots and report.md of a run, or a comparison of several runs")
    p_report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p_report.add_argument("--output-dir", metavar="DIR",
                          help="where to write (default for one run: RUN_DIR/report; required for several)")
    p_report.add_argument("--rediagnose", action="store_true",
                          help="recompute each run's diagnostics.json from its saved adapters first")
    _add_threshold_options(p_report, "that of the run's diagnostics.json, else 0.01")
    p_report.add_argument("--overwrite", action="store_true",
                          help="replace --output-dir if it holds files (RUN_DIR/report is always replaced)")

    p_rescore = sub.add_parser("rescore", help="compute every score of a run again from its predictions files "
                               "(another scoring mode, BWT denominator or metric) and rewrite its metrics.json")
    p_rescore.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p_rescore.add_argument("--scoring-mode", metavar="MODE", help="standard or trace_reference (default: the run's)")
    p_rescore.add_argument("--bwt-denominator", metavar="t-1|t", help="(default: the run's)")
    p_rescore.add_argument("--metric", action="append", metavar="TASK=METRIC",
                           help="score TASK with METRIC instead (nlora.tasks.scoring; repeatable)")

    p_status = sub.add_parser("status", help="where a run is (task, step, elapsed and remaining time), its matrix "
                              "so far and its last logged losses; works while it runs, once stopped, or complete")
    p_status.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")

    p_diagnose = sub.add_parser("diagnose", help="recompute RUN_DIR/diagnostics.json from the saved adapters "
                                "(collision, orthogonality, sparsity, norms of the task updates)")
    p_diagnose.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    _add_threshold_options(p_diagnose, "0.01")

    p_export = sub.add_parser("export", help="write the model a run trained as one PEFT adapter holding every "
                              "task's update summed (no task id needed), or as a merged full model")
    p_export.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p_export.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write")
    p_export.add_argument("--merge", action="store_true",
                          help="write the base model with the updates merged into its weights (save_pretrained)")
    _add_upto_option(p_export)
    p_export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds files")

    p_predict = sub.add_parser("predict", help="predictions of the model a run trained, as JSONL")
    p_predict.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    source = p_predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--tasks", metavar="A,B,...", help="dataset names to predict (their test split)")
    source.add_argument("--input", metavar="FILE.jsonl",
                        help='one example a line: {"sentence": ..., "options": [...]}, optionally "label", '
                             '"task", "instruction"')
    p_predict.add_argument("--data-dir", metavar="DIR", help="data folder of --tasks (default: the run's)")
    _add_upto_option(p_predict)
    p_predict.add_argument("--output", metavar="FILE.jsonl", help="where to write (default: standard output)")
    p_predict.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p_predict.add_argument("--batch-size", type=int, metavar="N", help="default: the run's eval_batch_size")
    p_predict.add_argument("--max-samples", type=int, metavar="N",
                           help="test examples per task of --tasks (default: the run's max_eval_samples; 0: all)")
    p_predict.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p_predict.add_argument("--quiet", action="store_true", help="no progress bar")

    p_general = sub.add_parser("eval-general", help="general-ability retention: the base model and the model after "
                               "chosen tasks scored on lm-evaluation-harness benchmarks (RUN_DIR/general.json)")
    p_general.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p_general.add_argument("--tasks", required=True, metavar="A,B,...",
                           help="lm-eval tasks or groups (e.g. mmlu,gsm8k), or tasks defined in --include-path")
    p_general.add_argument("--upto", metavar="K,...", help="score the model after these tasks (default: the last "
                           "trained); the base model is always scored")
    p_general.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples (default: each "
                           "benchmark's own)")
    p_general.add_argument("--limit", type=int, metavar="N", help="only the first N examples of each benchmark (a "
                           "smoke test, not comparable with full benchmarks)")
    p_general.add_argument("--batch-size", type=int, default=8, metavar="N", help="(default: 8)")
    p_general.add_argument("--include-path", metavar="DIR", help="folder of lm-eval task YAML files of your own "
                           "(local data: dataset_path: json)")
    p_general.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    add_study_parser(sub)
    return parser


def _add_upto_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upto", type=int, metavar="K",
                        help="the model as it was after task K (1 = the first task; default: the last trained)")


def _add_launch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-processes", type=int, default=None, metavar="N",
                        help="data-parallel processes (one per GPU), started through accelerate's launcher: the "
                             "same as `accelerate launch --multi_gpu --num_processes N -m nlora ...`; results do "
                             "not depend on N (batch_size is the global batch)")


def _launch(argv: list[str], num_processes: int) -> int | None:
    """Start `num_processes` copies of this command through accelerate's launcher and wait for them; None when
    this process should simply run (one process, or already one of the launched processes)."""
    if num_processes < 1:
        raise NloraError(f"option --num-processes: must be >= 1, got {num_processes}")
    if "WORLD_SIZE" in os.environ:  # started by a launcher already
        if int(os.environ["WORLD_SIZE"]) != num_processes:
            raise NloraError(f"option --num-processes is {num_processes}, but this process was launched as one "
                             f"of {os.environ['WORLD_SIZE']}")
        return None
    if num_processes == 1:
        return None
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--num-processes="):
            skip = False
            continue
        skip = arg == "--num-processes"
        if not skip:
            rest.append(arg)
    launch_args = launch_command_parser().parse_args(
        ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--module", "nlora", *rest])
    try:
        launch_command(launch_args)
    except ChildFailedError as e:  # each process has printed its own error
        codes = [f.exitcode for f in e.failures.values() if f.exitcode > 0]
        return codes[0] if codes else 1
    return 0


def _add_threshold_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--rel-eps", type=float, metavar="X",
                        help=f"an entry of a task update counts as non-zero when |x| > X * the layer's scale "
                             f"(default: {default})")
    parser.add_argument("--eps-scale", default=None, metavar="max|rms",
                        help="the layer's scale: max|dW| or RMS(dW) (default: max)")


def print_presets(benchmark: str | None, order: int | None) -> None:
    from .tasks.benchmarks import PUBLISHED, PUBLISHED_SOURCE, list_presets, load_preset, preset_path, preset_source

    if benchmark is not None:
        if order is None:
            raise NloraError(f"nlora presets {benchmark}: give the order too, e.g. `nlora presets {benchmark} "
                             f"{1 if benchmark == 'standard' else 4}`")
        print(preset_path(benchmark, order).read_text(encoding="utf-8"), end="")
        return
    def per_task(p: dict, key: str, label: str) -> str:
        if p.get(f"{key}_per_task"):
            return f"{label} per task " + "/".join(sorted({f"{x:g}" for x in p[f"{key}_per_task"]}))
        return f"{label} {p[key]:g}" if key in p else ""

    print(f"{'preset':<38} {'method':<7} {'tasks':>5} {'lr':>7} {'epochs':>7} {'batch':>5}  lambda; source")
    for b, o, _ in list_presets():
        p = load_preset(b, o)
        lam = ", ".join(x for x in (per_task(p, "lambda", "λ"), per_task(p, "orth_lambda", "λ1"),
                                    per_task(p, "l2_lambda", "λ2")) if x)
        epochs = "/".join(sorted({f"{x:g}" for x in p["epochs_per_task"]})) if p.get("epochs_per_task") \
            else str(p["epochs"])
        paper, script = preset_source(b, o)
        batch = p["batch_size"] * p.get("gradient_accumulation_steps", 1)  # the examples of an optimizer step
        print(f"{'--benchmark ' + b + ' --order ' + str(o):<38} {p['method']:<7} {len(p['tasks']):>5} "
              f"{float(p['lr']):>7.0e} {epochs:>7} {batch:>5}  {lam + '; ' if lam else ''}{paper}, {script}")
    print(f"\npublished AP (%), {PUBLISHED_SOURCE}:")
    for b, scores in PUBLISHED.items():
        print(f"  {b:<9} " + "  ".join(f"{m} {v:.1f}" for m, v in scores.items()))
    print("\n`nlora presets BENCHMARK ORDER` prints a preset's file; "
          "`nlora run --benchmark B --order K --dry-run` shows the resolved configuration.")


def print_methods(name: str | None, modules: list[str]) -> None:
    catalog = method_catalog(modules)
    if name is None:
        for method, entry in sorted(catalog.items()):
            print(f"{method:12s} {entry['description']}")
        print("\n`nlora methods NAME` lists a method's options.")
        return
    if name not in catalog:
        raise unknown_method(name, list(catalog))
    print(f"{name}: {catalog[name]['description']}")
    if not catalog[name]["options"]:
        print("  no options of its own")
    for spec in catalog[name]["options"]:
        flag = "--" + spec["name"].replace("_", "-")
        choices = f"one of {', '.join(map(str, spec['choices']))}; " if spec["choices"] else ""
        print(f"  {flag:<24} {spec['help']} ({choices}default: {_shown_default(spec['default'])})")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line parsed and its names checked (before anything heavy is imported): an unknown method or
    option is one error, with the closest names, under the usage of its command."""
    catalog = _catalog_for(argv)
    parser = build_parser(argv, catalog)
    args, extras = parser.parse_known_args(argv)
    method = getattr(args, "cfg__method", None)
    if catalog is not None and method is not None and method not in catalog:  # its options are unknown too
        raise unknown_method(method, list(catalog))
    if extras:
        command = args.command_parsers[args.command]
        flags = [flag for action in command._actions for flag in action.option_strings]
        typed = next((e.split("=", 1)[0] for e in extras if e.startswith("--")), "")
        command.error(f"unrecognized arguments: {' '.join(extras)}{did_you_mean(typed, flags) if typed else ''}")
    return args


def run_general(args: argparse.Namespace) -> None:
    from .eval.general import GENERAL_FILE, GeneralSettings, eval_general, format_general, lm_eval_command

    benchmarks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        upto = None if args.upto is None else [int(k) for k in args.upto.split(",") if k.strip()]
    except ValueError:
        raise NloraError(f"option --upto: a comma-separated list of task numbers, got {args.upto!r}") from None
    settings = GeneralSettings(num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size)
    record = eval_general(args.run_dir, benchmarks, upto=upto, settings=settings, include_path=args.include_path,
                          device=args.device)
    print("\n".join(format_general(record)))
    print(f"written: {(Path(args.run_dir) / GENERAL_FILE).resolve()}")
    last = max(int(k) for k in record["scores"])
    print(f"the same numbers from lm-eval's CLI (after task {last}):\n  "
          + lm_eval_command(args.run_dir, record, last, benchmarks, args.include_path))


class Terminated(BaseException):
    """SIGTERM, raised where the process is (as Ctrl-C raises KeyboardInterrupt), so that a write in progress
    cleans up after itself and the lock on a run directory is let go."""


def _raise_terminated(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = None  # the run directory being written, named in the advice on how to continue it
    again = None  # or the advice on how to continue the command
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        args = parse_arguments(argv)  # loads the methods of --method-module files: their errors are named
        if args.command in RUN_DIR_COMMANDS:  # a mistyped folder is named before torch is imported
            from .rundir import check_run_dir

            check_run_dir(args.run_dir)
        if args.command in ("run", "resume") and args.num_processes is not None \
                and not getattr(args, "dry_run", False):
            code = _launch(argv, args.num_processes)
            if code is not None:
                return code
        if args.command in ("run", "resume"):
            from accelerate import PartialState

            from .analysis.summary import format_run
            from .runner import run
            from .train.engine import shutdown

            if args.command == "run":
                config, resume = load_config(args.config, _overrides(args)), args.resume
                if args.dry_run:
                    print(yaml.safe_dump(config.validate().to_dict(), sort_keys=False), end="")
                    return 0
            else:
                saved = Path(args.run_dir) / "config.yaml"
                if saved.is_file():  # an edit is named as such before it is read as a configuration
                    from .config import load_yaml_file
                    from .provenance import check_config_digest
                    from .rundir import RESUME_FREE_KEYS

                    check_config_digest(Path(args.run_dir) / "run.json", load_yaml_file(saved), saved,
                                        RESUME_FREE_KEYS)
                config = load_config(saved, {"output_dir": args.run_dir}, saved_run=True)
                resume = True
            run_dir = config.output_dir
            metrics = run(config, progress=not args.quiet, resume=resume)
            if PartialState().is_main_process:
                print(format_run(metrics))
                print(f"run directory: {Path(config.output_dir).resolve()}")
            shutdown()
        elif args.command == "demo":
            from .demo import run_demo, run_generative_demo

            if args.generative:
                run_generative_demo(args.config, _overrides(args), progress=not args.quiet)
                return 0
            if args.num_seeds < 1:
                raise NloraError(f"option --num-seeds: must be >= 1, got {args.num_seeds}")
            again = "the same `nlora demo` command continues: finished runs are reused, the stopped one resumes"
            run_demo(args.config, _overrides(args), progress=not args.quiet, num_seeds=args.num_seeds)
        elif args.command == "presets":
            print_presets(args.benchmark, args.order)
        elif args.command == "report":
            from .analysis.report import write_report

            folder = write_report(args.run_dirs, args.output_dir, rediagnose=args.rediagnose,
                                  rel_eps=args.rel_eps, eps_scale=args.eps_scale, overwrite=args.overwrite)
            print(f"report: {(folder / 'report.md').resolve()}")
        elif args.command == "rescore":
            from .analysis.summary import format_run
            from .eval.rescore import rescore_run

            metrics = rescore_run(args.run_dir, args.scoring_mode, args.bwt_denominator, args.metric)
            print(format_run(metrics))
            print(f"written: {(Path(args.run_dir) / 'metrics.json').resolve()}")
        elif args.command == "status":
            from .analysis.status import format_status, run_status

            print(format_status(run_status(args.run_dir)))
        elif args.command == "diagnose":
            from .analysis.diagnostics import DIAGNOSTICS_FILE, diagnose_run, format_diagnostics

            for run_dir in args.run_dirs:
                options = {k: v for k, v in (("rel_eps", args.rel_eps), ("eps_scale", args.eps_scale)) if v is not None}
                diagnostics = diagnose_run(run_dir, **options)
                print(format_diagnostics(diagnostics))
                print(f"written: {(Path(run_dir) / DIAGNOSTICS_FILE).resolve()}")
        elif args.command == "export":
            import json

            from .export import EXPORT_INFO, export_run

            out = export_run(args.run_dir, args.out_dir, merge=args.merge, upto=args.upto, overwrite=args.overwrite)
            print(f"{json.loads((out / EXPORT_INFO).read_text())['form']}: {out.resolve()}")
        elif args.command == "predict":
            from .predict import accuracy_lines, predict_run

            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
            records = predict_run(args.run_dir, tasks=tasks, data_dir=args.data_dir, input_file=args.input,
                                  upto=args.upto, output=args.output, batch_size=args.batch_size,
                                  max_samples=args.max_samples, device=args.device, progress=not args.quiet,
                                  overwrite=args.overwrite)
            for line in accuracy_lines(records):
                print(line, file=sys.stderr)
        elif args.command == "eval-general":
            run_general(args)
        elif args.command == "study":
            return study_main(args)
        elif args.command == "methods":
            print_methods(args.name, [m for m in (args.method_module or "").split(",") if m])
        return 0
    except NloraError as e:
        print(f"nlora: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        how = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        advice = f"; `nlora resume {run_dir}` continues the run" if run_dir else f"; {again}" if again else ""
        print(f"nlora: {how}; everything written so far is complete on disk{advice}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    except Exception as e:
        if not is_disk_full(e):
            raise
        what = getattr(e, "filename", None) or (f"a file in {run_dir}" if run_dir else "a file")
        advice = (f"everything written before is complete: free some space, then `nlora resume {run_dir}` "
                  "continues the run" if run_dir else "free some space and run the command again")
        print(f"nlora: error: no space left on device: {what} could not be written; {advice}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
