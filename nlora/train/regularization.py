"""The one mechanism that adds the methods' regularisers: each term is computed inside each LoRA layer's forward
pass and attached to the layer's output.

A method only declares its terms (`LossTerm`: a name, the phase's weight, and a function of one layer's current
factors). `Regularization` hooks every LoRA layer that holds the adapter being trained; in the layer's forward it
evaluates the terms on the layer's parameters and attaches their weighted sum to the layer output through an
identity autograd Function (`_AttachTerm`). Its backward passes the output's gradient through unchanged and sends
gradient `coefficient` into the term, so autograd adds the term's gradient to A and B while the layer's own
backward runs.

Why inside the forward: engines that shard parameters (FSDP2, DeepSpeed ZeRO-3) hold a layer's parameters whole
only while that layer runs forward or backward. The term's gradient is formed in the same backward pass as the
layer's, so it reaches the parameters (and their gradient reduction) like any other gradient; the same code
then serves one process, DDP, FSDP2 and ZeRO-3.

The coefficient. A term must enter the step's gradient as if it had been added to the loss once per optimizer
step. Whatever multiplies the loss before backward (accelerate's 1/accumulation, a gradient scaler's loss scale,
DeepSpeed's own scaling) is read from the gradient that reaches the loss: `anchor(loss)` hooks the loss tensor,
and the terms attached in that forward get coefficient = the gradient of the loss. A and B are the same in every
micro-batch of a step, so the training loop computes the terms in the step's first micro-batch only (`enabled`),
and the accumulated gradient is the term's gradient once per step. Under DDP every process attaches the same
term in the same micro-batch and DDP averages, so it counts once.

Once per step. A loss may run a layer more than once (the encoder objective embeds prompts and options in two
forwards), and gradient checkpointing re-runs a layer's forward during backward. Every forward computes and
attaches the term (so a recomputation saves exactly the tensors the original forward saved), but only a layer's
first forward since the last backward gets a non-zero coefficient: the counts restart when backward starts
(reentrant checkpointing backpropagates through its recomputations, and one of them is then the first) and when
it ends (ready for the next step). Values (for logging and the finite check) are kept per layer and term and
overwritten by each forward, so a recomputation rewrites the same value; `collect()` returns their sum over the
layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from ..adapters import LayerFactors
from ..precision import autocast_off

__all__ = ["LayerFactors", "LossTerm", "Regularization"]


@dataclass(frozen=True)
class LossTerm:
    """One regulariser of a phase (`Method.loss_terms`): `weight · Σ_layers per_layer(factors)` is added to the
    loss of every optimizer step, `per_layer` getting each adapted layer's `LayerFactors` of the trained adapter
    inside that layer's forward (so it works unchanged under DDP and FSDP2). `name` labels it in the log; `option`
    is the method option that sets the weight (named when the term swamps the task loss)."""
    name: str
    weight: float
    per_layer: Callable[[LayerFactors], torch.Tensor]
    option: str | None = None


class _AttachTerm(torch.autograd.Function):
    """Identity on the layer output; its backward gives the attached term the gradient `coefficient` (zero for
    a layer's second and later forwards of one step, see `Regularization`)."""

    @staticmethod
    def forward(ctx, output, term, regularization, first):
        ctx.regularization, ctx.first, ctx.term_dtype = regularization, first, term.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.first:  # no gradient into this copy of the term
            return grad_output, None, None, None
        coefficient = ctx.regularization.coefficient().to(device=grad_output.device, dtype=ctx.term_dtype)
        return grad_output, coefficient, None, None


class Regularization:
    """Installs `terms` on every LoRA layer of `model` that holds adapter `adapter`; use as a context manager (or
    call `close`) so that the hooks go when training ends. No terms: no hooks."""

    def __init__(self, model: torch.nn.Module, adapter: str, terms: Sequence[LossTerm]):
        self.adapter = adapter
        self.terms = [t for t in terms if t.weight != 0]
        self._values: dict[str, dict[str, torch.Tensor]] = {}
        self._loss_grad: torch.Tensor | None = None
        self._calls: dict[str, int] = {}  # forwards of each layer since the last backward
        # False: forwards attach nothing (the training loop's micro-batches after a step's first one)
        self.enabled = True
        self._handles = []
        if self.terms:
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    self._handles.append(module.register_forward_hook(self._hook(name)))

    def __enter__(self) -> "Regularization":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def layer_factors(self, name: str, module: LoraLayer) -> LayerFactors:
        others = [module.lora_A[n].weight for n in module.lora_A if n != self.adapter]
        return LayerFactors(name, module.lora_A[self.adapter].weight, module.lora_B[self.adapter].weight,
                            float(module.scaling[self.adapter]), others)

    def _hook(self, name: str):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and self.enabled):  # evaluation, a no-grad forward, or switched off
                return None
            calls = self._calls.get(name, 0)
            self._calls[name] = calls + 1
            factors = self.layer_factors(name, module)
            with autocast_off(output.device):  # terms in the factors' own precision
                values = {t.name: t.weight * t.per_layer(factors) for t in self.terms}
            self._values[name] = {k: v.detach() for k, v in values.items()}  # a recomputed forward overwrites
            return _AttachTerm.apply(output, torch.stack(list(values.values())).sum(), self, calls == 0)
        return hook

    def anchor(self, loss: torch.Tensor) -> torch.Tensor:
        """Mark `loss` as what backward starts from for the terms attached since the last call: they get the
        gradient that reaches `loss`. Returns `loss`."""
        if self.active:
            self._loss_grad = None

            def record(grad):
                self._loss_grad = grad.detach()
                # count forwards afresh for the recomputations of this backward and for the next step
                self._calls.clear()
                torch.autograd.Variable._execution_engine.queue_callback(self._calls.clear)

            loss.register_hook(record)
        return loss

    def coefficient(self) -> torch.Tensor:
        if self._loss_grad is None:
            raise RuntimeError("a regularised forward was backpropagated from a tensor that was not anchored "
                               "(Regularization.anchor)")
        return self._loss_grad

    def collect(self) -> dict[str, torch.Tensor]:
        """Each term's weighted value summed over the layers of the last forward (0-dim tensors), then forget
        them. Empty when there are no terms."""
        out: dict[str, torch.Tensor] = {}
        for per_term in self._values.values():
            for key, value in per_term.items():
                out[key] = out[key] + value.to(out[key].device) if key in out else value
        self._values = {}
        return out
