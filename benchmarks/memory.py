"""Memory of one training step of nlora at real model sizes, with random weights (no download), on CPU.

Models, built from their published configurations:
  t5-large        d_model 1024, 24 + 24 layers, 16 heads, d_ff 4096, vocabulary 32128
  llama-2-7b-2L   2 decoder layers of LLaMA-2-7B: 4096 wide, 32 heads (no GQA), MLP 11008, vocabulary 32000
  llama-3-8b-2L   2 decoder layers of Llama-3-8B: 4096 wide, 32 query / 8 key-value heads (GQA), MLP 14336,
                  vocabulary 128256

Each configuration (weights float32 or bfloat16, float32 weights under bf16 autocast (`--mixed-precision bf16`
without `--dtype`), with and without gradient checkpointing, prompt length) runs in a fresh subprocess: one
adapter (r 8 on q and v, nlora's defaults), nlora's own objective (`nlora.objectives`), one forward and backward
of one example whose prompt has `prompt` tokens. It prints:
  params    bytes of the model's parameters by dtype (base and LoRA);
  saved     bytes autograd keeps for backward during the step, counted exactly: every tensor saved through
            torch.autograd.graph.saved_tensors_hooks, plus, under checkpointing, the tensors each checkpointed
            layer is called with (the recompute's inputs, held by the checkpoint); each storage once. Split into
            activations and `wcopy`, the bytes of saved tensors shaped like a weight but not a parameter
            (the half-precision copies autocast makes of float32 weights);
  logits    bytes of the LM head's output in the loss (its float32 upcast and log-softmax are of the same size);
  full      bytes the full-vocabulary logits of the plain loss would take (batch x sequence x vocabulary, float32);
  rss       peak resident memory of the subprocess (weights included).
`4-bit` rows are listed, not measured: bitsandbytes needs CUDA, and this script counts CPU tensors (the 4-bit
arithmetic is in examples/recipes/decoder-7b-4bit-24gb.yaml).

`measure` also takes a row with "device": "cuda" (benchmarks/gpu_check.py): the model is built on the GPU and
the row adds `peak_step`, torch.cuda.max_memory_allocated() during the step (after one warm-up step) minus what
was allocated before it.

Targets checked at the end: bf16 halves the base's parameter bytes and saves no weight copy; checkpointing cuts the
saved bytes at least 4x on the 2-layer slices at 512 tokens; the decoder loss's logits for a 512-token and a
32-token prompt are within 10% of each other.

  python benchmarks/memory.py                      # every model (10-20 minutes on 2 cores, < 10 GB RAM)
  python benchmarks/memory.py --models llama-2-7b-2L
  python benchmarks/memory.py --models tiny        # a seconds-long smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANSWER = "positive"  # 8 byte-level tokens (+ eos)


def model_configs() -> dict:
    from transformers import LlamaConfig, T5Config

    ids = dict(pad_token_id=0, eos_token_id=1)
    return {
        "t5-large": T5Config(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_decoder_layers=24, num_heads=16,
                             vocab_size=32128, feed_forward_proj="relu", decoder_start_token_id=0, **ids),
        "llama-2-7b-2L": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                     max_position_embeddings=4096, bos_token_id=None, **ids),
        "llama-3-8b-2L": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                     max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=None, **ids),
        "tiny": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1000, bos_token_id=None, **ids),
    }


def plan(models: list[str]) -> list[dict]:
    """The configurations of each model. Llama-3-8B's float32 slice (6 GB of weights) is counted on the meta
    device only, to stay under 10 GB of RAM; its bf16 rows run."""
    rows = []
    for m in models:
        # T5-large at 256 prompt tokens: 48 layers at 512 would take long on a CPU, and its targets (dtype, weight
        # copies) do not depend on the length
        long_, short = {"tiny": (16, 8), "t5-large": (256, 32)}.get(m, (512, 32))
        fp32_runs = m != "llama-3-8b-2L"
        for dtype, autocast in (("float32", False), ("float32", True), ("bfloat16", False)):
            if dtype == "float32" and not fp32_runs:
                if not autocast:
                    rows.append(dict(model=m, dtype=dtype, autocast=False, checkpointing=False, prompt=long_,
                                     params_only=True))
                continue
            for ckpt in (False, True):
                if autocast and ckpt:
                    continue
                rows.append(dict(model=m, dtype=dtype, autocast=autocast, checkpointing=ckpt, prompt=long_))
        if m != "t5-large":
            rows.append(dict(model=m, dtype="bfloat16", autocast=False, checkpointing=False, prompt=short))
        rows.append(dict(model=m, dtype="4-bit", autocast=False, checkpointing=True, prompt=long_))
    return rows


def build(name: str, dtype, meta: bool = False, device: str = "cpu", layers: int | None = None,
          vocab_size: int | None = None):
    """The model with random weights, created directly in `dtype` (no float32 detour) on `device`; on the meta
    device (no storage) for counting parameters only. `layers`, `vocab_size`: these instead of the
    configuration's."""
    import torch
    from transformers import LlamaForCausalLM, T5ForConditionalGeneration

    cfg = model_configs()[name]
    if layers is not None and cfg.model_type == "t5":
        cfg.num_layers = cfg.num_decoder_layers = layers
    elif layers is not None:
        cfg.num_hidden_layers = layers
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    cls = T5ForConditionalGeneration if cfg.model_type == "t5" else LlamaForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if meta else device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    return model, cfg


def measure(row: dict) -> dict:
    import torch
    from transformers import ByT5Tokenizer

    from nlora.adapters import ContinualAdapters
    from nlora.models import default_target_modules, enable_gradient_checkpointing
    from nlora.objectives import make_objective, to_device
    from nlora.tasks.data import Example

    torch.manual_seed(0)
    out = dict(row)
    if row["dtype"] == "4-bit":
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            return {**out, "skipped": "needs CUDA and bitsandbytes"}
        return {**out, "skipped": "not measured by this CPU script"}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[row["dtype"]]
    device = row.get("device", "cpu")
    model, cfg = build(row["model"], dtype, meta=bool(row.get("params_only")), device=device)
    kind = "seq2seq" if cfg.model_type == "t5" else "decoder"

    def by_dtype(params) -> dict:
        acc: dict[str, int] = {}
        for p in params:
            key = str(p.dtype).removeprefix("torch.")
            acc[key] = acc.get(key, 0) + p.numel() * p.element_size()
        return acc

    if row.get("params_only"):
        return {**out, "params_base": by_dtype(model.parameters()), "params_lora": {}}
    model.eval()
    if row["checkpointing"]:
        enable_gradient_checkpointing(model)
    adapters = ContinualAdapters(model, kind, 8, 32.0, 0.1, default_target_modules(cfg.model_type))
    adapters.add("t0")
    peft_model = adapters.model
    base_params = [p for n, p in peft_model.named_parameters() if "lora_" not in n]
    out["params_base"] = by_dtype(base_params)
    out["params_lora"] = by_dtype(p for n, p in peft_model.named_parameters() if "lora_" in n)

    tokenizer = ByT5Tokenizer()
    objective = make_objective(kind, tokenizer, row["prompt"], 16)
    text = "x" * (row["prompt"] + 8)  # byte-level: one token a byte, truncated to `prompt` tokens
    batch = to_device(objective.collate([Example("t", text, ANSWER, (ANSWER, "negative"), text)]), device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=row["autocast"])
    cuda = device.startswith("cuda")
    if cuda:  # a first step allocates the kernels' workspaces: the step measured is the second
        peft_model.train()
        with autocast:
            objective.loss(peft_model, batch).backward()
        peft_model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["allocated_before"] = torch.cuda.memory_allocated(device)

    param_storages = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    weight_shapes = {tuple(p.shape) for p in base_params if p.dim() == 2}
    saved: dict[int, tuple[str, int]] = {}
    counting = [True]

    def note(t, kind_: str | None = None):
        if not isinstance(t, torch.Tensor) or not counting[0] or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in saved or ptr in param_storages or storage.nbytes() == 0:
            return
        kind_ = kind_ or ("wcopy" if tuple(t.shape) in weight_shapes else "activation")
        saved[ptr] = (kind_, storage.nbytes())

    def pack(t):
        note(t)
        return t

    def layer_inputs(module, args, kwargs):
        for v in (*args, *kwargs.values()):
            for t in (v if isinstance(v, (tuple, list)) else (v,)):
                note(t, "activation")

    hooks = []
    if row["checkpointing"]:
        from transformers.modeling_layers import GradientCheckpointingLayer

        hooks = [m.register_forward_pre_hook(layer_inputs, with_kwargs=True) for m in peft_model.modules()
                 if isinstance(m, GradientCheckpointingLayer)]
    head = peft_model.get_base_model().lm_head
    logits_bytes = []
    hooks.append(head.register_forward_hook(lambda m, i, o: logits_bytes.append(o.numel() * o.element_size())))
    peft_model.train()
    start = time.perf_counter()
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective.loss(peft_model, batch)
    counting[0] = False
    for h in hooks:
        h.remove()
    loss.backward()
    if cuda:  # peak of the step over what was allocated before it (weights, adapters, inputs)
        torch.cuda.synchronize(device)
        out["peak_step"] = torch.cuda.max_memory_allocated(device) - out["allocated_before"]
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["loss"] = round(loss.item(), 4)
    out["tokens"] = int(batch["attention_mask"].sum()) if kind == "decoder" else int(batch["input_ids"].numel())
    out["saved_activation"] = sum(b for k, b in saved.values() if k == "activation")
    out["saved_wcopy"] = sum(b for k, b in saved.values() if k == "wcopy")
    out["logits"] = sum(logits_bytes)
    width = batch["input_ids"].shape[1] if kind == "decoder" else batch["labels"].shape[1]
    out["full_logits"] = batch["input_ids"].shape[0] * width * cfg.vocab_size * 4
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run_all(models: list[str], json_path: str | None = None) -> list[dict]:
    """Every configuration, each in its own process; with `json_path`, the results so far are rewritten after
    each one (a long run that is stopped keeps what it measured)."""
    results = []
    for row in plan(models):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(row)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise SystemExit(f"configuration {row} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=1))
        print(table(results[-1:]).splitlines()[-1], flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return results


def mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}" if x >= 2**20 else f"{x / 2**20:.2f}"


def table(results: list[dict]) -> str:
    head = ("| model | weights | ckpt | prompt | params base MB | params LoRA MB | saved MB | of which wcopy MB "
            "| logits MB | full logits MB | peak RSS MB | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        weights = r["dtype"] + (" + bf16 autocast" if r["autocast"] else "")
        params = " + ".join(f"{mb(b)} {d}" for d, b in r.get("params_base", {}).items()) or "-"
        lora = " + ".join(f"{mb(b)} {d}" for d, b in r.get("params_lora", {}).items()) or "-"
        if "skipped" in r or r.get("params_only"):
            note = r.get("skipped", "parameters counted on the meta device; the step is not run (RAM)")
            lines.append(f"| {r['model']} | {weights} | {'yes' if r['checkpointing'] else 'no'} | {r['prompt']} "
                         f"| {params} | {lora} | {note} | | | | | |")
            continue
        total = r["saved_activation"] + r["saved_wcopy"]
        lines.append(f"| {r['model']} | {weights} | {'yes' if r['checkpointing'] else 'no'} | {r['prompt']} "
                     f"| {params} | {lora} | {mb(total)} | {mb(r['saved_wcopy'])} | {mb(r['logits'])} "
                     f"| {mb(r['full_logits'])} | {mb(r['rss'])} | {r['seconds']} |")
    return "\n".join(lines)


def check_targets(results: list[dict]) -> list[tuple[str, bool]]:
    def find(model, dtype, autocast=False, ckpt=False, prompt=None):
        for r in results:
            if (r["model"], r["dtype"], r["autocast"], r["checkpointing"]) == (model, dtype, autocast, ckpt) \
                    and (prompt is None or r["prompt"] == prompt) and "skipped" not in r:
                return r
        return None

    checks = []
    for m in sorted({r["model"] for r in results}):
        fp32, bf16 = find(m, "float32"), find(m, "bfloat16", prompt=max(r["prompt"] for r in results
                                                                          if r["model"] == m))
        if fp32 and bf16:
            ratio = sum(fp32["params_base"].values()) / sum(bf16["params_base"].values())
            checks.append((f"{m}: bf16 weights halve the base's parameter bytes (fp32/bf16 = {ratio:.2f})",
                           abs(ratio - 2) < 0.01))
        if bf16 and not bf16.get("params_only"):
            checks.append((f"{m}: bf16 weights save no weight copy for backward ({mb(bf16['saved_wcopy'])} MB)",
                           bf16["saved_wcopy"] == 0))
        auto = find(m, "float32", autocast=True)
        if auto:
            checks.append((f"{m}: for contrast, fp32 weights under bf16 autocast save {mb(auto['saved_wcopy'])} MB "
                           "of weight copies", auto["saved_wcopy"] > 0))
        if m == "t5-large":
            continue
        long_ = max(r["prompt"] for r in results if r["model"] == m)
        short = min(r["prompt"] for r in results if r["model"] == m)
        for dtype in ("float32", "bfloat16"):
            plain, ckpt = find(m, dtype, prompt=long_), find(m, dtype, ckpt=True, prompt=long_)
            if plain and ckpt and not plain.get("params_only"):
                ratio = (plain["saved_activation"] + plain["saved_wcopy"]) / \
                    (ckpt["saved_activation"] + ckpt["saved_wcopy"])
                checks.append((f"{m} {dtype}: checkpointing cuts the saved bytes {ratio:.1f}x at {long_} tokens "
                               "(target >= 4x)", ratio >= 4))
        a, b = find(m, "bfloat16", prompt=long_), find(m, "bfloat16", prompt=short)
        if a and b:
            ratio = a["logits"] / b["logits"]
            checks.append((f"{m}: the loss's logits at a {long_}-token prompt are {ratio:.2f}x those at {short} "
                           f"tokens (target within 10%; the full logits would be "
                           f"{a['full_logits'] / b['full_logits']:.1f}x)", abs(ratio - 1) <= 0.10))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-3-8b-2L,llama-2-7b-2L,t5-large",
                        help="comma-separated: t5-large, llama-2-7b-2L, llama-3-8b-2L, tiny")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in model_configs()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(model_configs())}")
    results = run_all(models, args.json)
    print(table(results))
    print()
    checks = check_targets(results)
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if not all(ok for _, ok in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
