"""MIGU, magnitude-based gradient updating (Du et al., Findings EMNLP 2024, arXiv 2406.17245), as an option of any
LoRA method (`grad_mask: migu`): in every task but the first, each trained LoRA factor updates only the rows whose
outputs were largest over the optimizer step.

Each factor is a linear map of its own (lora_A: d_in → r, lora_B: r → d_out). For each, forward hooks sum the
magnitude of every output row over the step's tokens, a[j] = Σ_tokens |y[..., j]| (all the step's micro-batches,
padding included, as the reference does); at the step, with the gradients whole (after DDP's all-reduce and
FSDP2's reduction), the sums are added over the processes (their ranking is that of the mean), τ = the q-quantile
of a (linear interpolation, torch.quantile), and rows with a[j] < τ get a zero gradient: the top 1 − q of the rows
update. A row of A gates one rank component, a row of B one output feature.

Ties: a new adapter's first step sees B = 0, so every row of B ties at zero and updates; after one Adam step B's
entries are ±lr, so rows of B repeat and their magnitudes are equal but for float rounding, which differs with the
batch's split across processes. Such rows may then rank differently with 1 and N processes (as the L1 penalty's
subgradient may flip a sign): N processes give the 1-process run up to rows tied at the quantile.

The public code (wenyudu/MIGU) masks nothing on its LoRA path: its trainer collects the magnitudes only for method
"migu", while its LoRA backward masks only for "cluster_activate" and "random_update", and that entry point fails
at import. This is an implementation of the paper's rule on the LoRA factors, checked against a brute-force mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..adapters import ContinualAdapters


def row_mask(magnitudes: torch.Tensor, q: float) -> torch.Tensor:
    """True for the rows that update: a[j] >= the q-quantile of a."""
    a = magnitudes.double()
    return a >= torch.quantile(a, q)


class MiguMask:
    """The output magnitudes of the trained adapter's factors over one optimizer step, and the mask they give."""

    def __init__(self, adapters: ContinualAdapters, q: float):
        self.q = q
        self.counting = True  # off for a process's placeholder micro-batch (no examples: weight 0)
        self.sums: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._hooks = []
        name = adapters.current
        for _, layer in adapters.lora_layers():
            if name not in layer.lora_A:
                continue
            for linear in (layer.lora_A[name], layer.lora_B[name]):
                if linear.weight.requires_grad:
                    self.sums[linear.weight] = torch.zeros(linear.weight.shape[0], dtype=torch.float32,
                                                           device=linear.weight.device)
                    self._hooks.append(linear.register_forward_hook(self._add(linear.weight)))

    def _add(self, weight: torch.nn.Parameter):
        def add(module, args, output):
            # training forwards only: no teacher or evaluation pass, no recomputation in backward
            if self.counting and torch.is_grad_enabled() and not _in_backward():
                self.sums[weight] += output.detach().abs().float().reshape(-1, output.shape[-1]).sum(0)
        return add

    def apply(self, world: int) -> None:
        """Zero the gradient rows below the quantile, with the magnitudes summed over the processes; then start
        the next step's sums."""
        weights = list(self.sums)
        if world > 1 and weights:
            flat = torch.cat([self.sums[w] for w in weights])
            dist.all_reduce(flat)
            offset = 0
            for w in weights:
                n = self.sums[w].numel()
                self.sums[w] = flat[offset: offset + n]
                offset += n
        with torch.no_grad():
            for w in weights:
                if w.grad is not None:
                    w.grad[~row_mask(self.sums[w], self.q)] = 0
                self.sums[w] = torch.zeros_like(self.sums[w])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _in_backward() -> bool:
    """Whether autograd is running a backward pass (non-reentrant checkpointing re-runs forwards there)."""
    return torch._C._current_graph_task_id() != -1
