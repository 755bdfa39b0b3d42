"""A complete nlora method from outside the package: SeqLoRA plus (λ/2)·‖θ − θ*‖² pulling the shared adapter
towards where it stood after the previous task (L2-SP, Li et al., ICML 2018, on a LoRA adapter).

    nlora run --method-module examples/methods/l2_anchor.py --method l2-anchor --anchor-lambda 0.1 ...

It uses only nlora's public names (`nlora.__all__`).
"""

from dataclasses import dataclass

import nlora


@dataclass
class L2AnchorOptions(nlora.MethodOptions):
    anchor_lambda: float = nlora.option("weight λ of (λ/2)·|θ − θ*|²", default=0.1, minimum=0)


@nlora.register
class L2Anchor(nlora.Method):
    name = "l2-anchor"
    description = "SeqLoRA + (lambda/2) |theta - theta*|^2 towards the adapter after the previous task"
    Options = L2AnchorOptions
    adapter_layout = "snapshot"  # one adapter trained through every task
    smoke_options = {"anchor_lambda": 10.0}

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.anchor = {}  # layer name -> {"A": tensor, "B": tensor}, the adapter after the last task

    def after_task(self, k, ctx):  # hook: the adapter is trained, not yet saved
        self.anchor = {f.layer: {"A": f.A.detach().cpu().clone(), "B": f.B.detach().cpu().clone()}
                       for f in ctx.adapters.factors(ctx.adapters.current)}

    def loss_terms(self, k):  # declared penalty, computed inside each adapted layer's forward
        if not self.anchor:
            return []

        def per_layer(f):
            star = self.anchor[f.layer]
            return ((f.A - star["A"].to(f.A)) ** 2).sum() + ((f.B - star["B"].to(f.B)) ** 2).sum()
        return [nlora.LossTerm("anchor", self.options.anchor_lambda / 2, per_layer)]

    def state_dict(self):  # saved with each task's adapter and in mid-task checkpoints
        return {"anchor": self.anchor}

    def load_state_dict(self, state):
        self.anchor = state["anchor"]
