"""The cost of `nlora demo` (several seeds, small tasks) against the earlier one-seed demo (300 training and 150
test examples per task), from the timings the demo's own runs record.

Both demos run the same model, batch size, prompt length and epochs, so a training step and an evaluated example
cost the same in both; only their counts differ. This script reads the per-task training seconds and steps and
the evaluation seconds of every run of a finished demo, derives the cost of one step and of one evaluated example,
and prints the measured total beside the estimate for the one-seed demo under the same machine load (a ratio
that does not depend on how busy a shared machine was, unlike two wall times measured at different moments).

    nlora demo --output-dir runs/demo --quiet          # note its wall time
    python benchmarks/demo_cost.py runs/demo --wall SECONDS
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# The earlier demo: one seed, per task 300 training / 150 test examples, 4 epochs at batch 16, 3 tasks.
OLD = {"seeds": 1, "n_train": 300, "n_test": 150, "epochs": 4, "batch_size": 16, "tasks": 3}


def run_costs(demo_dir: Path) -> list[dict]:
    rows = []
    for metrics_path in sorted(demo_dir.glob("seed-*/*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        evaluated = sum(m["n_test"][j] for i, row in enumerate(m["accuracy_matrix"])
                        for j, x in enumerate(row) if x is not None)
        rows.append({"run": f"{metrics_path.parent.parent.name}/{m['method']}",
                     "steps": sum(t["steps"] for t in m["train"].values()),
                     "train_s": sum(t["seconds"] for t in m["train"].values()),
                     "evaluated": evaluated, "eval_s": sum(m["eval_seconds"].values())})
    if not rows:
        raise SystemExit(f"{demo_dir}: no seed-*/<method>/metrics.json (run `nlora demo` first)")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo_dir", type=Path)
    p.add_argument("--wall", type=float, required=True, help="measured wall seconds of the whole demo")
    args = p.parse_args()
    rows = run_costs(args.demo_dir)
    print("| run | train steps | train s | examples evaluated | eval s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['train_s']:.1f} | {r['evaluated']} | {r['eval_s']:.1f} |")
    steps, train_s = sum(r["steps"] for r in rows), sum(r["train_s"] for r in rows)
    evaluated, eval_s = sum(r["evaluated"] for r in rows), sum(r["eval_s"] for r in rows)
    per_step, per_example = train_s / steps, eval_s / evaluated
    other = args.wall - train_s - eval_s  # model loading, data, diagnostics, the report
    per_run_other = other / len(rows)
    old_runs = 2 * OLD["seeds"]
    old_steps = old_runs * OLD["tasks"] * OLD["epochs"] * math.ceil(OLD["n_train"] / OLD["batch_size"])
    old_evaluated = old_runs * OLD["n_test"] * OLD["tasks"] * (OLD["tasks"] + 1) // 2
    old_wall = old_steps * per_step + old_evaluated * per_example + old_runs * per_run_other
    print("\n| demo | runs | train steps | examples evaluated | wall s |\n|---|---|---|---|---|")
    print(f"| this demo (measured) | {len(rows)} | {steps} | {evaluated} | {args.wall:.0f} |")
    print(f"| one seed, 300/150 per task (estimated at the same per-unit costs) | {old_runs} | {old_steps} | "
          f"{old_evaluated} | {old_wall:.0f} |")
    print(f"\nper step {per_step:.3f} s, per evaluated example {per_example * 1000:.1f} ms, other {per_run_other:.1f} s "
          f"per run; ratio this / earlier demo: {args.wall / old_wall:.2f}")


if __name__ == "__main__":
    main()
