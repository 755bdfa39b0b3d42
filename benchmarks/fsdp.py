"""FSDP2 sharding as nlora does it (`--sharding fsdp2`, nlora.train.engine): memory held per process and equality of the
training step with one process.

A 2-layer slice of a 4096-wide LLaMA-7B-shaped decoder (hidden 4096, MLP 11008, 32 heads; vocabulary cut to
``--vocab``) with random weights, LoRA r 8 on q_proj/v_proj with a random non-zero B, and N-LoRA's L1 penalty
(delta form, computed inside the forward pass by nlora.train.regularization). One process computes the step on the
whole global batch; then ``--processes`` gloo processes shard the base with `nlora.train.engine.shard_model`
(fully_shard per decoder layer + root) and compute it on their part of the batch, averaging the LoRA gradients
with `reduce_replicated_gradients`.

Printed: the base parameter bytes each process holds (counted from the tensors: a DTensor's local shard, or the
whole tensor), the share of the whole base, the largest difference of loss, regulariser and LoRA gradients
against the single process, and the step time ratio.

  flock /tmp/nlora-heavy.lock python benchmarks/fsdp.py            # about 3 GB of RAM at the defaults
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nlora.adapters import ContinualAdapters  # noqa: E402
from nlora.config import RunConfig  # noqa: E402
from nlora.methods import get_method  # noqa: E402
from nlora.train.engine import reduce_replicated_gradients, shard_model  # noqa: E402
from nlora.train.regularization import Regularization  # noqa: E402

LAMBDA = 1e-3


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=2 * args.seq)
    model = LlamaForCausalLM(cfg)
    model.eval()  # no dropout in LLaMA anyway; train() below only for the autograd path
    return model


def add_adapter(model):
    adapters = ContinualAdapters(model, "decoder", r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    adapters.add("task0")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for f in adapters.factors("task0"):
            f.A.copy_(torch.randn(f.A.shape, generator=g) / f.A.shape[1] ** 0.5)
            f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.02)
    return adapters


def batch(args):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)


def step(adapters, ids, n_tokens, world, params):
    """One forward + backward on `ids` (this process's rows): Σ token CE / global tokens, times the process count
    (the gradients are averaged across processes), plus the penalty computed inside the forward."""
    method = get_method("n-lora")(RunConfig(tasks=["t"], method="n-lora", lambda_=LAMBDA, penalty_chunk_size=1024))
    model = adapters.model
    model.train()
    with Regularization(model, "task0", method.loss_terms(0)) as reg:
        logits = model(input_ids=ids).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="sum") / n_tokens
        reg.anchor(ce * world).backward()
        value = reg.collect()["l1"]
    reduce_replicated_gradients(model, params)
    if world > 1:
        dist.all_reduce(ce)
    return ce.detach(), value


def base_bytes(model):
    """(bytes this process holds of the base parameters, bytes of the whole base)."""
    from torch.distributed.tensor import DTensor

    held = whole = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        whole += p.numel() * p.element_size()
        local = p.to_local() if isinstance(p, DTensor) else p
        held += local.numel() * local.element_size()
    return held, whole


def timed_steps(adapters, ids, n_tokens, world, params, repeats):
    times, out = [], None
    for _ in range(repeats + 1):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        out = step(adapters, ids, n_tokens, world, params)
        times.append(time.perf_counter() - t0)
    return out, sorted(times[1:])[len(times[1:]) // 2]


def worker(rank, world, args, reference_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build(args)
        shard_model(model, SimpleNamespace(num_processes=world), RunConfig(tasks=["t"], sharding="fsdp2"))
        held, whole = base_bytes(model)
        adapters = add_adapter(model)
        params = adapters.trainable_parameters()
        ids = batch(args)
        n_tokens = ids[:, 1:].numel()
        mine = ids[rank * len(ids) // world: (rank + 1) * len(ids) // world]
        (ce, value), seconds = timed_steps(adapters, mine, n_tokens, world, params, args.repeats)
        ref = torch.load(reference_path)
        grads = {n: p.grad for n, p in adapters.model.named_parameters() if p.requires_grad}
        grad_diff = max((grads[n] - g).abs().max().item() for n, g in ref["grads"].items())
        grad_scale = max(g.abs().max().item() for g in ref["grads"].values())
        row = dict(rank=rank, held=held, whole=whole, loss_diff=abs(ce.item() - ref["loss"]),
                   reg_diff=abs(value.item() - ref["reg"]), grad_diff=grad_diff, grad_scale=grad_scale,
                   seconds=seconds, rss_gib=_rss_gib())
        rows = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            torch.save(rows, reference_path + ".rows")
    finally:
        dist.destroy_process_group()


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary (LLaMA's is 32000; cut to save RAM)")
    ap.add_argument("--batch", type=int, default=2, help="global batch (split across the processes)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--port", type=int, default=29533)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        reference_path = os.path.join(tmp, "reference.pt")
        adapters = add_adapter(build(args))
        params = adapters.trainable_parameters()
        ids = batch(args)
        (ce, value), single_seconds = timed_steps(adapters, ids, ids[:, 1:].numel(), 1, params, args.repeats)
        held_single, whole = base_bytes(adapters.model)
        grads = {n: p.grad.clone() for n, p in adapters.model.named_parameters() if p.requires_grad}
        torch.save(dict(loss=ce.item(), reg=value.item(), grads=grads), reference_path)
        del adapters, params, grads
        gc.collect()
        mp.spawn(worker, args=(args.processes, args, reference_path, args.port), nprocs=args.processes)
        rows = torch.load(reference_path + ".rows")

    gib = 2 ** 30
    print(f"LLaMA slice: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}, "
          f"float32; LoRA r 8 on q_proj/v_proj; global batch {args.batch} x {args.seq} tokens; "
          f"N-LoRA delta penalty (lambda {LAMBDA}) in the forward; {args.threads} torch thread(s) per process; "
          f"median of {args.repeats} steps after 1 warm-up")
    print()
    print("| processes | rank | base bytes held (GiB) | share of the base | max abs diff loss | regulariser | "
          "LoRA grads (largest grad) | step s | x single |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| 1 | 0 | {held_single / gib:.3f} | {held_single / whole:.3f} | - | - | - | {single_seconds:.2f} | 1.00 |")
    for r in rows:
        print(f"| {args.processes} | {r['rank']} | {r['held'] / gib:.3f} | {r['held'] / r['whole']:.3f} | "
              f"{r['loss_diff']:.2e} | {r['reg_diff']:.2e} | {r['grad_diff']:.2e} ({r['grad_scale']:.2e}) | "
              f"{r['seconds']:.2f} | {r['seconds'] / single_seconds:.2f} |")
    print()
    rss = ", ".join(f"{r['rss_gib']:.2f}" for r in rows)
    print(f"whole base: {whole / gib:.3f} GiB; held by all sharded processes together: "
          f"{sum(r['held'] for r in rows) / gib:.3f} GiB; peak RSS per sharded process {rss} GiB "
          "(includes the whole model each process builds before sharding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
