"""Checks and times nlora's GPU paths in one command, on random-weight models of real width (nothing is
downloaded), and writes one markdown table to stdout and to --out.

Sections (each on its own: one that fails puts its error in the table and the next one runs):
  e2e        `nlora run` with the recipe examples/recipes/decoder-7b-80gb.yaml (bf16 weights, bf16 autocast, sdpa)
             and gradient checkpointing on a LLaMA-2-7B-width slice (--slice-layers decoder layers, random
             weights, a byte-level tokenizer and its vocabulary of 384): N-LoRA with the delta penalty, the frozen
             tasks folded (a bf16 base: the concat form), 3 generated tasks, micro-batches of 4 accumulated by 2,
             4 optimizer steps a task, a checkpoint every 2. The same run, killed (SIGKILL) after optimizer step
             7 (task 2, one step after a checkpoint) in a process of its own and continued by `nlora resume`,
             must end with the uninterrupted run's metrics, adapters and predictions. Then `nlora report`.
  penalty    benchmarks/penalty.py's worker at its llama7b preset's shape (64 adapted 4096 x 4096 layers, bf16
             on a GPU, batch 4): the chunked delta penalty's step against the plain step, paired, at 512, 2048
             and 8192 tokens per step; peak memory of both (torch.cuda.max_memory_allocated).
  tasks      benchmarks/task_scaling.py on its T5-large-width slice: training and evaluation step time at 8 and 15
             tasks over 1 task, folded in the concat form (bf16 base) and in the merge form (float32 base: the
             merge form needs one), and unfolded for contrast.
  memory     benchmarks/memory.py's training step (one 512-token example, r 8 on q/v) on its 2-layer LLaMA-2-7B
             and Llama-3-8B slices in bf16, with and without checkpointing: the peak allocated bytes of the step
             on the device, against the bytes saved for backward that the same step counts on the CPU (memory.py's
             prediction, computed by a background process while the sections before it run).
  eval       nlora's evaluation (generate mode) of a folded 3-task model on the slice, at the recipe's eval batch
             and under its autocast, against plain `model.generate` calls on the same model and the same
             left-padded prompts: generated tokens per second, and whether the predictions agree.
  quantized  a 2-task `nlora run` with the recipe examples/recipes/decoder-7b-4bit-24gb.yaml on the slice, in
             4-bit and in 8-bit: completion, fold form, peak allocated memory. Without bitsandbytes: "not
             installed".

Everything runs on the GPU when there is one, else on the CPU (bf16 weights and autocast included; the peaks of
allocated memory and the quantized runs need CUDA). --cpu-smoke runs every section at a tiny size (tests run
it, so that the script keeps working):

  python benchmarks/gpu_check.py --out gpu_check.md                  # one GPU, a few minutes
  python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check.md  # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RECIPES = ROOT / "examples" / "recipes"
RECIPE_BF16 = RECIPES / "decoder-7b-80gb.yaml"
RECIPE_4BIT = RECIPES / "decoder-7b-4bit-24gb.yaml"
SECTIONS = ("e2e", "penalty", "memory", "tasks", "eval", "quantized")
KILL_AT = "train_step:7"  # 4 optimizer steps a task, a checkpoint every 2: task 2, one step after its checkpoint
MIB = 2 ** 20


def _load(name: str):
    """A sibling benchmark script as a module (loaded once)."""
    if f"bench_{name}" in sys.modules:
        return sys.modules[f"bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Sizes:
    slice_model: str  # a benchmarks/memory.py model whose width the e2e/eval/quantized slice takes
    slice_layers: int
    penalty_shape: dict | None  # dims, layers, batch of benchmarks/penalty.py; None: its llama7b preset's
    penalty_tokens: tuple[int, ...]
    penalty_repeats: int
    task_model: str  # a benchmarks/task_scaling.py model
    task_counts: tuple[int, ...]
    memory_models: tuple[str, ...]
    memory_prompt: int
    eval_examples: int
    repeats: int
    warmup: int
    n_test: int  # test examples per task in the runs
    max_target: int  # tokens generated at most in evaluation (+ 1 for the eos)
    micro_batch: int  # the runs' micro-batch; 2 accumulated make an optimizer step

    @property
    def n_train(self) -> int:  # per task: 4 optimizer steps (KILL_AT counts on it)
        return 4 * 2 * self.micro_batch


FULL = Sizes(slice_model="llama-2-7b-2L", slice_layers=4, penalty_shape=None, penalty_tokens=(512, 2048, 8192),
             penalty_repeats=10, task_model="t5-slice", task_counts=(1, 8, 15),
             memory_models=("llama-2-7b-2L", "llama-3-8b-2L"), memory_prompt=512, eval_examples=128, repeats=5,
             warmup=3, n_test=32, max_target=16, micro_batch=4)
SMOKE = Sizes(slice_model="tiny", slice_layers=2, penalty_shape=dict(dims="64", layers=2, batch=4),
              penalty_tokens=(32, 64, 128), penalty_repeats=1,
              task_model="tiny-bert", task_counts=(1, 3), memory_models=("tiny",), memory_prompt=16,
              eval_examples=8, repeats=1, warmup=1, n_test=4, max_target=4, micro_batch=2)


@dataclass
class Row:
    section: str
    check: str
    result: str
    details: str = ""
    seconds: float | None = None


@dataclass
class Context:
    device: str
    sizes: Sizes
    work: Path
    memory_predictions: subprocess.Popen | None = None
    _slice: Path | str | None = None
    _data: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def data_dir(self) -> Path:
        """3 generated tasks in the CL_Benchmark layout."""
        if self._data is None:
            from nlora.tasks.synthetic import TASK_NAMES, write_synthetic_benchmark

            per_task = max(self.sizes.n_test, math.ceil(self.sizes.eval_examples / 3))
            self._data = write_synthetic_benchmark(self.work / "data", n_train=self.sizes.n_train, n_test=per_task,
                                                   seed=0, tasks=TASK_NAMES[:3])
        return self._data

    def tasks(self, n: int = 3) -> list[str]:
        from nlora.tasks.synthetic import TASK_NAMES

        return list(TASK_NAMES[:n])

    def slice_dir(self) -> Path:
        """The slice as a model folder that `nlora run --model` loads: random bf16 weights, a byte-level tokenizer
        (ids 0/1 are its pad/eos, as in the configuration). Built once; a failure is raised again to each user."""
        if isinstance(self._slice, str):
            raise RuntimeError(self._slice)
        if self._slice is None:
            try:
                self._slice = build_slice(self.sizes, self.device, self.work / "slice")
            except Exception as e:
                self._slice = f"building the slice failed: {type(e).__name__}: {e}"
                raise
        return self._slice


def build_slice(sizes: Sizes, device: str, folder: Path) -> Path:
    from transformers import ByT5Tokenizer

    memory = _load("memory")
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    # the tokenizer's vocabulary: a random model generates any id of its own, and each must decode
    model, _ = memory.build(sizes.slice_model, torch.bfloat16, device=device, layers=sizes.slice_layers,
                            vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


# ----------------------------------------------------------------------------------------------------- helpers

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / MIB:,.1f}"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _attempt(section: str, check: str, fn) -> list[Row]:
    """fn() -> rows; an exception becomes one row that names it, so the items after it still run."""
    try:
        return fn()
    except (Exception, SystemExit) as e:
        traceback.print_exc()
        return [Row(section, check, "failed", _error_text(e))]


def _error_text(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)
    place = f" (at {Path(where[-1].filename).name}:{where[-1].lineno})" if where else ""
    message = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {message}{place}".replace("|", "/")


def _nlora(argv: list[str]) -> None:
    """`nlora ARGV` in this process; its printout goes to stderr (stdout is the table's)."""
    from nlora.cli import main

    with contextlib.redirect_stdout(sys.stderr):
        code = main([str(a) for a in argv])
    if code != 0:
        raise RuntimeError(f"nlora {argv[0]} exited with {code}")


def _child_env(**extra) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# ----------------------------------------------------------------------------------------------------- e2e

def run_outcome(run_dir: Path) -> tuple[dict, dict[str, bytes]]:
    """metrics.json without its timings, and the bytes of the adapters and predictions."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("eval_seconds", None)
    for stats in metrics.get("train", {}).values():
        stats.pop("seconds", None)
        stats.pop("hook_seconds", None)
    files = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
             if p.is_file() and p.suffix in (".safetensors", ".jsonl") and p.name != "log.jsonl"}
    return metrics, files


def compare_runs(a: Path, b: Path) -> str:
    """'identical (...)' or what differs, with the largest difference of the adapters' tensors."""
    from safetensors.torch import load_file

    (ma, fa), (mb, fb) = run_outcome(a), run_outcome(b)
    if ma == mb and fa == fb:
        return f"identical: metrics.json (timings aside) and {len(fa)} adapter/prediction files byte for byte"
    diffs = [k for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
    files = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    largest = 0.0
    for name in files:
        if name.endswith(".safetensors") and name in fa and name in fb:
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            largest = max([largest] + [float((ta[k].float() - tb[k].float()).abs().max()) for k in ta if k in tb])
    return (f"differs: metrics keys {diffs[:6]}, {len(files)} of {len(fa)} files {files[:3]}; "
            f"largest adapter difference {largest:.3g}")


def section_e2e(ctx: Context) -> list[Row]:
    import yaml

    s = ctx.sizes
    common = ["--config", RECIPE_BF16, "--model", ctx.slice_dir(), "--method", "n-lora", "--penalty-form", "delta",
              "--fold-adapters", "--gradient-checkpointing", "--tasks", ",".join(ctx.tasks()),
              "--data-dir", ctx.data_dir(), "--max-train-samples", s.n_train, "--max-eval-samples", s.n_test,
              "--max-target-length", s.max_target, "--batch-size", s.micro_batch, "--gradient-accumulation-steps", 2,
              "--checkpoint-steps", 2, "--epochs", 1, "--device", ctx.device, "--seed", 0, "--quiet"]
    common = [str(a) for a in common]
    ref, killed = ctx.work / "e2e-run", ctx.work / "e2e-killed"
    # the run to kill starts first, in a process of its own, and runs beside the uninterrupted one
    log = open(ctx.work / "e2e-killed.log", "w")
    child = subprocess.Popen([sys.executable, "-m", "nlora", "run", *common, "--output-dir", str(killed)],
                             env=_child_env(NLORA_FAULT=KILL_AT, OMP_NUM_THREADS=str(torch.get_num_threads())),
                             stdout=log, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    try:
        _nlora(["run", *common, "--output-dir", ref])
        ran = time.perf_counter() - start
        code = child.wait(timeout=300)
    finally:
        if child.poll() is None:  # the uninterrupted run failed, or the other one hangs
            child.kill()
            child.wait()
        log.close()
    metrics = json.loads((ref / "metrics.json").read_text())
    config = yaml.safe_load((ref / "config.yaml").read_text())
    last = ctx.tasks()[-1]
    steps = sum(t.get("steps", 0) for t in metrics["train"].values())
    rows = [Row("e2e", f"nlora run: {len(ctx.tasks())} generated tasks, n-lora (delta penalty), "
                       f"{config['dtype']} weights + {config['mixed_precision']} autocast, checkpointing "
                       f"{'on' if config['gradient_checkpointing'] else 'off'}, fold_adapters "
                       f"{'on' if config['fold_adapters'] else 'off'}",
                f"completed: AP {metrics['average_accuracy']:.1f}, fold form {metrics.get('fold_form')}",
                f"{ran:.0f} s wall (beside the killed run); {steps} optimizer steps; mean penalty (λ·term) on "
                f"task 3 {metrics['train'][last].get('mean_regularizer', float('nan')):.3g}; attention "
                f"{config['attn_implementation']}; the slice: {s.slice_layers} layers of {s.slice_model}'s "
                f"configuration")]

    def resumed() -> list[Row]:
        if code != -signal.SIGKILL:
            tail = (ctx.work / "e2e-killed.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"the run to kill ended with code {code}, not SIGKILL: {' / '.join(tail)}")
        start = time.perf_counter()
        _nlora(["resume", killed, "--quiet"])
        return [Row("e2e", check, compare_runs(ref, killed), f"resume {time.perf_counter() - start:.0f} s")]

    def report() -> list[Row]:
        _nlora(["report", ref])
        path = ref / "report" / "report.md"
        return [Row("e2e", "`nlora report`", "report.md written" if path.is_file() else "report.md missing",
                    f"{path.stat().st_size if path.is_file() else 0} bytes, "
                    f"{len(list(path.parent.glob('*.png')))} plots")]

    check = f"killed (SIGKILL at {KILL_AT}), `nlora resume`, against the uninterrupted run"
    return rows + _attempt("e2e", check, resumed) + _attempt("e2e", "`nlora report`", report)


# ----------------------------------------------------------------------------------------------------- penalty

def section_penalty(ctx: Context) -> list[Row]:
    """run_worker in this process (on a GPU its peak is max_memory_allocated, which does not need a fresh
    process; on the CPU the peaks are rough, the smoke run checks the code only)."""
    penalty = _load("penalty")
    s = ctx.sizes
    shape = s.penalty_shape or penalty.PRESETS["llama7b"]
    width, layers, batch = int(shape["dims"]), shape["layers"], shape["batch"]

    def one(tokens: int) -> list[Row]:
        args = penalty.build_parser().parse_args(
            ["--device", ctx.device, "--dims", str(width), "--layers", str(layers), "--batch", str(batch),
             "--seq", str(tokens // batch), "--repeats", str(s.penalty_repeats), "--warmup", str(s.warmup)])
        device, dtype = penalty.resolve(args)  # bf16 on a GPU, float32 on the CPU
        res = {}
        for config in ("plain", "delta-chunked"):
            _free()
            # on the CPU no peak: this process's RSS is not one step's
            spec = {**penalty.worker_spec(args, device, dtype, width, config), "rss": False}
            res[config] = penalty.run_worker(spec)
        plain, pen = res["plain"], res["delta-chunked"]
        time_ratio = pen["paired_ratio"]
        if plain["peak_bytes"] is None:
            peak_text, met = "n/a on the CPU", "not measured (CPU)"
        else:
            peak_ratio = pen["peak_bytes"] / plain["peak_bytes"]
            peak_text = f"x{peak_ratio:.3f}"
            met = "met" if time_ratio <= 1.05 and peak_ratio <= 1.01 else "not met"
        return [Row("penalty", f"delta penalty (chunked) / plain step, {tokens} tokens "
                               f"({layers} layers of {width}², batch {batch}, {dtype})",
                    f"time x{time_ratio:.3f} (paired), peak {peak_text}",
                    f"plain {plain['time_s'] * 1e3:.1f} ms, penalised {pen['time_s'] * 1e3:.1f} ms (medians); peak "
                    f"{_mib(plain['peak_bytes'])} / {_mib(pen['peak_bytes'])} MiB, of the step "
                    f"{_mib(plain['step_peak_bytes'])} / {_mib(pen['step_peak_bytes'])} MiB; saved for backward "
                    f"{_mib(plain['saved_bytes'])} / {_mib(pen['saved_bytes'])} MiB; target ≤ 1.05 time, ≤ 1.01 "
                    f"peak: {met}")]

    rows = []
    for tokens in s.penalty_tokens:
        rows += _attempt("penalty", f"{tokens} tokens", lambda: one(tokens))
    return rows


# ----------------------------------------------------------------------------------------------------- tasks

def section_tasks(ctx: Context) -> list[Row]:
    task_scaling = _load("task_scaling")
    s = ctx.sizes
    counts = list(s.task_counts)
    rows = []
    # the merge form needs a float32 base; the concat form is what a bf16 base gets
    for modes, dtype in ((("concat", "unfolded"), "bfloat16"), (("merge",), "float32")):
        def one(modes=modes, dtype=dtype) -> list[Row]:
            _free()
            measured = task_scaling.measure(s.task_model, counts, s.repeats, 8, 0.1, ctx.device, dtype, modes)
            out = []
            for mode in modes:
                mine = {r["tasks"]: r for r in measured if r["mode"] == mode}
                first, last = mine[counts[0]], mine[counts[-1]]
                later = counts[1:]
                out.append(Row(
                    "tasks", f"{mode}, {dtype} base ({s.task_model}): train step at "
                             f"{' / '.join(map(str, later))} tasks over {counts[0]}",
                    " / ".join(f"x{mine[n]['train_ratio']:.2f}" for n in later),
                    "eval " + " / ".join(f"x{mine[n]['eval_ratio']:.2f}" for n in later)
                    + f"; train {first['train_s'] * 1e3:.1f} → {last['train_s'] * 1e3:.1f} ms, eval "
                    f"{first['eval_s'] * 1e3:.1f} → {last['eval_s'] * 1e3:.1f} ms; saved for backward "
                    f"x{last['saved'] / first['saved']:.2f}; LoRA paths {first['paths']} → {last['paths']}; "
                    f"fold form {last['fold_form']}; median of {s.repeats}, paired"))
            return out
        rows += _attempt("tasks", f"{'/'.join(modes)} {dtype}", one)
    return rows


# ----------------------------------------------------------------------------------------------------- memory

def memory_rows(sizes: Sizes) -> list[dict]:
    return [dict(model=m, dtype="bfloat16", autocast=False, checkpointing=ckpt, prompt=sizes.memory_prompt)
            for m in sizes.memory_models for ckpt in (False, True)]


def start_memory_predictions(sizes: Sizes) -> subprocess.Popen:
    """memory.py's CPU step for each row, in a background process (CPU only, half the cores), so that on a GPU
    machine the predictions are computed while the GPU sections run."""
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    return subprocess.Popen([sys.executable, __file__, "--predict-memory", json.dumps(memory_rows(sizes))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_child_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=threads))


def predict_memory(rows: list[dict]) -> list[dict]:
    memory = _load("memory")
    out = []
    for row in rows:
        try:
            out.append(memory.measure(row))
        except Exception as e:
            out.append({**row, "error": _error_text(e)})
    return out


def section_memory(ctx: Context) -> list[Row]:
    memory = _load("memory")
    if ctx.memory_predictions is not None:
        stdout, stderr = ctx.memory_predictions.communicate(timeout=300)
        if ctx.memory_predictions.returncode != 0:
            raise RuntimeError(f"the CPU predictions failed: {' '.join(stderr.strip().splitlines()[-2:])}")
        predictions = json.loads(stdout.strip().splitlines()[-1])
    else:  # on the CPU, a background process would only compete for the same cores
        predictions = predict_memory(memory_rows(ctx.sizes))
    predicted = {(r["model"], r["checkpointing"]): r for r in predictions}

    def saved(r: dict) -> int:
        return r["saved_activation"] + r["saved_wcopy"]

    def one(row: dict) -> list[Row]:
        _free()
        got = memory.measure({**row, "device": ctx.device})
        pred = predicted.get((row["model"], row["checkpointing"]), {})
        if "error" in pred:
            pred_text = f"CPU prediction failed ({pred['error']})"
        elif pred:
            pred_text = f"CPU prediction (saved for backward) {_mib(saved(pred))} MiB"
        else:
            pred_text = "no CPU prediction"
        peak = got.get("peak_step")
        versus = f"; peak − prediction {_mib(peak - saved(pred))} MiB" if peak is not None and "saved_activation" \
            in pred else ""
        return [Row("memory", f"{row['model']} bf16, checkpointing {'on' if row['checkpointing'] else 'off'}, "
                              f"{row['prompt']}-token prompt: peak allocated in one training step",
                    f"{_mib(peak)} MiB" if peak is not None else "n/a on the CPU",
                    f"{pred_text}; saved for backward on the device {_mib(saved(got))} MiB{versus}; allocated "
                    f"before the step {_mib(got.get('allocated_before'))} MiB; loss logits {_mib(got['logits'])} "
                    f"MiB")]

    rows = []
    for row in memory_rows(ctx.sizes):
        rows += _attempt("memory", f"{row['model']} checkpointing {row['checkpointing']}", lambda row=row: one(row))
    return rows


# ----------------------------------------------------------------------------------------------------- eval

def left_padded(objective, examples) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The prompts' token ids as nlora cuts them, padded on the left (the inputs a plain generate call takes)."""
    prompts = [objective.prompt_ids(e) for e in examples]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), objective.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask, width


def generated_tokens(answers: torch.Tensor, eos: int) -> int:
    """Tokens generated per row up to and including the first eos (after it, generate pads)."""
    total = 0
    for row in answers.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def section_eval(ctx: Context) -> list[Row]:
    from transformers import AutoTokenizer

    from nlora.config import load_config
    from nlora.eval.evaluate import eval_batches, evaluate
    from nlora.objectives import make_objective
    from nlora.runner import load_tasks
    from nlora.train.engine import make_accelerator

    task_scaling = _load("task_scaling")
    s = ctx.sizes
    slice_dir = ctx.slice_dir()
    config = load_config(RECIPE_BF16, {"model": str(slice_dir), "tasks": ctx.tasks(), "data_dir": str(ctx.data_dir()),
                                       "device": ctx.device, "max_eval_samples": s.eval_examples,
                                       "max_target_length": s.max_target,
                                       "output_dir": str(ctx.work / "eval")})
    examples = [e for t in load_tasks(config) for e in t.test][: s.eval_examples]
    # the model an n-lora run evaluates after task 3: tasks 1-2 folded (concat form), task 3's adapter
    adapters, saved, _ = task_scaling.prepare(str(slice_dir), 3, ctx.work / "eval-adapters", config.lora_r, 0.1,
                                              "concat", ctx.device, config.dtype)
    task_scaling.configure(adapters, saved, 3, fold=True)
    model = adapters.model.eval()
    tokenizer = AutoTokenizer.from_pretrained(slice_dir)
    objective = make_objective("decoder", tokenizer, config.max_source_length, config.max_target_length, "generate")
    accelerator = make_accelerator(config)
    batch = config.eval_batch_size
    order = eval_batches([len(e.prompt) for e in examples], batch, 0, 1)  # nlora's batches, for the plain calls
    inputs = [tuple(t.to(accelerator.device) if torch.is_tensor(t) else t
                    for t in left_padded(objective, [examples[i] for i in idx])) for idx in order]

    def run_nlora():
        return [r["prediction"] for r in evaluate(objective, model, examples, batch, accelerator, progress=False)[1]]

    @torch.no_grad()
    def run_plain():
        outs = []
        with accelerator.autocast():
            for ids, mask, width in inputs:
                out = model.generate(input_ids=ids, attention_mask=mask,
                                     max_new_tokens=objective.max_target_length + 1, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                outs.append(out[:, width:])
        _sync()
        return outs

    def timed(fn):
        _sync()
        start = time.perf_counter()
        value = fn()
        _sync()
        return time.perf_counter() - start, value

    run_nlora(), run_plain()  # warm-up
    best = {"nlora": math.inf, "plain": math.inf}
    for _ in range(s.repeats):
        t, predictions = timed(run_nlora)
        best["nlora"] = min(best["nlora"], t)
        t, answers = timed(run_plain)
        best["plain"] = min(best["plain"], t)
    tokens = sum(generated_tokens(a, tokenizer.eos_token_id) for a in answers)
    plain_predictions = {}
    for idx, a in zip(order, answers):
        texts = tokenizer.batch_decode(a[:, : objective.max_target_length], skip_special_tokens=True)
        plain_predictions.update(zip(idx, (t.strip() for t in texts)))
    agree = sum(plain_predictions[i] == p for i, p in enumerate(predictions)) / len(predictions)
    rate = {k: tokens / v for k, v in best.items()}
    return [Row("eval", f"generated tokens/s, nlora evaluate against plain generate, eval batch {batch} "
                        f"({RECIPE_BF16.name}), {len(examples)} prompts",
                f"{rate['nlora']:,.0f} against {rate['plain']:,.0f} tokens/s (x{rate['nlora'] / rate['plain']:.2f})",
                f"{tokens} tokens generated (at most {objective.max_target_length + 1} a prompt); best of "
                f"{s.repeats}: {best['nlora']:.2f} s / {best['plain']:.2f} s; predictions equal on "
                f"{100 * agree:.0f}%; {config.dtype} weights, {config.mixed_precision} autocast, "
                f"attention {getattr(model.config, '_attn_implementation', '?')}")]


# ----------------------------------------------------------------------------------------------------- quantized

def section_quantized(ctx: Context) -> list[Row]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return [Row("quantized", "4-bit and 8-bit bases", "not installed",
                    "bitsandbytes is not importable here (pip install \"nlora[qlora]\")")]
    if not ctx.cuda:
        return [Row("quantized", "4-bit and 8-bit bases", "needs CUDA", "bitsandbytes bases need a CUDA device")]
    import nlora
    from nlora.config import load_config

    def one(bits: str) -> list[Row]:
        _free()
        config = load_config(RECIPE_4BIT, {
            "model": str(ctx.slice_dir()), "tasks": ctx.tasks(2), "data_dir": str(ctx.data_dir()),
            "load_in_4bit": bits == "4-bit", "load_in_8bit": bits == "8-bit", "method": "n-lora",
            "max_train_samples": ctx.sizes.n_train, "max_eval_samples": ctx.sizes.n_test,
            "max_target_length": ctx.sizes.max_target, "device": ctx.device,
            "output_dir": str(ctx.work / f"quantized-{bits}"), "seed": 0})
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            metrics = nlora.run(config, progress=False)
        return [Row("quantized", f"{bits} base: 2-task n-lora run ({RECIPE_4BIT.name})",
                    f"completed: AP {metrics['average_accuracy']:.1f}, fold form {metrics.get('fold_form')}",
                    f"peak allocated {_mib(torch.cuda.max_memory_allocated())} MiB; "
                    f"{time.perf_counter() - start:.0f} s")]

    return [r for bits in ("4-bit", "8-bit") for r in _attempt("quantized", bits, lambda bits=bits: one(bits))]


# ----------------------------------------------------------------------------------------------------- driver

RUNNERS = {"e2e": section_e2e, "penalty": section_penalty, "memory": section_memory, "tasks": section_tasks,
           "eval": section_eval, "quantized": section_quantized}


def environment_line(device: str) -> str:
    import accelerate
    import peft
    import transformers

    def version(module: str) -> str:
        if importlib.util.find_spec(module) is None:
            return "not installed"
        try:
            return __import__(module).__version__
        except Exception as e:  # installed but broken (e.g. no CUDA for it)
            return f"not importable ({type(e).__name__})"

    gpu = (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
           f"CUDA {torch.version.cuda})" if device.startswith("cuda") else "no GPU: CPU")
    return (f"device: {gpu}; {os.cpu_count()} CPUs; python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, "
            f"bitsandbytes {version('bitsandbytes')}, flash-attn {version('flash_attn')}")


def table(rows: list[Row]) -> str:
    lines = ["| section | check | result | details | s |", "|---|---|---|---|---:|"]
    for r in rows:
        seconds = "" if r.seconds is None else f"{r.seconds:.0f}"
        cells = [c.replace("|", "/").replace("\n", " ") for c in (r.section, r.check, r.result, r.details)]
        lines.append(f"| {' | '.join(cells)} | {seconds} |")
    return "\n".join(lines)


def run_sections(ctx: Context, sections: list[str], budget_s: float) -> list[Row]:
    rows: list[Row] = []
    start = time.perf_counter()
    for name in sections:
        if time.perf_counter() - start > budget_s:
            rows.append(Row(name, "-", "skipped", f"the time budget ({budget_s:.0f} s) was spent"))
            continue
        began = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):
            got = _attempt(name, "section", lambda: RUNNERS[name](ctx))
        _free()
        if got:
            got[0].seconds = time.perf_counter() - began
        rows += got
        print(f"[gpu_check] {name} done in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="every section at a tiny size, on the CPU")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda when available)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--slice-layers", type=int, help="decoder layers of the e2e/eval/quantized slice (default 4)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="sections not started by then are skipped (default 450 s: the whole stays under 8 min)")
    p.add_argument("--work-dir", help="keep the runs and models here (default: a temporary folder, removed)")
    p.add_argument("--predict-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.predict_memory:
        print(json.dumps(predict_memory(json.loads(args.predict_memory))))
        return 0
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    device = "cpu" if args.cpu_smoke else args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = SMOKE if args.cpu_smoke else FULL
    if args.slice_layers:
        sizes = Sizes(**{**sizes.__dict__, "slice_layers": args.slice_layers})

    start = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="nlora-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, sizes, work)
    if "memory" in sections and ctx.cuda:
        ctx.memory_predictions = start_memory_predictions(sizes)
    threads = torch.get_num_threads()
    if args.cpu_smoke:  # tiny tensors gain nothing from threads, and on a busy machine waiting threads cost
        torch.set_num_threads(1)
    try:
        rows = run_sections(ctx, sections, args.budget_s)
    finally:
        torch.set_num_threads(threads)
        if ctx.memory_predictions is not None and ctx.memory_predictions.poll() is None:
            ctx.memory_predictions.kill()
            ctx.memory_predictions.wait()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([
        f"# nlora GPU check ({'cpu-smoke' if args.cpu_smoke else 'full'}), {datetime.date.today().isoformat()}",
        "",
        environment_line(device),
        f"total {time.perf_counter() - start:.0f} s; command: python benchmarks/gpu_check.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "",
        table(rows)]) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
