"""What each method costs beside its base method, paired in one run: the time of a training step of the second task
(where every method's own part is active) against the base method's step, the time of its between-task passes
(the hooks before and after a task: a Fisher, a covariance and SVD), and the bytes of its saved state.

Each between-task pass (the hook before the task, with the new adapter's initialisation, and the hook after it) is
set beside one forward epoch of the task: a benchmark-only method, `forward-epoch`
(IncLoRA whose after-task hook runs the task's training examples through the model once, without gradient, at the
run's batch size, through `nlora.methods.passes.layer_inputs` with no layer hooked), measured in the same rounds. Passes run
at the training batch size (eval_batch_size = batch_size).

Every method runs the same 2-task sequence through `nlora.run` (the whole engine: penalties in-forward, hooks, the
fold), with its default options. The base of a method is inc-lora for a new adapter per task and seq-lora for one
shared adapter. Each round runs every base and every method once, in an order reversed from one round to the next,
and a method's ratio is taken against its base's run of the same round (a machine whose speed drifts moves a round's
runs alike); the table gives the median ratio and its range over the rounds. A step's
time is the median of `s_per_step` over the second task's logged steps, the first excluded (warm-up).

Models: `minilm` (the packaged all-MiniLM-L6-v2) and `t5-large-slice` (T5-large's width, d_model 1024, d_ff 4096,
16 heads, 2 encoder + 2 decoder layers, random weights, a byte-level tokenizer).

    python benchmarks/method_cost.py --models minilm,t5-large-slice --rounds 3
    python benchmarks/method_cost.py --models minilm --methods ewc,lwf --rounds 1 --steps 4   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nlora import RunConfig, run  # noqa: E402
from nlora.methods import METHODS, get_method, register  # noqa: E402
from nlora.methods.inc_lora import IncLoRA  # noqa: E402
from nlora.methods.passes import layer_inputs  # noqa: E402
from nlora.rundir import read_log  # noqa: E402
from nlora.tasks.synthetic import write_synthetic_benchmark  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Bounds to show beside the measured ratios (a method not listed has none).
TARGETS = {"ewc": "step <= 1.05", "clora": "step <= 1.05", "lwf": "step <= 1 + one forward",
           "inflora": "step <= 1.00, pass <= 1 forward epoch"}
NOT_CONTINUAL = ("mtl", "mtl-ft")  # one phase: nothing to compare in a second task
FORWARD_EPOCH = "forward-epoch"


@register
class ForwardEpoch(IncLoRA):
    """IncLoRA + one no-grad forward pass over the task's training examples after the task: the yardstick of the
    between-task passes (not a continual-learning method)."""
    name = FORWARD_EPOCH
    description = "benchmark yardstick: IncLoRA + one forward epoch of the task after it"

    def after_task(self, k, ctx):
        layer_inputs(ctx, list(ctx.tasks[k].train), {}, lambda name, x: None, batch_size=self.config.batch_size)


def build_t5_slice(folder: Path) -> str:
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    if not (folder / "config.json").is_file():
        tokenizer = ByT5Tokenizer()
        torch.manual_seed(0)
        config = T5Config(vocab_size=len(tokenizer), d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=2,
                          num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        T5ForConditionalGeneration(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def base_of(method: str) -> str:
    """inc-lora for a new adapter per task, seq-lora for one shared adapter (with the method's default options)."""
    instance = get_method(method)(RunConfig(method=method, tasks=["a", "b"]).validate())
    return "seq-lora" if instance.adapter_layout == "snapshot" else "inc-lora"


def one_run(model: str, method: str, data: Path, out: Path, steps: int, batch: int) -> dict:
    config = RunConfig(model=model, method=method, tasks=["harbor", "orchard"], data_dir=str(data),
                       output_dir=str(out), max_train_samples=steps * batch, max_eval_samples=2, batch_size=batch,
                       eval_batch_size=batch, epochs=1, checkpoint_steps=0, log_steps=1, device="cpu",
                       max_source_length=128, max_target_length=4, overwrite=True)
    metrics = run(config, progress=False)
    second = [line for line in read_log(out / "log.jsonl") if line["event"] == "train" and line["phase"] == 1]
    step = statistics.median(line["s_per_step"] for line in second[1:]) if len(second) > 1 else float("nan")
    hooks = [metrics["train"][t].get("hook_seconds", {}) for t in ("harbor", "orchard")]
    state = sum(p.stat().st_size for p in (out / "adapters").rglob("method_state.*"))
    return {"step": step, "after_task": hooks[0].get("after_task", 0.0),
            "before_task": hooks[1].get("before_task", 0.0), "state_bytes": state}


def measure(model_name: str, model: str, methods: list[str], rounds: int, steps: int, batch: int,
            work: Path) -> list[dict]:
    """Each round runs the yardstick, every base once and every method once, in an order reversed from one round
    to the next; a method's step is divided by its base's step of the same round."""
    data = write_synthetic_benchmark(work / "data", n_train=steps * batch, n_test=4, seed=0)
    bases = {m: base_of(m) for m in methods}
    lineup = [FORWARD_EPOCH] + sorted(set(bases.values()) - set(methods)) + methods
    results: dict[str, list[dict]] = {m: [] for m in lineup}
    for r in range(rounds):
        for m in (lineup if r % 2 == 0 else lineup[::-1]):
            results[m].append(one_run(model, m, data, work / m, steps, batch))
            print(json.dumps({"model": model_name, "round": r, "method": m, **results[m][-1]}), file=sys.stderr,
                  flush=True)
    forward_epoch = statistics.median(run["after_task"] for run in results[FORWARD_EPOCH])
    rows = []
    for method in methods:
        runs, base = results[method], bases[method]
        ratios = [mine["step"] / theirs["step"] for mine, theirs in zip(runs, results[base])]
        rows.append({"model": model_name, "method": method, "base": base,
                     "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
                     "step_s": statistics.median(run["step"] for run in runs),
                     "before_s": statistics.median(run["before_task"] for run in runs),
                     "after_s": statistics.median(run["after_task"] for run in runs),
                     "forward_epoch_s": forward_epoch, "forward_batch_s": forward_epoch / steps,
                     "state_bytes": runs[-1]["state_bytes"], "target": TARGETS.get(method, "")})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | base | step / base (median, range) | step (s) | before-task pass (s) | "
             "after-task pass (s) | longest pass / forward epoch | one batch's forward (s) | state | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        state = f"{r['state_bytes'] / 2**20:.2f} MiB" if r["state_bytes"] else "0"
        longest = max(r["before_s"], r["after_s"]) / r["forward_epoch_s"]
        lines.append(f"| {r['model']} | {r['method']} | {r['base']} | {r['ratio']:.2f}x ({r['low']:.2f}-"
                     f"{r['high']:.2f}) | {r['step_s']:.3f} | {r['before_s']:.2f} | {r['after_s']:.2f} | "
                     f"{longest:.2f} | {r['forward_batch_s']:.3f} | {state} | {r['target']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,t5-large-slice", help="minilm, t5-large-slice, or a model name")
    p.add_argument("--methods", default="all", help="comma-separated, or all (every registered continual method)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    args = p.parse_args(argv)
    methods = sorted(m for m in METHODS if m not in NOT_CONTINUAL + (FORWARD_EPOCH,)) if args.methods == "all" \
        else [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="method_cost_"))
    rows = []
    start = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = {"minilm": MINILM, "t5-large-slice": None}.get(name, name) or build_t5_slice(work / "t5-slice")
        rows += measure(name, model, methods, args.rounds, args.steps, args.batch_size, work / name)
    text = table(rows)
    print(text)
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
