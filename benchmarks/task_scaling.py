"""Cost per task of the stacked methods, folded against unfolded (nlora.adapters.ContinualAdapters.fold).

In phase k of n-lora / o-lora / inc-lora, the k frozen adapters are either k separate LoRA paths per layer
(`unfolded`, `fold_adapters: false`), each with its own dropout, or folded (the default), in one of two forms:
`merge`, added into the float32 base weights (what a float32 base gets), or `concat`, one frozen past path of rank
r·k (what a bf16, quantized or sharded base gets). For k + 1 = 1, 4, 8, 15 tasks, on one base model with the same
random adapters in every mode, this measures:

  train   one training step: forward + backward of the current adapter (dropout on, no optimizer step: the
          optimizer touches only the current adapter, whatever the task count);
  eval    one evaluation forward (eval mode, no grad, teacher-forced for T5);
  saved   bytes of the distinct tensors autograd saves for backward in one training forward
          (torch.autograd.graph.saved_tensors_hooks), parameters excluded: activations and dropout masks;
  work    FLOPs of one training step (torch.utils.flop_counter) and the ATen operators it dispatches (on a GPU
          about one kernel launch each, what small LoRA paths cost there): exact, unlike times on a shared CPU.

Per mode, one model per task count is built and all are timed in turn, --repeats rounds after a warm-up: the
ratio to the first task count is the median of the rounds' ratios (paired, so a change in the machine's speed
hits both sides), times are medians. Models:
  minilm    all-MiniLM-L6-v2 (d 384, 6 layers), LoRA r 8 on query/value, batch 16 x 128 tokens;
  t5-slice  a T5 of T5-large's width (d_model 1024, d_ff 4096, 16 heads) with 2 encoder + 2 decoder layers and
            random weights, LoRA r 8 on q/v, batch 4 x 128 source and 16 target tokens;
  tiny-bert the built-in test model (a smoke test of this script).

  python benchmarks/task_scaling.py --models minilm,t5-slice
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from nlora.adapters import ContinualAdapters
from nlora.models import default_target_modules, load_backbone

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def build_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """(model, kind, target modules, make_batch(seed) -> kwargs of a forward with a loss), the model's weights in
    `dtype` on `device` (the batches are made on the CPU)."""
    if name == "t5-slice":
        from transformers import T5Config, T5ForConditionalGeneration

        torch.manual_seed(0)
        config = T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=2,
                          num_decoder_layers=2, decoder_start_token_id=0)
        model = T5ForConditionalGeneration(config).to(device=device, dtype=getattr(torch, dtype))

        def batch(g):
            return {"input_ids": torch.randint(3, 32000, (4, 128), generator=g),
                    "labels": torch.randint(3, 32000, (4, 16), generator=g)}
        return model, "seq2seq", ["q", "v"], batch
    backbone = load_backbone(MINILM if name == "minilm" else name, dtype=dtype, device=device)
    vocab = backbone.model.config.vocab_size
    shape = (16, 128) if name == "minilm" else (4, 32)

    def batch(g):
        return {"input_ids": torch.randint(3, vocab, shape, generator=g)}
    return backbone.model, backbone.kind, default_target_modules(backbone.model_type), batch


def loss_of(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.pow(2).mean()


MODES = ("unfolded", "concat", "merge")


def prepare(name: str, n_max: int, folder: Path, r: int, dropout: float, mode: str, device: str = "cpu",
            dtype: str = "float32"):
    """A model with n_max adapters of random weights (B seeded per task; B starts at zero in training), saved
    under `folder`; a second call loads the same weights back from there. The merge form needs a float32 base
    (on another dtype the fold takes the concat form)."""
    model, kind, targets, make_batch = build_model(name, device, dtype)
    adapters = ContinualAdapters(model, kind, r=r, alpha=4 * r, dropout=dropout, target_modules=targets,
                                 merge_fp32=mode == "merge")
    saved = {}
    for t in range(n_max):
        task = adapters.add(f"task{t}")
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for f in adapters.factors(task):
                f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.01)
        saved[task] = folder / task
        if saved[task].exists():
            adapters.load(task, saved[task])
        else:
            adapters.save(task, saved[task])
    return adapters, saved, make_batch


def configure(adapters: ContinualAdapters, saved: dict, n: int, fold: bool) -> list[str]:
    """Phase n-1: adapters 0..n-2 frozen (folded or separate), adapter n-1 trainable; the LoRA paths run."""
    names = list(saved)[:n]
    if fold and n > 1:
        adapters.fold({k: saved[k] for k in names[:-1]})
    for p in adapters.model.parameters():
        p.requires_grad_(False)
    adapters.activate(names, trainable=names[-1])
    return adapters.lora_paths(names)


def saved_bytes(model, inputs) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, inputs)
    del loss
    return sum(seen.values())


def _steps(model, inputs):
    def train_step():
        model.train()
        loss_of(model, inputs).backward()
        model.zero_grad(set_to_none=True)

    def eval_step():
        model.eval()
        with torch.no_grad():
            loss_of(model, inputs)
    return train_step, eval_step


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators a step dispatches (on a GPU, about one kernel launch each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_work(step) -> tuple[int, int]:
    """(FLOPs, operators dispatched) of one call of `step`: exact, whatever the machine's load."""
    flops, ops = FlopCounterMode(display=False), _OpCounter()
    with flops, ops:
        step()
    return flops.get_total_flops(), ops.count


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def measure(name: str, tasks: list[int], repeats: int, r: int, dropout: float, device: str = "cpu",
            dtype: str = "float32", modes: tuple[str, ...] = MODES) -> list[dict]:
    """Per mode, one model per task count, all held at once and timed in turn (round robin, after one warm-up
    each), so that drift of the machine's speed hits every task count alike. Ratios to the first task count are
    the median over rounds of that round's ratio (paired); times are medians."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            setups = []
            for n in tasks:
                torch.manual_seed(0)
                adapters, saved, make_batch = prepare(name, max(tasks), Path(tmp), r, dropout, mode, device, dtype)
                paths = configure(adapters, saved, n, mode != "unfolded")
                inputs = {k: v.to(device) for k, v in make_batch(torch.Generator().manual_seed(0)).items()}
                adapters.model.train()  # dropout on: the masks of the frozen paths are what folding saves
                kept = saved_bytes(adapters.model, inputs)
                train_step, eval_step = _steps(adapters.model, inputs)
                work = {"saved": kept, "fold_form": adapters.fold_form or "-",  # what the fold became
                        **dict(zip(("flops", "ops"), step_work(train_step)))}
                setups.append((n, paths, work, train_step, eval_step))
            for _, _, _, train_step, eval_step in setups:  # warm-up
                train_step(), eval_step()
            times = {n: {"train_s": [], "eval_s": []} for n in tasks}
            for _ in range(repeats):
                for n, _, _, train_step, eval_step in setups:
                    times[n]["train_s"].append(_timed(train_step))
                    times[n]["eval_s"].append(_timed(eval_step))
            first = times[tasks[0]]
            for n, paths, work, _, _ in setups:
                row = {"model": name, "mode": mode, "dtype": dtype, "tasks": n, "paths": len(paths), **work}
                for key in ("train_s", "eval_s"):
                    row[key] = statistics.median(times[n][key])
                    row[key.replace("_s", "_ratio")] = statistics.median(
                        t / t0 for t, t0 in zip(times[n][key], first[key]))
                rows.append(row)
                print(f"  {name} {mode:8s} tasks {n:2d}: train {row['train_s'] * 1e3:8.1f} ms "
                      f"(x{row['train_ratio']:.2f})  eval {row['eval_s'] * 1e3:8.1f} ms (x{row['eval_ratio']:.2f})  "
                      f"saved {row['saved'] / 2**20:8.1f} MiB  {row['flops'] / 1e9:.2f} GFLOP  {row['ops']} ops",
                      flush=True)
            del setups
    return rows


def table(rows: list[dict], target: float) -> str:
    lines = ["| model | mode | tasks | LoRA paths | train step (ms) | x first, paired | eval (ms) | x first, paired "
             "| saved for backward (MiB) | train GFLOP | train ops |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['tasks']} | {r['paths']} | {r['train_s'] * 1e3:.1f} | "
                     f"{r['train_ratio']:.2f} | {r['eval_s'] * 1e3:.1f} | {r['eval_ratio']:.2f} | "
                     f"{r['saved'] / 2**20:.1f} | {r['flops'] / 1e9:.2f} | {r['ops']} |")
    lines += ["", f"| model | mode | train last/first | eval last/first | saved last/first | FLOP last/first "
              f"| ops last/first | target ≤ {target} (time and saved) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for mode in MODES:
            mine = [r for r in rows if r["model"] == model and r["mode"] == mode]
            first, last = mine[0], mine[-1]
            ratios = [last["train_ratio"], last["eval_ratio"], last["saved"] / first["saved"]]
            met = "met" if ratios[0] <= target and ratios[1] <= target and ratios[2] <= target else "not met"
            lines.append(f"| {model} | {mode} | {ratios[0]:.2f} | {ratios[1]:.2f} | {ratios[2]:.2f} | "
                         f"{last['flops'] / first['flops']:.3f} | {last['ops'] / first['ops']:.2f} | {met} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,t5-slice", help="minilm, t5-slice, tiny-bert (comma-separated)")
    p.add_argument("--tasks", default="1,4,8,15", help="task counts to measure (the first is the reference)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--target", type=float, default=1.10, help="the target ratio, last task count / first")
    args = p.parse_args()
    tasks = sorted(int(t) for t in args.tasks.split(","))
    torch.set_grad_enabled(True)
    rows = []
    for name in args.models.split(","):
        rows += measure(name.strip(), tasks, args.repeats, args.lora_r, args.lora_dropout)
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} rounds, "
          "ratios paired by round")
    print(table(rows, args.target))


if __name__ == "__main__":
    main()
