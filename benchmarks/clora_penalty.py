"""CLoRA's penalty against the training step it is added to, paired in one process: a plain LoRA step (forward and
backward of the task loss), the same step plus the penalty formed with the bases (‖A P_A‖²_F + ‖Bᵀ P_B‖²_F, two
products per layer), and plus the penalty as `clora` forms it (without a basis where k reaches the layer's
dimension: there P is square and orthogonal, so ‖A P_A‖_F = ‖A‖_F). The three run in turn within each round, so a
machine whose speed drifts (other jobs) moves them alike; the table gives the median over rounds of each step
against the plain one of its round, and the penalty's own forward and backward, timed alone.

    python benchmarks/clora_penalty.py --rounds 15 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nlora import RunConfig  # noqa: E402
from nlora.adapters import ContinualAdapters  # noqa: E402
from nlora.methods import get_method  # noqa: E402
from nlora.methods.clora import orthonormal_basis  # noqa: E402
from nlora.models import default_target_modules, load_backbone  # noqa: E402
from nlora.objectives import make_objective  # noqa: E402
from nlora.tasks.data import load_task  # noqa: E402
from nlora.tasks.synthetic import write_synthetic_benchmark  # noqa: E402
from nlora.train.regularization import LayerFactors  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def with_bases(factors, k: int, seed: int):
    """The penalty with explicit bases, as every layer formed it before the complete-basis shortcut."""
    bases = {f.layer: (orthonormal_basis(f.A.shape[1], k, seed, f.layer, "A"),
                       orthonormal_basis(f.B.shape[0], k, seed, f.layer, "B")) for f in factors}
    return lambda: sum((f.A @ bases[f.layer][0]).square().sum() + (f.B.T @ bases[f.layer][1]).square().sum()
                       for f in factors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MINILM)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5, help="steps of each kind per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=512, help="clora_k")
    args = p.parse_args()

    bb = load_backbone(args.model)
    adapters = ContinualAdapters(bb.model, bb.kind, r=8, alpha=16, dropout=0.0,
                                 target_modules=default_target_modules(bb.model_type))
    adapters.add("shared")
    factors = list(adapters.factors("shared"))
    with torch.no_grad():
        for f in factors:  # a trained adapter: B away from 0
            f.B.normal_(0, 0.02)
    objective = make_objective(bb.kind, bb.tokenizer, 128, 4)
    with tempfile.TemporaryDirectory() as folder:
        data = write_synthetic_benchmark(folder, n_train=args.batch_size, n_test=1, seed=0)
        batch = objective.collate(load_task(data, "harbor").train[: args.batch_size])
    config = RunConfig(method="clora", tasks=["a", "b"], clora_k=args.k)
    config.validate()
    (term,) = get_method("clora")(config).loss_terms(1)
    kinds = {
        "plain": lambda: 0.0,
        "with bases": with_bases(factors, args.k, config.seed),
        "clora": lambda: sum(term.per_layer(LayerFactors(f.layer, f.A, f.B, 2.0)) for f in factors),
    }
    bb.model.train()

    def step(penalty) -> float:
        start = time.perf_counter()
        loss = objective.loss(bb.model, batch) + term.weight * penalty()
        loss.backward()
        elapsed = time.perf_counter() - start
        bb.model.zero_grad(set_to_none=True)
        return elapsed

    for penalty in kinds.values():  # warm-up
        step(penalty)
    times = {name: [] for name in kinds}
    for r in range(args.rounds):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for name in order:
            times[name].append(statistics.median(step(kinds[name]) for _ in range(args.steps)))
    print(f"{args.model}, {len(factors)} adapted layers, r 8, k {args.k}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds of {args.steps} steps")
    print("| step | median (s) | against plain (median, range) |")
    print("|---|---|---|")
    for name, values in times.items():
        ratios = [v / plain for v, plain in zip(values, times["plain"])]
        print(f"| {name} | {statistics.median(values):.4f} | {statistics.median(ratios):.3f}x "
              f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    print("\n| penalty alone, forward and backward | median (ms) | range (ms) |\n|---|---|---|")
    for name in ("with bases", "clora"):
        alone = [penalty_alone(kinds[name], factors) for _ in range(args.rounds)]
        print(f"| {name} | {statistics.median(alone):.2f} | {min(alone):.2f}-{max(alone):.2f} |")


def penalty_alone(penalty, factors, repeats: int = 20) -> float:
    """Milliseconds per forward and backward of the penalty over every layer, the mean of `repeats`."""
    start = time.perf_counter()
    for _ in range(repeats):
        penalty().backward()
    elapsed = (time.perf_counter() - start) / repeats * 1e3
    for f in factors:
        f.A.grad = f.B.grad = None
    return elapsed


if __name__ == "__main__":
    main()
