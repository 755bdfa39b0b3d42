"""Evaluation throughput on free-text tasks: nlora's evaluation against a plain batched `generate` call, on the
same model and the same inputs, in one run.

For each model, a LoRA adapter is added (as a run evaluates: the model wrapped by PEFT, the adapter active) and
the test prompts of nlora's generated TRACE-layout tasks are answered twice, greedily, with the same number of new
tokens:

  nlora  `nlora.eval.evaluate.evaluate`, as a run evaluates a free-text task (batches of similar prompt length,
         predictions decoded and scored with the task's metric)
  plain  the same prompt token ids, in input order, left-padded (decoder) or padded by the tokenizer (seq2seq)
         in batches of the same size, one `model.generate(..., do_sample=False)` per batch, decoded

Both paths go through one counting wrapper of `model.generate`: a row's generated tokens are its new tokens up to
and including its first end-of-sequence (the rest is padding). The table gives generated tokens, CPU and wall
seconds (each the best of --repeats, the two paths in turn, after a warm-up), tokens/s per CPU second, the ratio
nlora/plain of tokens/s, and how many predictions agree. Throughput is per CPU second of this process, on one
thread by default: on a shared machine the wall time of a run varies several-fold with the others' load, its CPU
time much less.

The built-in tiny models are random-init: they seldom stop early, so each row runs to --max-new-tokens, which is
what makes the comparison about the decoding loop and not about what the model says.

Examples:
  python benchmarks/generation_speed.py
  python benchmarks/generation_speed.py --models tiny-llama --n-test 128 --max-new-tokens 64 --batch-size 32
  python benchmarks/generation_speed.py --models path/to/llama --device cuda --n-test 512 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nlora.adapters import ContinualAdapters  # noqa: E402
from nlora.config import RunConfig  # noqa: E402
from nlora.eval.evaluate import Scoring, evaluate  # noqa: E402
from nlora.models import default_target_modules, load_backbone  # noqa: E402
from nlora.objectives import Generation, make_objective  # noqa: E402
from nlora.tasks.loading import load_run_tasks  # noqa: E402
from nlora.tasks.synthetic import TRACE_TASKS, write_synthetic_trace  # noqa: E402

TASKS = ("headline", "simplify", "reverse")  # prompts of different lengths


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-llama,tiny-t5", help="comma-separated model names or paths")
    p.add_argument("--n-test", type=int, default=64, help="test prompts per task (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="(%(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="(%(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each path, best kept (%(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (%(default)s: the CPU seconds measure the work alone, even on a shared "
                        "machine)")
    return p.parse_args()


def examples_of(data: Path) -> list:
    config = RunConfig(tasks=list(TASKS), data_dir=str(data), max_source_length=256,
                       task_metrics=[f"{t}={TRACE_TASKS[t][1]}" for t in TASKS])
    return [e for task in load_run_tasks(config) for e in task.test]


def new_tokens(rows: torch.Tensor, eos: int) -> int:
    """Tokens generated per row up to and including its first end-of-sequence."""
    total = 0
    for row in rows.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


@contextlib.contextmanager
def counting(model, kind: str, eos: int, counter: list[int]):
    """`model.generate` counting the tokens it generates (both paths call it through this)."""
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        width = kwargs["input_ids"].shape[1] if kind == "decoder" else 1  # seq2seq: after the start token
        counter[0] += new_tokens(out[:, width:], eos)
        return out

    model.generate = generate
    try:
        yield
    finally:
        del model.generate


def plain_generate(model, objective, examples, batch_size: int, n: int, device) -> list[str]:
    tok = objective.tokenizer
    out_texts = []
    for s in range(0, len(examples), batch_size):
        batch = examples[s: s + batch_size]
        ids = [objective.prompt_ids(e) for e in batch]
        if objective.kind == "decoder":
            width = max(map(len, ids))
            input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out = out[:, width:]
        else:
            enc = tok.pad({"input_ids": ids}, return_tensors="pt").to(device)
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=n, do_sample=False)
        out_texts += [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    return out_texts


def timed(fn, repeats: int) -> tuple[dict[str, tuple[float, float]], dict[str, list[str]]]:
    """Best (CPU seconds, wall seconds) of each path over `repeats`, the paths interleaved (in turn first and
    second), so that a change of the machine's load meets both alike; each path warmed up once first."""
    paths = ["nlora", "plain"]
    results = {p: fn(p) for p in paths}  # warm-up
    best = {p: (float("inf"), float("inf")) for p in paths}
    for r in range(repeats):
        for p in paths if r % 2 == 0 else paths[::-1]:
            cpu, wall = time.process_time(), time.perf_counter()
            results[p] = fn(p)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            best[p] = (min(best[p][0], cpu), min(best[p][1], wall))
    return best, results


def measure(name: str, examples: list, args) -> list[dict]:
    device = torch.device(args.device)
    backbone = load_backbone(name, device=device)
    adapters = ContinualAdapters(backbone.model, backbone.kind, 8, 16, 0.0, default_target_modules(
        backbone.model_type))
    adapters.add("t0")
    adapters.activate(["t0"])
    model = adapters.model.eval()
    objective = make_objective(backbone.kind, backbone.tokenizer, 256, args.max_new_tokens)
    generation = Generation(args.max_new_tokens)
    counters = {"nlora": [0], "plain": [0]}

    def once(path: str) -> list[str]:
        counters[path][0] = 0
        with counting(model, backbone.kind, backbone.tokenizer.eos_token_id, counters[path]), torch.no_grad():
            if path == "nlora":
                return [r["prediction"] for r in evaluate(objective, model, examples, args.batch_size,
                                                          progress=False, scoring=Scoring("rouge_l"),
                                                          generation=generation)[1]]
            return plain_generate(model, objective, examples, args.batch_size, args.max_new_tokens, device)

    seconds, predictions = timed(once, args.repeats)
    rows = [{"model": name, "path": path, "examples": len(examples), "tokens": counters[path][0],
             "cpu": seconds[path][0], "wall": seconds[path][1], "tokens_per_s": counters[path][0] / seconds[path][0]}
            for path in ("nlora", "plain")]
    same = sum(a == b for a, b in zip(predictions["nlora"], predictions["plain"]))
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[1]["tokens_per_s"]
        row["agree"] = f"{same}/{len(examples)}"
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_trace(Path(tmp), n_train=2, n_eval=1, n_test=args.n_test, tasks=TASKS)
        examples = examples_of(data)
        rows = [r for name in args.models.split(",") if name for r in measure(name.strip(), examples, args)]
    print(f"# generation speed, {datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, best of {args.repeats}")
    print(f"{'model':<12} {'path':<6} {'examples':>8} {'gen tokens':>10} {'CPU s':>7} {'wall s':>7} "
          f"{'tokens/s':>9} {'vs plain':>8} {'agree':>8}")
    for r in rows:
        print(f"{r['model']:<12} {r['path']:<6} {r['examples']:>8} {r['tokens']:>10} {r['cpu']:>7.2f} "
              f"{r['wall']:>7.2f} {r['tokens_per_s']:>9.1f} {r['ratio']:>8.2f} {r['agree']:>8}")


if __name__ == "__main__":
    main()
