"""S-LoRA, renamed SD-LoRA (Wu et al., ICLR 2025, arXiv 2501.13198): a new adapter per task; once a task is trained
its update is split, in every adapted layer ℓ, into a fixed direction and a learnable magnitude,

    ΔW_ℓ = Σ_{i<t} α_i · D_{i,ℓ} + s·B_t A_t,     D_{i,ℓ} = B_i A_i / ‖B_i A_i‖_F,

and every α_i keeps training, with the current adapter, in every later task.

Choices where the paper and its public code (WuYichen-97/SD-Lora-CL) differ:
- normalisation: the paper's ‖B_i A_i‖_F of each layer, exact, formed from r × r products (‖BA‖²_F =
  tr(BᵀB·AAᵀ)); the code divides by ‖B_i‖_F·‖A_i‖_F, an upper bound that depends on how the product is factored,
  so its "unit" directions fall short of unit norm by a layer-dependent amount;
- the current adapter trains unnormalised (the code's): its normalised direction is undefined at LoRA's B = 0
  start. It is split into direction and magnitude when the next task begins (`before_task`), so the model
  evaluated after a task is the one that task trained;
- α: one per task shared by every layer (`slora_alpha_scope task`, the paper's vector and the code's), or one per
  task and layer (`layer`). Initialised, at the split, to the magnitude the task ended with: the mean over layers
  of ‖s·B_i A_i‖_F for `task` (the single magnitude closest to the trained update: the formula gives every layer of
  a task the same norm α_i, so the split equalises them), each layer's own for `layer` (the split then leaves the
  model unchanged). The code re-creates every α at 0.8 at each task, which discards the learned magnitudes and,
  in weight units, is an arbitrary size.
- no folding: a folded past path carries one scale, and every earlier task keeps its own learnable α, so each task
  stays a LoRA path of its own (`folds_past = False`; the forward cost grows with the task count). Evaluation sums
  all of them, with no task id; the saved adapters keep alpha / r, and `update_scales` gives each one's weight
  α_i / ‖s·B_i A_i‖_F from the method's state, from which `nlora predict` and `nlora export` rebuild the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import MethodOptions, option
from .base import Method
from .registry import register


@dataclass
class SLoRAOptions(MethodOptions):
    slora_alpha_scope: str = option("task (one learnable magnitude per earlier task, shared by all layers: the "
                                    "paper's) or layer (one per task and layer)", default="task",
                                    choices=("task", "layer"))


def update_norm(A: torch.Tensor, B: torch.Tensor, scaling: float) -> float:
    """‖scaling · B @ A‖_F without forming the d_out × d_in product: ‖BA‖²_F = tr((BᵀB)(AAᵀ)), in float64."""
    A, B = A.detach().double(), B.detach().double()
    squared = ((B.T @ B) * (A @ A.T)).sum()  # tr(XY) = Σ X ∘ Yᵀ, and A Aᵀ is symmetric
    return abs(scaling) * float(squared.clamp_min(0).sqrt())


@register
class SLoRA(Method):
    name = "s-lora"
    description = ("IncLoRA with each earlier task's update split into a frozen unit direction and a learnable "
                   "magnitude alpha (SD-LoRA), the alphas trained in every later task")
    Options = SLoRAOptions
    folds_past = False  # every earlier task keeps its own learnable magnitude
    needs_task_id = False  # all adapters are summed at evaluation

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.layers: list[str] = []  # the adapted layers, in model order (the entries of a layer-scope alpha)
        # per earlier task, in task order: its magnitude(s) α and each layer's ‖s·B A‖_F
        self.alphas: dict[str, torch.nn.Parameter] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self._adapters = None
        self._device = torch.device("cpu")

    def setup(self, ctx):
        self._adapters, self._device = ctx.adapters, ctx.device

    # ---------------------------------------------------------------- the split, when the next task begins
    def before_task(self, k, ctx):
        if k == 0:
            return
        # never split before: a resumed run's state, loaded after this, is that of an earlier phase (which holds
        # no α for task k−1) or a checkpoint of this phase, whose α_{k−1} is copied into the one made here
        name = self.adapter_name(k - 1)
        factors = ctx.adapters.factors(name)
        self.layers = [f.layer for f in factors]
        base = [self._base_scaling(ctx.adapters, f.layer, name) for f in factors]
        norms = torch.tensor([update_norm(f.A, f.B, s) for f, s in zip(factors, base)], dtype=torch.float32)
        alpha = norms.mean() if self.options.slora_alpha_scope == "task" else norms.clone()
        self._add(name, alpha, norms)

    @staticmethod
    def _base_scaling(adapters, layer: str, name: str) -> float:
        module = dict(adapters.lora_layers())[layer]
        return module.lora_alpha[name] / module.r[name]

    def _add(self, name: str, alpha: torch.Tensor, norms: torch.Tensor) -> None:
        self.alphas[name] = torch.nn.Parameter(alpha.to(self._device, torch.float32))
        self.norms[name] = norms.to(torch.float32)
        if self._adapters is not None:
            self._apply(name)

    def _apply(self, name: str) -> None:
        """Make the model weigh adapter `name` by α / ‖s·B A‖_F in each layer, read at every forward."""
        alpha, norms = self.alphas[name], self.norms[name].to(self._device)
        per_layer = alpha.dim() == 1

        def scale(i: int):
            if norms[i] == 0:  # an update that stayed zero (B never trained) has no direction
                return lambda: alpha[i] * 0 if per_layer else alpha * 0
            return lambda: (alpha[i] if per_layer else alpha) / norms[i]
        self._adapters.scale_by(name, {layer: scale(i) for i, layer in enumerate(self.layers)})

    def parameters(self, k):
        return {f"alpha.{name}": alpha for name, alpha in self.alphas.items()}

    def update_scales(self, k):
        out = {}
        for name, alpha in self.alphas.items():
            norms = self.norms[name]
            values = alpha.detach().cpu().float().expand_as(norms) / norms
            out[name] = {layer: float(v) if n > 0 else 0.0 for layer, v, n in zip(self.layers, values, norms)}
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self):
        return {"layers": list(self.layers),
                "tasks": [{"adapter": name, "alpha": alpha.detach().cpu(), "norm": self.norms[name]}
                          for name, alpha in self.alphas.items()]}

    def load_state_dict(self, state):
        self.layers = list(state["layers"])
        for entry in state["tasks"]:
            name = entry["adapter"]
            if name in self.alphas:  # the optimizer holds this tensor: copy into it
                with torch.no_grad():
                    self.alphas[name].copy_(entry["alpha"])
                self.norms[name] = entry["norm"].to(torch.float32)
            else:
                self._add(name, entry["alpha"], entry["norm"])
