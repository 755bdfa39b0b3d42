"""`nlora study plan|run|status|report|run-cell`: the command line of studies (nlora.studies)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="a table of runs (methods x orders x seeds, tuned on dev) from one study "
                       "file, on this machine or a SLURM cluster")
    verbs = p.add_subparsers(dest="study_command", required=True, metavar="{plan,run,status,report,list}")

    plan = verbs.add_parser("plan", help="print the cells of a study, their count and an estimate of their cost")
    plan.add_argument("study", metavar="FILE", help="a study file, or the name of one nlora ships (see --list)")
    plan.add_argument("--output-dir", metavar="DIR", help="the study directory (default: the file's output_dir, "
                      "else runs/studies/NAME); its finished cells give the measured cost per step")
    _add_set_option(plan)
    plan.add_argument("--seconds-per-step", type=float, metavar="S",
                      help="cost of one training step (evaluation included) to estimate with, where no cell of the "
                           "study has finished yet")
    plan.add_argument("--cells", action="store_true", help="list every cell, not only the count per phase")

    run = verbs.add_parser("run", help="run every cell that is not done (a rerun skips finished cells, resumes "
                           "killed ones)")
    run.add_argument("study", metavar="FILE", help="a study file, or the name of one nlora ships")
    run.add_argument("--output-dir", metavar="DIR", help="the study directory (default: the file's output_dir, "
                     "else runs/studies/NAME)")
    _add_set_option(run)
    run.add_argument("--executor", choices=("local", "slurm"), default="local",
                     help="local: this machine (default); slurm: one job per cell through submitit")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="local: cells at once, each in its own process with its own GPUs (launch.gpus_per_cell) "
                          "or its share of the CPU threads (default: 1, in this process)")
    run.add_argument("--rerun-failed", action="store_true", help="run failed cells again")
    run.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    slurm = run.add_argument_group("slurm executor")
    slurm.add_argument("--partition", metavar="NAME", help="SLURM partition (default: the cluster's)")
    slurm.add_argument("--time", type=int, default=24 * 60, metavar="MIN",
                       help="time limit per job, minutes (default: 1440); a job that reaches it is requeued and "
                            "resumes its cell")
    slurm.add_argument("--cpus-per-cell", type=int, default=1, metavar="N", help="(default: 1)")
    slurm.add_argument("--mem-gb", type=float, metavar="GB", help="memory per job (default: the cluster's)")
    slurm.add_argument("--array", action="store_true", help="submit each batch of cells as one job array")
    slurm.add_argument("--max-parallel", type=int, metavar="N", help="--array: tasks of the array at once")
    slurm.add_argument("--no-wait", action="store_true",
                       help="submit the ready cells and return; run the same command again to continue once they end")

    status = verbs.add_parser("status", help="cells done, running, failed and queued, with an estimate of the "
                              "time left")
    status.add_argument("study_dir", metavar="DIR", help="the study directory")

    report = verbs.add_parser("report", help="the study's table (markdown) and plots, in DIR/report")
    report.add_argument("study_dir", metavar="DIR", help="the study directory")

    cell = verbs.add_parser("run-cell")  # what an executor starts for one cell (no help: not listed)
    cell.add_argument("study_dir")
    cell.add_argument("cell_id")

    verbs.add_parser("list", help="the studies nlora ships")


def _add_set_option(parser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a base run option of the study file (YAML value), e.g. --set "
                             "data_dir=CL_Benchmark --set model=t5-large; repeatable")


def _read(args: argparse.Namespace):
    from .spec import read_study

    return read_study(args.study, args.set)


def main(args: argparse.Namespace) -> int:
    verb = args.study_command
    if verb == "list":
        from .spec import read_study, shipped_studies

        for name, path in shipped_studies().items():
            study = read_study(path)
            orders = ", ".join(map(str, study.orders)) if study.orders != [None] else "its own task list"
            print(f"{name}: {len(study.methods)} methods, orders: {orders}, seeds {study.seeds}")
        return 0
    if verb == "plan":
        from .plan import format_plan, plan_study

        study = _read(args)
        print(format_plan(plan_study(study, args.output_dir, args.seconds_per_step), list_cells=args.cells))
        return 0
    if verb == "run":
        return _run(args)
    if verb == "status":
        from .status import format_status, study_status

        print(format_status(study_status(Path(args.study_dir))))
        return 0
    if verb == "report":
        from .report import write_study_report

        print(f"report: {write_study_report(Path(args.study_dir)).resolve()}")
        return 0
    if verb == "run-cell":
        from .execute import run_cell

        run_cell(args.study_dir, args.cell_id, progress=False)
        return 0
    raise AssertionError(verb)


def _run(args: argparse.Namespace) -> int:
    from .execute import default_study_dir, run_study

    study = _read(args)
    study_dir = Path(args.output_dir) if args.output_dir else default_study_dir(study)
    if args.executor == "slurm":
        from ..errors import NloraError
        from .slurm import SlurmOptions, slurm_executor

        if study.launch.num_processes > 1:
            raise NloraError(f"{study.source}: launch.num_processes {study.launch.num_processes}: a cell of several "
                             "processes runs with the local executor only (a SLURM job runs one process per cell)")
        execute = slurm_executor(SlurmOptions(partition=args.partition, time_min=args.time,
                                              gpus_per_cell=study.launch.gpus_per_cell,
                                              cpus_per_cell=args.cpus_per_cell, mem_gb=args.mem_gb,
                                              max_parallel=args.max_parallel, use_array=args.array),
                                 wait=not args.no_wait)
    else:
        from .local import LocalExecutor

        execute = LocalExecutor(args.workers)
    outcome = run_study(study, study_dir, execute, rerun_failed=args.rerun_failed, fail_fast=args.fail_fast,
                        progress=not args.quiet)
    print(outcome.summary(study_dir))
    return 1 if outcome.failed else 0
