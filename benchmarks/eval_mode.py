"""Evaluation by generation vs by option scoring, on the same trained run: accuracy and seconds.

For each model, one continual-learning run is trained on the tasks (IncLoRA by default; the run's own
per-task evaluations use `score` to keep them short and are not measured). Then the final model, every adapter
of the run active, evaluates each task's test examples twice through `nlora.eval.evaluate.evaluate`:

  generate  greedy generation, up to --max-target-length new tokens, exact match with the label
  score     the label option with the highest summed log-likelihood (eos included), one batched pass per option

and the table gives, per model and mode: accuracy, chance accuracy (mean 1/#options), how many generated
answers are none of the options, agreement of the two modes' predictions, evaluation seconds (best of
--repeats) and the speed-up of score over generate.

The built-in tiny models (tiny-t5, tiny-llama) are random-init: their accuracy says nothing about either mode
(a random model rarely generates a label, so generate sits near 0 while score sits near chance). Read the
seconds. A random model also rarely emits end-of-sequence, so generate runs to the full length; a trained model
stops after its label, so on real models the gap is smaller than here for short labels.

Examples:
  python benchmarks/eval_mode.py                                   # tiny-t5 and tiny-llama, CL_Benchmark subset
  python benchmarks/eval_mode.py --data-dir synthetic --n-test 150
  python benchmarks/eval_mode.py --models path/to/t5-large --device cuda --n-test 1000 --max-target-length 50
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nlora.adapters import ContinualAdapters  # noqa: E402
from nlora.config import load_config  # noqa: E402
from nlora.eval.continual import normalize_answer  # noqa: E402
from nlora.eval.evaluate import evaluate  # noqa: E402
from nlora.methods import get_method  # noqa: E402
from nlora.models import load_backbone  # noqa: E402
from nlora.objectives import make_objective  # noqa: E402
from nlora.rundir import RunPaths  # noqa: E402
from nlora.runner import load_tasks, run  # noqa: E402
from nlora.tasks.synthetic import TASK_NAMES, write_synthetic_benchmark  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "CL_Benchmark"
MODES = ("generate", "score")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-t5,tiny-llama", help="comma-separated model names or paths")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help="a CL_Benchmark folder, or 'synthetic' for nlora's generated tasks")
    p.add_argument("--tasks", default="dbpedia,amazon,yahoo,agnews", help="task order (standard order 1)")
    p.add_argument("--method", default="inc-lora")
    p.add_argument("--n-train", type=int, default=32, help="training examples per task")
    p.add_argument("--n-test", type=int, default=100, help="test examples per task")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    # the prompt keeps its instruction and options whole (only the text is cut): with the byte-level tiny models,
    # dbpedia's 14 options alone take some 230 tokens
    p.add_argument("--max-source-length", type=int, default=320)
    p.add_argument("--max-target-length", type=int, default=24,
                   help="tokens generated at most; also the longest option scored (covers every label here)")
    p.add_argument("--repeats", type=int, default=2, help="timed evaluations per mode; the best is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="where the runs go (a temporary folder if unset)")
    return p.parse_args()


def final_model(config, backbone):
    """The run's last state: every adapter it trained, loaded onto a fresh copy of the base model (a method with
    one shared adapter reloads it phase by phase, so its last state stays)."""
    method = get_method(config.method)(config)
    paths = RunPaths(config.output_dir)
    adapters = ContinualAdapters(backbone.model, backbone.kind, config.lora_r, config.lora_alpha,
                                 config.lora_dropout, config.target_modules)
    last = method.phases(len(config.tasks))[-1]
    for k in method.phases(len(config.tasks)):
        name = method.adapter_name(k)
        if name not in adapters.names:
            adapters.add(name)
        adapters.load(name, paths.adapter(k, config.tasks[k]))
    adapters.activate(method.active_for_eval(last, 0, adapters.names))
    return adapters.model.to(config.device if config.device != "auto" else "cpu")


def measure(model_name: str, args, data_dir: str, out_root: Path) -> list[dict]:
    config = load_config(overrides={
        "model": model_name, "method": args.method, "tasks": args.tasks, "data_dir": data_dir,
        "output_dir": str(out_root / Path(model_name).name), "overwrite": True, "epochs": args.epochs,
        "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "max_train_samples": args.n_train, "max_eval_samples": args.n_test,
        "max_source_length": args.max_source_length, "max_target_length": args.max_target_length,
        "device": args.device, "seed": args.seed, "eval_mode": "score"})
    run(config, progress=False)
    config = load_config(Path(config.output_dir) / "config.yaml")  # resolved target_modules and model_kind
    tasks = load_tasks(config)
    backbone = load_backbone(config.model, config.model_kind, config.trust_remote_code)
    model = final_model(config, backbone)
    predictions, rows = {}, []
    for mode in MODES:
        objective = make_objective(backbone.kind, backbone.tokenizer, config.max_source_length,
                                   config.max_target_length, mode)
        best, records = float("inf"), []
        for _ in range(args.repeats):
            records, start = [], time.perf_counter()
            for task in tasks:
                records += evaluate(objective, model, task.test, config.eval_batch_size, progress=False)[1]
            best = min(best, time.perf_counter() - start)
        examples = [e for t in tasks for e in t.test]
        predictions[mode] = [r["prediction"] for r in records]
        off = sum(normalize_answer(r["prediction"]) not in {normalize_answer(o) for o in e.options}
                  for r, e in zip(records, examples))
        rows.append({"model": model_name, "mode": mode, "n": len(records),
                     "accuracy": 100.0 * sum(r["correct"] for r in records) / len(records),
                     "chance": 100.0 * sum(1 / len(e.options) for e in examples) / len(examples),
                     "off_option": 100.0 * off / len(records), "seconds": best})
    agree = sum(a == b for a, b in zip(*predictions.values())) / len(predictions["score"])
    for r in rows:
        r["agreement"] = 100.0 * agree
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    return rows


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_root = Path(args.output_dir or tempfile.mkdtemp(prefix="nlora-eval-mode-"))
    data_dir = args.data_dir
    if data_dir == "synthetic":
        data_dir = str(write_synthetic_benchmark(out_root / "data", n_train=args.n_train, n_test=args.n_test,
                                                 seed=args.seed))
        if any(t not in TASK_NAMES for t in args.tasks.split(",")):
            args.tasks = ",".join(TASK_NAMES)
    load_before = os.getloadavg()[0]
    rows = [r for m in args.models.split(",") for r in measure(m.strip(), args, data_dir, out_root)]

    print(f"# eval_mode: generate vs score, {datetime.date.today().isoformat()}")
    print(f"# machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores visible, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}, "
          f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after (shared machine)")
    print(f"# data: {args.data_dir}, tasks {args.tasks}, {args.n_test} test examples per task, "
          f"{args.n_train} train per task, {args.epochs} epoch(s), eval batch {args.eval_batch_size}, "
          f"max target length {args.max_target_length}")
    print("| model | eval_mode | examples | accuracy % | chance % | generated non-option % | agreement % "
          "| eval s | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['n']} | {r['accuracy']:.1f} | {r['chance']:.1f} | "
              f"{r['off_option']:.1f} | {r['agreement']:.1f} | {r['seconds']:.2f} | {r['speedup']:.1f}x |")


if __name__ == "__main__":
    main()
