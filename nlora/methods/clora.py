"""CLoRA (Controlled LoRA, arXiv 2410.16801, ACL 2025): the trained adapter's factors are kept out of fixed random
subspaces, adding per adapted layer

    λ/2 · ( ‖A P_A‖²_F + ‖Bᵀ P_B‖²_F ),     A: r × d_in, B: d_out × r (ΔW = s·B·A),

with P_A (d_in × k) and P_B (d_out × k) fixed matrices of orthonormal columns, k = `clora_k` capped at the
dimension. The rows of A are pushed out of span(P_A), so inputs there change no output; the columns of B out of
span(P_B). As in the paper the scaling s is not in the penalty.

The bases are drawn from (seed, layer name, side) on the CPU in float64 (a Gaussian matrix's QR, signs fixed by
R's diagonal: a uniformly random orthonormal frame) and regenerated wherever they are needed, by every process and
on resume, never saved: at k = 512 they would take 604 MB on T5-large. Each process keeps the ones it has built in
memory. Where k reaches a layer's dimension the basis spans the whole space, and the penalty is ‖A‖²_F (or ‖B‖²_F),
formed without it.

Layout: one shared adapter trained on every task (SeqLoRA + penalty, the paper's continual setting; `clora_base
seq-lora`), or a new adapter per task with the penalty on the current one (`clora_base inc-lora`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..options import MethodOptions, option
from ..train.regularization import LossTerm
from .base import Method
from .registry import register


@dataclass
class CLoRAOptions(MethodOptions):
    clora_lambda: float = option("weight λ of the penalty λ/2 (|A P_A|² + |Bᵀ P_B|²)", default=1.0, minimum=0)
    clora_k: int = option("columns of each fixed orthonormal basis P_A, P_B (capped at the layer's dimension)",
                          default=512, minimum=1)
    clora_base: str = option("seq-lora (one shared adapter, the paper's setting) or inc-lora (a new adapter per "
                             "task, the penalty on the current one)", default="seq-lora",
                             choices=("seq-lora", "inc-lora"))


def orthonormal_basis(dim: int, k: int, seed: int, layer: str, side: str) -> torch.Tensor:
    """A dim × min(k, dim) float32 matrix of orthonormal columns, the same for the same arguments in any process."""
    digest = hashlib.sha256(f"clora/{seed}/{layer}/{side}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
    gaussian = torch.randn(dim, min(k, dim), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()


def clora_penalty(A: torch.Tensor, B: torch.Tensor, P_A: torch.Tensor, P_B: torch.Tensor) -> torch.Tensor:
    """‖A P_A‖²_F + ‖Bᵀ P_B‖²_F."""
    return (A @ P_A).square().sum() + (B.T @ P_B).square().sum()


@register
class CLoRA(Method):
    name = "clora"
    description = "SeqLoRA (or IncLoRA, clora_base) + (lambda/2)(|A P_A|^2 + |B^T P_B|^2) against fixed random bases"
    Options = CLoRAOptions
    smoke_options = {"clora_lambda": 10.0, "clora_k": 16}

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.adapter_layout = "snapshot" if self.options.clora_base == "seq-lora" else "stacked"
        self._bases: dict[tuple, torch.Tensor] = {}  # (layer, side, device, dtype) -> basis

    def basis(self, layer: str, side: str, dim: int, like: torch.Tensor) -> torch.Tensor:
        key = (layer, side, like.device, like.dtype)
        if key not in self._bases:
            basis = orthonormal_basis(dim, self.options.clora_k, self.config.seed, layer, side)
            self._bases[key] = basis.to(like)
        return self._bases[key]

    def _projected_energy(self, layer: str, side: str, X: torch.Tensor) -> torch.Tensor:
        """‖X P‖²_F for X = A (r × d_in) or Bᵀ (r × d_out). Where k reaches the dimension the basis is a square
        orthogonal matrix and ‖X P‖_F = ‖X‖_F: no basis and no product (MiniLM's 384 < the default k, 512)."""
        dim = X.shape[1]
        if self.options.clora_k >= dim:
            return X.square().sum()
        return (X @ self.basis(layer, side, dim, X)).square().sum()

    def _layer_penalty(self, f) -> torch.Tensor:
        return self._projected_energy(f.layer, "A", f.A) + self._projected_energy(f.layer, "B", f.B.T)

    def loss_terms(self, k):
        return [LossTerm("clora", self.options.clora_lambda / 2, self._layer_penalty, option="clora_lambda")]
