"""Memory of full fine-tuning (`--method seq-ft` / `mtl-ft`): computed for whole models, measured on random-weight
slices on CPU.

Computed (what every trained parameter costs, before activations): the weights, their gradients (same dtype) and
AdamW's two moments, which torch's AdamW keeps in the weights' dtype and bitsandbytes' 8-bit AdamW keeps as one
byte each plus a float32 absmax per block of 256 values (tensors under 4096 values keep float32 moments; few bytes):

    float32 weights, AdamW        4 + 4 + 2*4           = 16 bytes per parameter
    float32 weights, 8-bit AdamW  4 + 4 + 2*(1 + 4/256) = 10.03
    bfloat16 weights, AdamW       2 + 2 + 2*2           = 8
    bfloat16 weights, 8-bit AdamW 2 + 2 + 2*(1 + 4/256) = 6.03

Measured: one nlora training step (FullModel, nlora's objective, the method's optimizer) on one example of `prompt`
tokens, each configuration in a fresh subprocess, then the exact bytes of the parameters, their gradients and the
optimizer's state tensors, and the peak resident memory of the process. Models, from their published configs:
  llama-2-7b-1L   one decoder layer of LLaMA-2-7B (4096 wide, MLP 11008, vocabulary 32000): 464 M parameters
  tiny            a 2-layer 64-wide LLaMA, for a seconds-long smoke run of the script itself

  python benchmarks/full_ft_memory.py                         # the 7B table, and the llama-2-7b-1L bf16 rows
  python benchmarks/full_ft_memory.py --models tiny --dtypes float32,bfloat16
  python benchmarks/full_ft_memory.py --save --optimizers adamw    # also the seconds and bytes of the saves
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BYTES = {"float32": 4, "bfloat16": 2}
BLOCK = 256  # values per absmax of bitsandbytes' blockwise 8-bit optimizer states
# whole models whose full fine-tuning the README prices (parameter counts of their published checkpoints)
MODELS = {"T5-large": 737_668_096, "LLaMA-2-7B": 6_738_415_616}


def bytes_per_parameter(dtype: str, optimizer: str) -> dict[str, float]:
    """Weights, gradients and optimizer moments per trained parameter (see the module's doc)."""
    w = BYTES[dtype]
    moments = 2 * (1 + 4 / BLOCK) if optimizer == "adamw8bit" else 2 * w
    return {"weights": w, "gradients": w, "moments": moments, "total": 2 * w + moments}


def computed_table() -> str:
    rows = ["| model | weights | optimizer | weights GB | gradients GB | moments GB | total GB (GiB) |",
            "|---|---|---|---|---|---|---|"]
    for model, n in MODELS.items():
        for dtype in ("float32", "bfloat16"):
            for optimizer in ("adamw", "adamw8bit"):
                b = bytes_per_parameter(dtype, optimizer)
                rows.append(f"| {model} | {dtype} | {optimizer} | {n * b['weights'] / 1e9:.1f} | "
                            f"{n * b['gradients'] / 1e9:.1f} | {n * b['moments'] / 1e9:.1f} | "
                            f"{n * b['total'] / 1e9:.1f} ({n * b['total'] / 2**30:.1f}) |")
    return "\n".join(rows)


def model_config(name: str):
    from transformers import LlamaConfig

    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return {"llama-2-7b-1L": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                         max_position_embeddings=4096, **ids),
            "tiny": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=1000, **ids)}[name]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(row: dict) -> dict:
    """One full-FT step of `row` in this process; the exact bytes of what it keeps, and the peak RSS."""
    import torch
    from transformers import ByT5Tokenizer, LlamaForCausalLM

    from nlora import RunConfig
    from nlora.full_model import FullModel
    from nlora.methods import resolve
    from nlora.objectives import make_objective, to_device
    from nlora.tasks.data import Example

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[row["dtype"]]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the weights made in their dtype, no float32 detour
    try:
        model = LlamaForCausalLM(model_config(row["model"]))
    finally:
        torch.set_default_dtype(default)
    config = RunConfig(method="seq-ft", tasks=["t"], seqft_optimizer=row["optimizer"], lr=1e-5)
    state = FullModel(model)
    state.add("shared")
    params = state.trainable_parameters()
    optimizer = resolve(config).optimizer(params, config)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    objective = make_objective("decoder", ByT5Tokenizer(), row["prompt"], 16)
    text = "x" * (row["prompt"] + 8)
    batch = to_device(objective.collate([Example("t", text, "positive", ("positive", "negative"), text)]), "cpu")
    model.train()
    objective.loss(model, batch).backward()
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    n = sum(p.numel() for p in params)
    out = dict(row, parameters=n, weights=_tensor_bytes(params),
               gradients=_tensor_bytes(p.grad for p in params if p.grad is not None),
               moments=_tensor_bytes(states), rss_before_step=rss_before,
               peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out["computed"] = {k: v * n for k, v in bytes_per_parameter(row["dtype"], row["optimizer"]).items()}
    if row.get("save"):
        out.update(measure_saves(state, optimizer))
    return out


def measure_saves(state, optimizer) -> dict:
    """Seconds and bytes on disk of what a run writes: the phase's whole model (FullModel.save: save_pretrained)
    and a mid-task checkpoint (nlora.train.checkpoint: every trained tensor and the optimizer state)."""
    import tempfile
    import time

    import torch

    from nlora.train.checkpoint import Progress, save_checkpoint

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        start = time.perf_counter()
        model_dir = state.save("shared", Path(tmp) / "adapters" / "0-t")
        model_seconds = time.perf_counter() - start
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        params = {n: p for n, p in state.model.named_parameters() if p.requires_grad}
        start = time.perf_counter()
        checkpoint = save_checkpoint(Path(tmp), Progress(0, 0, 1, 1, 0.0, 0.0), params, optimizer, scheduler)
        checkpoint_seconds = time.perf_counter() - start
        return {"model_bytes": size(model_dir), "model_seconds": round(model_seconds, 1),
                "checkpoint_bytes": size(checkpoint), "checkpoint_seconds": round(checkpoint_seconds, 1)}


def plan(models: list[str], dtypes: list[str], optimizers: list[str], save: bool = False) -> list[dict]:
    return [dict(model=m, dtype=d, optimizer=o, prompt=32, save=save) for m in models for d in dtypes
            for o in optimizers]


def run_all(rows: list[dict]) -> list[dict]:
    results = []
    for row in rows:
        if row["optimizer"] == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            results.append({**row, "skipped": "bitsandbytes is not installed"})
            continue
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(row)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise SystemExit(f"configuration {row} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(measured_table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return results


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f}" if x >= 2**20 else f"{x / 2**20:.2f}"


def measured_table(results: list[dict]) -> str:
    rows = ["| slice | weights | optimizer | parameters | weights MB | gradients MB | moments MB (computed) | "
            "kept / parameter (computed) | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            rows.append(f"| {r['model']} | {r['dtype']} | {r['optimizer']} | skipped: {r['skipped']} | | | | | |")
            continue
        kept = (r["weights"] + r["gradients"] + r["moments"]) / r["parameters"]
        rows.append(f"| {r['model']} | {r['dtype']} | {r['optimizer']} | {r['parameters'] / 1e6:.1f} M | "
                    f"{_mb(r['weights'])} | {_mb(r['gradients'])} | {_mb(r['moments'])} "
                    f"({_mb(r['computed']['moments'])}) | {kept:.2f} ({r['computed']['total'] / r['parameters']:.2f}) "
                    f"| {_mb(r['peak_rss'])} |")
    return "\n".join(rows)


def saves_table(results: list[dict]) -> str:
    rows = ["| slice | weights | optimizer | model on disk MB | s | checkpoint on disk MB | s |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "model_bytes" in r:
            rows.append(f"| {r['model']} | {r['dtype']} | {r['optimizer']} | {_mb(r['model_bytes'])} | "
                        f"{r['model_seconds']} | {_mb(r['checkpoint_bytes'])} | {r['checkpoint_seconds']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama-2-7b-1L")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--optimizers", default="adamw,adamw8bit")
    parser.add_argument("--save", action="store_true", help="also time the whole-model save and a checkpoint")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    print("Computed: weights + gradients + AdamW moments, before activations\n")
    print(computed_table())
    results = run_all(plan(args.models.split(","), args.dtypes.split(","), args.optimizers.split(","), args.save))
    print("\nMeasured: one full-FT step on CPU, random weights\n")
    print(measured_table(results))
    if args.save:
        print("\nWritten after the step: the phase's whole model and a mid-task checkpoint\n")
        print(saves_table(results))


if __name__ == "__main__":
    main()
