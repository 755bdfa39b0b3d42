"""CPU-scale reproduction of the Standard CL benchmark, order 1 (dbpedia → amazon → yahoo → agnews), on the real
CL_Benchmark data with the pretrained all-MiniLM-L6-v2 encoder: the study nlora ships as `cpu-standard` (every
continual method and the multi-task bound, each tuned value chosen on a dev split carved from train, seeds 42-44),
run through `nlora study` and reported as a study is (STUDY_DIR/report/report.md with its plots).

    python benchmarks/reproduce_cpu.py                           # the quick profile: 64 examples per task
    python benchmarks/reproduce_cpu.py --full                    # 250 examples per task, 80 of them carved for dev
    python benchmarks/reproduce_cpu.py --methods inc-lora,n-lora --seeds 42 --workers 2

The same as `nlora study run cpu-standard --set data_dir=...` (for the quick profile); rerunning reuses finished
cells and resumes killed ones.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (examples per task drawn for train and for test, dev examples carved from the training pool)
PROFILES = {"quick": (64, 24), "full": (250, 80)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="250 examples per task instead of 64 (about 4x longer)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's, 42,43,44)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the study's methods")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "CL_Benchmark"),
                   help="CL_Benchmark folder (default: ../shared/data/CL_Benchmark from the repository root)")
    p.add_argument("--output-dir", default=None, help="the study directory (default: runs/studies/cpu-standard, "
                                                      "or cpu-standard-full)")
    p.add_argument("--workers", type=int, default=1, help="cells at once, each with its share of the cores")
    return p.parse_args(argv)


def study_for(args):
    """The shipped cpu-standard study with this invocation's profile, seeds and methods."""
    import dataclasses

    from nlora.errors import NloraError
    from nlora.studies.spec import read_study

    samples, dev = PROFILES["full" if args.full else "quick"]
    study = read_study("cpu-standard", [f"data_dir={args.data_dir}", f"max_train_samples={samples}",
                                        f"max_eval_samples={samples}"])
    select = dataclasses.replace(study.select, train_samples=samples, dev_samples=dev)
    changes = {"select": select, "name": study.name + ("-full" if args.full else "")}
    if args.seeds:
        changes["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in study.methods]
        if unknown:
            raise NloraError(f"--methods: {', '.join(unknown)} not in the study ({', '.join(study.methods)})")
        changes["methods"] = {m: study.methods[m] for m in wanted}
        changes["baseline"] = study.baseline if study.baseline in wanted else None
    return dataclasses.replace(study, **changes)


def main(argv=None) -> int:
    from nlora.errors import NloraError
    from nlora.studies.execute import run_study
    from nlora.studies.local import LocalExecutor
    from nlora.studies.report import write_study_report

    args = parse_args(argv)
    try:
        study = study_for(args)
        out = Path(args.output_dir or REPO / "runs" / "studies" / study.name)
        outcome = run_study(study, out, LocalExecutor(args.workers), progress=True)
        print(outcome.summary(out))
        report = write_study_report(out)
    except NloraError as e:
        print(f"reproduce_cpu: error: {e}", file=sys.stderr)
        return 2
    text = report.read_text()
    print(text[:text.index("## Chosen on dev")] if "## Chosen on dev" in text else text)
    print(f"report: {report}")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
