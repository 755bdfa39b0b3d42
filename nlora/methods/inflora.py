"""InfLoRA, interference-free LoRA (Liang & Li, CVPR 2024, arXiv 2404.00228), on the stacked layout: a new adapter
per task, every adapter summed at inference, no task id.

PEFT notation: ΔW_t = s·B_t·A_t with A_t (r × d_in) the down factor. Before task t, for every adapted layer:
  - C_t = Σ_x x xᵀ, the covariance of the layer's inputs over (a fixed draw of) the task's training examples, summed
    over the processes that split them (the forward pre-hook sees exactly what the layer gets: cross-attention k/v
    see the encoder's output, not the decoder's hidden state);
  - the rows of A_t are the top-r left singular vectors of (I − M Mᵀ)·C_t, divided by √3, where M (d_in × k,
    orthonormal columns) spans the inputs of the earlier tasks; so A_t·x = 0 for every x in span(M), and the new
    adapter leaves the earlier tasks' inputs (as far as M captures them) unmoved whatever B_t learns;
  - only B_t trains.
After task t (0-based, of T), M grows by the DualGPM rule: the covariance of task t's inputs is taken again with the
trained adapter; the directions of (I − M Mᵀ)·C_t are added, largest first, until span(M) holds the share
ε_t = (1 − ε)·t/T + ε of their energy (T is the run's task count; the reference hard-codes 15). The energy is, as
the reference code counts it, the squared singular values of C_t (`inflora_energy covariance`), or the inputs' own
energy, the eigenvalues of C_t (`input`, GPM's rule on the activations, which keeps more directions: on tiny-t5 at
ε = 0.995 the first rule's subspace holds 92-98 % of the inputs' energy).

Layers that receive the very same input tensor (q and v of a self-attention; the v of every cross-attention, which
all read the encoder's output) share one covariance and one basis: same numbers, stored once."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import NloraError
from ..objectives import to_device
from ..options import MethodOptions, option
from .base import Method
from .passes import eval_mode, layer_inputs, sum_over_processes
from .registry import register

A_SCALE = 3 ** -0.5  # the reference's row norm of a designed A (1/√3)


@dataclass
class InfLoRAOptions(MethodOptions):
    inflora_threshold: float = option("energy threshold ε of the earlier tasks' input subspace (share of each "
                                      "task's input energy it keeps); after task t of T it is (1 − ε)·t/T + ε "
                                      "with inflora_schedule linear", default=0.995, above=0, maximum=1)
    inflora_schedule: str = option("linear (the threshold rises from ε towards 1 over the run's tasks, as "
                                   "DualGPM) or constant (ε after every task)", default="linear",
                                   choices=("linear", "constant"))
    inflora_energy: str = option("what the threshold measures: covariance (the reference code's: squared "
                                 "singular values of the input covariance C) or input (eigenvalues of C: the "
                                 "share of the inputs' own energy, GPM's rule on the activations; keeps more "
                                 "directions at the same threshold)", default="covariance",
                                 choices=("covariance", "input"))
    inflora_samples: int = option("training examples of each task the input covariances are taken on (a fixed "
                                  "draw from the seed)", default=1000, minimum=1)

    def check(self, run) -> None:
        if run.train_factors == "A":
            raise NloraError("option 'train_factors': method 'inflora' designs A from the data and trains B only; "
                             "leave train_factors at both (or B)")


# ---------------------------------------------------------------------------------------------- the linear algebra

def _fix_signs(V: torch.Tensor) -> torch.Tensor:
    """Each column with its largest-magnitude entry positive: singular vectors are defined up to sign, and a fixed
    choice makes the designed A the same on every machine that computes the same subspace."""
    if V.numel() == 0:
        return V
    pick = V.abs().argmax(dim=0)
    signs = torch.sign(V.gather(0, pick.unsqueeze(0))).squeeze(0)
    return V * torch.where(signs == 0, torch.ones_like(signs), signs)


def _float64(C: torch.Tensor) -> torch.Tensor:
    """C in float64, on the CPU where its device has no float64 (MPS)."""
    return C.detach().to("cpu" if C.device.type == "mps" else C.device, torch.float64)


def complement(M: torch.Tensor | None, d: int, like: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (d × (d − k)) of the orthogonal complement of span(M) (M: d × k, orthonormal)."""
    if M is None or M.shape[1] == 0:
        return torch.eye(d, dtype=like.dtype, device=like.device)
    full, _ = torch.linalg.qr(M.to(like), mode="complete")
    return full[:, M.shape[1]:]


def projected_directions(C: torch.Tensor, M: torch.Tensor | None, power: int = 2
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """power 2: the left singular vectors of (I − M Mᵀ)·C (d × (d − k), columns orthonormal and orthogonal to
    span(M), largest first) and their energies, the squared singular values; power 1: the eigenvectors and
    eigenvalues of (I − M Mᵀ)·C·(I − M Mᵀ), the inputs' own energy along each direction. Computed in float64 in
    the complement's coordinates Q, (I − M Mᵀ)·C = Q·(Qᵀ C): the eigenvectors of Qᵀ C^power Q, mapped by Q, lie
    in the complement exactly, also where the energies vanish."""
    work = _float64(C)
    Q = complement(M, work.shape[0], work)
    if power == 2:
        G = Q.T @ work
        H = G @ G.T
    else:
        H = Q.T @ work @ Q
    energies, vectors = torch.linalg.eigh((H + H.T) / 2)
    return _fix_signs(Q @ vectors.flip(1)), energies.flip(0).clamp_min(0)


def design_A(C: torch.Tensor, M: torch.Tensor | None, r: int) -> torch.Tensor:
    """A (r × d): the top-r left singular vectors of (I − M Mᵀ)·C as rows, scaled by 1/√3. Where the complement of
    span(M) has fewer than r dimensions, the remaining rows are zero (no direction is left free of interference)."""
    V, _ = projected_directions(C, M)
    A = torch.zeros(r, C.shape[0], dtype=torch.float64, device=V.device)
    n = min(r, V.shape[1])
    A[:n] = V[:, :n].T
    return (A * A_SCALE).float()


def grow_basis(C: torch.Tensor, M: torch.Tensor | None, threshold: float, energy: str = "covariance"
               ) -> torch.Tensor:
    """M extended (DualGPM): the directions of the inputs outside span(M), largest first, until span(M) holds
    `threshold` of their energy; at most d columns. `energy` covariance (the reference code's): the left singular
    vectors of (I − M Mᵀ)·C, each counting its squared singular value, of ‖C‖²_F in all; input (GPM's rule on the
    activations X, C = X Xᵀ): those of (I − M Mᵀ)·X, each counting its share of ‖X‖²_F = trace C. With no M,
    the smallest k whose top-k directions hold `threshold` of the energy."""
    d = C.shape[0]
    old = torch.zeros(d, 0) if M is None else M.detach().cpu().float()
    work = _float64(C)
    power = 2 if energy == "covariance" else 1
    total = work.square().sum() if power == 2 else work.trace()
    if total <= 0:
        return old
    V, energies = projected_directions(C, M, power)
    shares = energies / total
    captured = 1 - shares.sum()  # the share already inside span(M)
    before = captured + torch.cumsum(shares, 0) - shares  # the share captured before adding each direction
    useful = shares > torch.finfo(torch.float64).eps * d  # never a direction of no energy (rounding only)
    k = int(((before < threshold) & useful).sum())
    return torch.cat([old, V[:, :k].cpu().float()], dim=1)


def threshold_after(k: int, n_tasks: int, epsilon: float, schedule: str) -> float:
    """ε_k = (1 − ε)·k/T + ε after task k (0-based) of T (schedule linear), or ε (constant)."""
    return (1 - epsilon) * k / n_tasks + epsilon if schedule == "linear" else epsilon


# ---------------------------------------------------------------------------------------------- the passes

def shared_input_groups(ctx, layers: dict[str, torch.nn.Module], example) -> dict[str, str]:
    """layer -> the first layer (in call order) that receives the very same input tensor on a forward pass of one
    example: q and v of a self-attention read one hidden state, every cross-attention v the encoder's output. The
    tensors are held until the pass ends, so no freed tensor's memory can pass for another's."""
    seen: list[tuple[torch.Tensor, str]] = []
    groups: dict[str, str] = {}

    def hook(name):
        def run(module, args):
            x = args[0]
            owner = next((n for t, n in seen if t is x), None)
            if owner is None:
                seen.append((x, name))
            groups.setdefault(name, owner or name)
        return run

    model = ctx.adapters.model
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            ctx.objective.forward(model, to_device(ctx.objective.collate([example]), ctx.device))
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    missing = sorted(set(layers) - set(groups))
    if missing:
        raise NloraError(f"method 'inflora': adapted layer {missing[0]} got no input in a forward pass")
    return groups


def input_covariances(ctx, examples: list, layers: dict[str, torch.nn.Module], groups: dict[str, str]
                      ) -> dict[str, torch.Tensor]:
    """Σ_x x xᵀ (float32) of each group's input over `examples` (padding excluded, nlora.methods.passes.layer_inputs),
    summed over the processes that split them; keyed by the group's first layer."""
    owners = {owner: layers[owner] for owner in dict.fromkeys(groups.values())}
    covs = {n: torch.zeros(m.in_features, m.in_features, device=ctx.device) for n, m in owners.items()}

    def add(name, x):
        x = x.float()
        covs[name].addmm_(x.T, x)

    layer_inputs(ctx, examples, owners, add)
    sum_over_processes(list(covs.values()), ctx)
    return covs


# ---------------------------------------------------------------------------------------------- the method

@register
class InfLoRA(Method):
    name = "inflora"
    description = ("a new adapter per task whose A is designed from the task's input covariance outside the "
                   "earlier tasks' input subspace; only B trains (InfLoRA)")
    Options = InfLoRAOptions
    smoke_options = {"inflora_samples": 4, "inflora_threshold": 0.9}

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.bases: dict[str, torch.Tensor] = {}  # group's first layer -> M (d_in × k), the earlier tasks' inputs
        self._groups: dict[str, str] | None = None

    def train_factors(self, k):
        return "B"

    def samples(self, ctx, k: int) -> list:
        train = list(ctx.tasks[k].train)
        n = min(self.options.inflora_samples, len(train))
        rng = random.Random(f"{self.config.seed}/inflora/{ctx.tasks[k].name}")
        return [train[i] for i in sorted(rng.sample(range(len(train)), n))]

    def covariances(self, ctx, k: int) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        layers = dict(ctx.adapters.lora_layers())
        examples = self.samples(ctx, k)
        if self._groups is None or set(self._groups) != set(layers):
            self._groups = shared_input_groups(ctx, layers, examples[0])
        return self._groups, input_covariances(ctx, examples, layers, self._groups)

    def init_adapter(self, k, ctx):
        groups, covs = self.covariances(ctx, k)  # the new adapter's B is 0: it does not change these inputs yet
        designed: dict[tuple[str, int], torch.Tensor] = {}  # one design per shared input and rank
        with torch.no_grad():
            for f in ctx.adapters.factors(ctx.adapters.current):
                key = (groups[f.layer], f.A.shape[0])
                if key not in designed:
                    designed[key] = design_A(covs[key[0]], self.bases.get(key[0]), key[1])
                f.A.copy_(designed[key].to(f.A))

    def after_task(self, k, ctx):
        n = len(ctx.tasks)
        if k == n - 1:
            return  # no later task to protect this one from
        threshold = threshold_after(k, n, self.options.inflora_threshold, self.options.inflora_schedule)
        _, covs = self.covariances(ctx, k)
        energy = self.options.inflora_energy
        self.bases = {owner: grow_basis(C, self.bases.get(owner), threshold, energy)
                      for owner, C in covs.items()}

    def state_dict(self):
        return {"bases": dict(self.bases)}

    def load_state_dict(self, state):
        self.bases = dict(state["bases"])
