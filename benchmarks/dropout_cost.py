"""What `--dropout-scheme hiddenkey` costs per training step, beside the same method without it, paired in rounds:
seq-lora, seq-lora + hiddenkey with its KL (two passes per batch) and seq-lora + hiddenkey with KL weight 0 (one
pass: the eager attention with DropKey and the HiddenCut hooks alone). Every run is the same 2-task sequence through
`nlora.run` (benchmarks/method_cost.py's `one_run`); a step is the median `s_per_step` of the second task, the first
step excluded; each round runs the three in an order reversed from the last, and a ratio is taken against the plain
run of the same round.

    python benchmarks/dropout_cost.py --models minilm,t5-large-slice --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from method_cost import MINILM, build_t5_slice  # noqa: E402
from nlora import RunConfig, run  # noqa: E402
from nlora.rundir import read_log  # noqa: E402
from nlora.tasks.synthetic import write_synthetic_benchmark  # noqa: E402

VARIANTS = {"seq-lora": {},
            "+ hiddenkey": {"dropout_scheme": "hiddenkey"},
            "+ hiddenkey, kl 0": {"dropout_scheme": "hiddenkey", "hiddenkey_kl_weight": 0.0}}


def step_seconds(model: str, options: dict, data: Path, out: Path, steps: int, batch: int) -> float:
    config = RunConfig(model=model, method="seq-lora", tasks=["harbor", "orchard"], data_dir=str(data),
                       output_dir=str(out), max_train_samples=steps * batch, max_eval_samples=2, batch_size=batch,
                       eval_batch_size=batch, epochs=1, checkpoint_steps=0, log_steps=1, device="cpu",
                       max_source_length=128, max_target_length=4, overwrite=True, **options)
    run(config, progress=False)
    second = [line for line in read_log(out / "log.jsonl") if line["event"] == "train" and line["phase"] == 1]
    return statistics.median(line["s_per_step"] for line in second[1:])


def measure(name: str, model: str, rounds: int, steps: int, batch: int, work: Path) -> list[dict]:
    data = write_synthetic_benchmark(work / "data", n_train=steps * batch, n_test=4, seed=0)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for variant in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
            times[variant].append(step_seconds(model, VARIANTS[variant], data, work / "run", steps, batch))
            print(json.dumps({"model": name, "round": r, "variant": variant, "step": times[variant][-1]}),
                  file=sys.stderr, flush=True)
    rows = []
    for variant, runs in times.items():
        ratios = [mine / plain for mine, plain in zip(runs, times["seq-lora"])]
        rows.append({"model": name, "variant": variant, "step_s": statistics.median(runs),
                     "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios)})
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,t5-large-slice", help="minilm, t5-large-slice, or a model name")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per task")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dropout_cost_"))
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = {"minilm": MINILM, "t5-large-slice": None}.get(name, name) or build_t5_slice(work / "t5-slice")
        rows += measure(name, model, args.rounds, args.steps, args.batch_size, work / name)
    lines = ["| model | run | step (s) | step / seq-lora (median, range) |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['step_s']:.3f} | {r['ratio']:.2f}x ({r['low']:.2f}-"
              f"{r['high']:.2f}) |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
