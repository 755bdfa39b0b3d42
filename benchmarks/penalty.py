"""Cost of the continual-learning penalties on one training step (forward + backward).

For each d, a stack of ``--layers`` frozen d × d linear layers (like q/v projections), each with a LoRA adapter
(r = 8 by default), runs one forward + backward on a random (batch, seq, d) input, with the loss

  plain          mean(h²)                                      (no penalty: IncLoRA)
  delta-naive    + λ Σ_layers ‖s·B·A‖₁, plain autograd          (nlora.methods.penalties.delta_l1_naive)
  delta-chunked  + λ Σ_layers ‖s·B·A‖₁, chunked Function         (nlora.methods.penalties.delta_l1)
  reference      + λ Σ_layers ‖A·B‖₁ (public N-LoRA code)       (nlora.methods.penalties.reference_l1)
  factors        + λ Σ_layers ‖A‖₁ + ‖B‖₁                       (nlora.methods.penalties.factors_l1)
  o-lora         + λ₁ Σ_layers Σ_s Σ|A_s·A_tᵀ| (``--previous`` earlier adapters) + λ₂ Σ‖θ_t‖²

The earlier adapters exist only as frozen A's for the O-LoRA term, so every row runs the same network and
the differences are the penalties' own cost. No optimizer step. Each configuration runs in a fresh
subprocess; time is the median of ``--repeats`` steps after ``--warmup`` steps (CUDA synchronised).

Memory (printed with the table):
  cuda  peak = torch.cuda.max_memory_allocated() over one step (resident tensors included);
  cpu   peak = bytes of the tensors resident before the step (weights, adapters, input, computed exactly)
        + (peak RSS during the step − RSS just before it), the peak RSS reset through /proc/self/clear_refs
        and glibc's mmap threshold fixed at 64 KiB (after the timed steps) so freed tensors leave the RSS at once;
  both  saved = bytes of the distinct non-resident tensors autograd saves for backward during one step
        (torch.autograd.graph.saved_tensors_hooks): what a penalty keeps alive from forward to backward.

Examples:
  python benchmarks/penalty.py --device cpu --dims 256,512,1024 --layers 4 --batch 4 --seq 128
  python benchmarks/penalty.py --preset llama7b          # 64 layers of 4096 x 4096, bf16, on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("plain", "delta-naive", "delta-chunked", "reference", "factors", "o-lora")
PRESETS = {"llama7b": dict(dims="4096", layers=64, batch=4, seq=512, dtype="bfloat16")}
LAMBDA, ORTH_LAMBDA, L2_LAMBDA = 0.4, 0.5, 0.1


# ----------------------------------------------------------------------------------------------- worker

def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _return_freed_memory_to_os() -> None:
    """glibc: serve every allocation of 64 KiB or more by mmap (so a freed tensor leaves the RSS at once) and
    release what the heap already caches. Done after timing, so the timed steps use the default allocator."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from nlora.methods.penalties import delta_l1, delta_l1_naive, factors_l1, l2_squared, olora_orthogonality, reference_l1

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    d, n_layers, r, config = spec["d"], spec["layers"], spec["rank"], spec["config"]
    scaling = spec["alpha"] / r
    cuda = device.type == "cuda"
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dtype)

    weights = [randn(d, d, std=1 / math.sqrt(d)) for _ in range(n_layers)]
    A = [randn(r, d, std=1 / math.sqrt(d)).requires_grad_() for _ in range(n_layers)]
    B = [randn(d, r, std=0.02).requires_grad_() for _ in range(n_layers)]  # mid-training: B ≠ 0
    previous = [[randn(r, d, std=1 / math.sqrt(d)) for _ in range(spec["previous"])] for _ in range(n_layers)] \
        if config == "o-lora" else [[] for _ in range(n_layers)]
    x = randn(spec["batch"], spec["seq"], d)
    resident = weights + A + B + [p for ps in previous for p in ps] + [x]
    resident_bytes = sum(t.numel() * t.element_size() for t in resident)
    params = A + B

    def penalty():
        total = 0.0
        for i in range(n_layers):
            if config == "delta-naive":
                total = total + LAMBDA * delta_l1_naive(A[i], B[i], scaling)
            elif config == "delta-chunked":
                total = total + LAMBDA * delta_l1(A[i], B[i], scaling, chunk_size=spec["chunk_size"])
            elif config == "reference":
                total = total + LAMBDA * reference_l1(A[i], B[i])
            elif config == "factors":
                total = total + LAMBDA * factors_l1(A[i], B[i])
            elif config == "o-lora":
                total = total + ORTH_LAMBDA * olora_orthogonality(A[i], previous[i])
        if config == "o-lora":
            total = total + L2_LAMBDA * l2_squared(params)
        return total

    def step(penalised=config != "plain"):
        h = x
        for W, a, b in zip(weights, A, B):
            h = F.linear(h, W) + scaling * F.linear(F.linear(h, a), b)
        loss = h.float().square().mean()
        if penalised:
            loss = loss + penalty()
        loss.backward()
        for p in params:
            p.grad = None

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["repeats"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)

    # paired: a plain step and a penalised one back to back in this process, so that a load change on a shared
    # machine hits both; the median of the per-pair ratios
    paired = []
    for i in range(spec["repeats"] if config != "plain" else 0):
        pair = {}
        for penalised in ((False, True) if i % 2 else (True, False)):  # alternate which runs first
            sync()
            t0 = time.perf_counter()
            step(penalised)
            sync()
            pair[penalised] = time.perf_counter() - t0
        paired.append(pair[True] / pair[False])

    # tensors saved for backward that are not resident anyway (deduplicated by storage)
    resident_ptrs = {t.untyped_storage().data_ptr() for t in resident}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync()
        peak = torch.cuda.max_memory_allocated(device)
        step_peak = peak - before
    elif not spec.get("rss", True):  # a worker in a process that goes on: its RSS says nothing of this step
        peak = step_peak = None
    else:
        _return_freed_memory_to_os()
        step()  # one step under the new allocator settings before measuring
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); no CPU memory measure")
        before = _proc_status_kib("VmRSS") * 1024
        step()
        step_peak = _proc_status_kib("VmHWM") * 1024 - before
        peak = resident_bytes + step_peak

    return dict(config=config, d=d, layers=n_layers, time_s=statistics.median(times), times_s=times,
                paired_ratio=statistics.median(paired) if paired else 1.0,
                peak_bytes=peak, step_peak_bytes=step_peak, saved_bytes=sum(saved.values()),
                resident_bytes=resident_bytes)


# ----------------------------------------------------------------------------------------------- driver

def machine_line(device: str, threads: int) -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    line = f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
    line += f"torch threads {threads or torch.get_num_threads()}"
    if device.startswith("cuda"):
        line += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--dims", default="512,1024,2048,4096", help="comma-separated layer widths d")
    ap.add_argument("--layers", type=int, default=8, help="adapted d x d layers in the stack")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (scaling = alpha / rank)")
    ap.add_argument("--previous", type=int, default=3, help="earlier adapters in the O-LoRA term")
    ap.add_argument("--chunk-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="rows of ΔW per chunk (delta-chunked); auto: nlora's default for the device")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="auto: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads in each worker (0: torch's default); 1 is steadier on a shared machine")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="llama7b: --dims 4096 --layers 64 --batch 4 --seq 512 --dtype bfloat16 (a GPU job)")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def resolve(args: argparse.Namespace) -> tuple[str, str]:
    """Apply --preset to `args`; the device and dtype that `auto` stands for."""
    import torch

    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def worker_spec(args: argparse.Namespace, device: str, dtype: str, d: int, config: str) -> dict:
    """What `run_worker` measures: one configuration at width d."""
    return dict(device=device, dtype=dtype, d=d, layers=args.layers, rank=args.rank, alpha=args.alpha,
                previous=args.previous, chunk_size=args.chunk_size, repeats=args.repeats, warmup=args.warmup,
                batch=args.batch, seq=args.seq, config=config, seed=0, threads=args.threads)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    device, dtype = resolve(args)
    dims = [int(v) for v in args.dims.split(",") if v.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if "plain" not in configs:
        configs.insert(0, "plain")  # the ratios need it

    results = []
    for d in dims:
        for config in configs:
            spec = worker_spec(args, device, dtype, d, config)
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                results.append(dict(config=config, d=d, error=(proc.stderr.strip().splitlines() or ["?"])[-1]))
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  done d={d} {config}", file=sys.stderr, flush=True)

    mib = 2 ** 20
    if device.startswith("cuda"):
        memory = "peak = torch.cuda.max_memory_allocated() over one step (resident tensors included)"
    else:
        memory = ("peak = resident tensors (exact bytes) + (peak RSS during one step - RSS before it), fresh "
                  "process per row, peak RSS reset via /proc/self/clear_refs, glibc mmap threshold 64 KiB")
    print(f"machine: {machine_line(device, args.threads)}")
    print(f"device {device}, dtype {dtype}, {args.layers} layers of d x d, LoRA r={args.rank} "
          f"(scaling {args.alpha / args.rank:g}), input ({args.batch}, {args.seq}, d), chunk {args.chunk_size}, "
          f"O-LoRA vs {args.previous} earlier adapters; forward+backward, no optimizer step; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"memory: {memory}; saved = non-resident bytes saved for backward (saved_tensors_hooks)")
    print()
    print("paired = median over steps of (penalised step / plain step), run back to back in the same process")
    print()
    print("| d | method | step ms | x plain | x plain, paired | peak MiB | x plain | step peak MiB | "
          "saved for bwd MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in dims:
        base = next((r for r in results if r["d"] == d and r["config"] == "plain" and "error" not in r), None)
        for r in (r for r in results if r["d"] == d):
            if "error" in r:
                print(f"| {d} | {r['config']} | failed: {r['error']} | | | | | | |")
                continue
            t_ratio = f"{r['time_s'] / base['time_s']:.3f}" if base else "-"
            m_ratio = f"{r['peak_bytes'] / base['peak_bytes']:.3f}" if base else "-"
            print(f"| {d} | {r['config']} | {r['time_s'] * 1e3:.2f} | {t_ratio} | {r['paired_ratio']:.3f} | "
                  f"{r['peak_bytes'] / mib:.1f} | "
                  f"{m_ratio} | {r['step_peak_bytes'] / mib:.1f} | {r['saved_bytes'] / mib:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device, dtype=dtype, args=vars(args), results=results),
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
