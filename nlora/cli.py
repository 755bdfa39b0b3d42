"""The `nlora` command line. The options of `run` and `demo` are generated from RunConfig's fields, so the CLI,
the YAML keys and the Python API stay one and the same."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import RunConfig, base_type, config_fields, load_config, public_name
from .errors import NloraError

def _add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the keys below")
    for f in config_fields():
        if f.name in skip:
            continue
        flag = "--" + public_name(f.name).replace("_", "-")
        dest = "cfg__" + f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default if default not in (None, []) else 'unset'})"
        if base_type(f) is bool:
            parser.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=dest, default=None, metavar=public_name(f.name).upper(), help=help_text)


def _overrides(args: argparse.Namespace) -> dict:
    return {public_name(k[len("cfg__"):]): v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlora", description="Continual learning of language models with "
                                     "per-task LoRA adapters (N-LoRA, IncLoRA, ...).")
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="train a model on a sequence of tasks and write a run directory")
    _add_config_options(p_run)
    p_run.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from where it stopped (same configuration)")
    p_run.add_argument("--quiet", action="store_true", help="no progress bars")

    p_resume = sub.add_parser("resume", help="continue a stopped run with the configuration saved in it")
    p_resume.add_argument("run_dir", help="the run directory")
    p_resume.add_argument("--quiet", action="store_true", help="no progress bars")

    p_demo = sub.add_parser("demo", help="the offline default job: N-LoRA vs IncLoRA on generated tasks")
    _add_config_options(p_demo, skip=("method",))
    p_demo.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("methods", help="list the available methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("run", "resume"):
            from .runner import run
            from .summary import format_run

            if args.command == "run":
                config, resume = load_config(args.config, _overrides(args)), args.resume
            else:
                config = load_config(Path(args.run_dir) / "config.yaml", {"output_dir": args.run_dir})
                resume = True
            metrics = run(config, progress=not args.quiet, resume=resume)
            print(format_run(metrics))
            print(f"run directory: {Path(config.output_dir).resolve()}")
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.config, _overrides(args), progress=not args.quiet)
        elif args.command == "methods":
            from .methods import METHODS

            for name, cls in sorted(METHODS.items()):
                print(f"{name:12s} {cls.description}")
        return 0
    except NloraError as e:
        print(f"nlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nlora: interrupted; everything written so far is complete on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
