"""Where the delta penalty's time goes: ‖s·B·A‖₁ with its subgradient (nlora.methods.penalties.delta_l1, value and both
gradients) on one d × d layer, per chunk size, against what the penalty rides on, one forward + input-gradient
backward of that layer's frozen d × d weight at --tokens tokens. Also the achieved GFLOP/s of both: the penalty
is 3 products of rank r per ΔW (B·A, S·Aᵀ, Bᵀ·S with S = sign(B·A)), 6·r·d² FLOPs; the layer 4·tokens·d².
Sizes are timed in turn, --repeats rounds, best of each (the machine may be shared).

  python benchmarks/penalty_chunks.py --dim 4096 --tokens 512
"""

from __future__ import annotations

import argparse
import time

import torch

from nlora.methods.penalties import delta_l1


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--chunks", default="4096,1024,512,256,128,64,32")
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    d, r = args.dim, args.rank
    g = torch.Generator().manual_seed(0)
    A = torch.randn(r, d, generator=g).requires_grad_()
    B = (torch.randn(d, r, generator=g) * 0.01).requires_grad_()
    W, x = torch.randn(d, d, generator=g), torch.randn(args.tokens, d, generator=g).requires_grad_()

    def penalty(chunk):
        delta_l1(A, B, 2.0, chunk_size=chunk).backward()
        A.grad = B.grad = None

    def layer():
        (x @ W.T).sum().backward()
        x.grad = None

    chunks = [int(c) for c in args.chunks.split(",")]
    runs = {"layer": layer, **{c: (lambda c=c: penalty(c)) for c in chunks}}
    for fn in runs.values():  # warm-up
        fn()
    best = {k: _timed(fn) for k, fn in runs.items()}
    for _ in range(args.repeats - 1):
        for k, fn in runs.items():
            best[k] = min(best[k], _timed(fn))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d {d}, r {r}, {args.tokens} tokens; "
          f"best of {args.repeats}")
    print("| what | ms | x layer | GFLOP/s |\n|---|---:|---:|---:|")
    print(f"| layer fwd + input-grad bwd | {best['layer'] * 1e3:.1f} | 1.000 | "
          f"{4 * args.tokens * d * d / best['layer'] / 1e9:.0f} |")
    for c in chunks:
        print(f"| delta_l1, chunk {c} | {best[c] * 1e3:.1f} | {best[c] / best['layer']:.3f} | "
              f"{6 * r * d * d / best[c] / 1e9:.0f} |")


if __name__ == "__main__":
    main()
