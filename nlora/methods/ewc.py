"""EWC on a shared LoRA adapter (nlora's LoRA version of Elastic Weight Consolidation, Kirkpatrick et al., PNAS
2017): one adapter trained through every task, as SeqLoRA, plus (λ/2) Σ_i F_i (θ_i − θ*_i)² on its factors, where
θ* is the adapter after an earlier task and F the diagonal Fisher information of that task.

The Fisher of task k is taken after it trains, on up to `ewc_samples` of its training examples (a fixed draw from the
seed), in eval mode, as the mean over examples of the squared gradient of log p(y|x), one example per backward
(nlora.methods.passes): squaring batch-mean gradients would mix examples and shrink it by about the batch size. y is the
gold answer (`ewc_fisher empirical`) or drawn from the model (`sampled`, per answer position). Under DDP the
examples are split across processes and the sums added, so the Fisher equals the one-process Fisher.

Across tasks: `online` keeps one Fisher, F ← γ·F + F_k, and one anchor, the adapter after the last task;
`separate` keeps one (F_j, θ*_j) per earlier task. `ewc_normalize mean` divides each task's Fisher by its mean
entry, so λ does not depend on the scale of LoRA gradients (tiny at B = 0)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..options import MethodOptions, option
from ..train.regularization import LossTerm
from .base import Method
from .passes import per_example_squared_gradients
from .registry import register


@dataclass
class EWCOptions(MethodOptions):
    ewc_lambda: float = option("weight λ of the EWC penalty (λ/2) Σ F (θ − θ*)²", default=1.0, minimum=0)
    ewc_mode: str = option("online (one Fisher, F <- gamma F + F_k, one anchor) or separate (one Fisher and "
                           "anchor per earlier task)", default="online", choices=("online", "separate"))
    ewc_gamma: float = option("online mode: decay gamma of the accumulated Fisher", default=1.0, minimum=0,
                              maximum=1)
    ewc_samples: int = option("training examples of each task the Fisher is taken on", default=500, minimum=1)
    ewc_fisher: str = option("empirical (gold answers) or sampled (answers drawn from the model)",
                             default="empirical", choices=("empirical", "sampled"))
    ewc_normalize: str = option("mean (divide each task's Fisher by its mean entry) or none",
                                default="mean", choices=("mean", "none"))


Factors = dict[str, dict[str, torch.Tensor]]  # layer name -> {"A": tensor, "B": tensor}


@register
class EWC(Method):
    name = "ewc"
    description = "SeqLoRA + (lambda/2) sum F (theta - theta*)^2 on the shared adapter (EWC, LoRA version)"
    Options = EWCOptions
    adapter_layout = "snapshot"
    smoke_options = {"ewc_lambda": 100.0, "ewc_samples": 4}

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.anchors: list[tuple[Factors, Factors]] = []  # (Fisher, anchor) per kept task, or the one online pair

    # ---------------------------------------------------------------- the penalty
    def loss_terms(self, k):
        if not self.anchors:
            return []
        return [LossTerm("ewc", self.options.ewc_lambda / 2, self._layer_penalty, option="ewc_lambda")]

    def _layer_penalty(self, f) -> torch.Tensor:
        total = f.A.new_zeros(())
        for fisher, anchor in self.anchors:
            F, star = fisher[f.layer], anchor[f.layer]
            total = total + (F["A"].to(f.A) * (f.A - star["A"].to(f.A)) ** 2).sum()
            total = total + (F["B"].to(f.B) * (f.B - star["B"].to(f.B)) ** 2).sum()
        return total

    # ---------------------------------------------------------------- the Fisher, after each task
    def fisher_examples(self, ctx, k: int) -> list:
        train = list(ctx.tasks[k].train)
        n = min(self.options.ewc_samples, len(train))
        rng = random.Random(f"{self.config.seed}/ewc/{ctx.tasks[k].name}")
        return [train[i] for i in sorted(rng.sample(range(len(train)), n))]

    def fisher(self, ctx, k: int) -> Factors:
        factors = ctx.adapters.factors(ctx.adapters.current)
        params = {f"{f.layer}\0{side}": t for f in factors for side, t in (("A", f.A), ("B", f.B))}
        examples = self.fisher_examples(ctx, k)
        sums, n = per_example_squared_gradients(ctx, examples, params, labels=self.options.ewc_fisher)
        fisher: Factors = {}
        for key, total in sums.items():
            layer, side = key.split("\0")
            fisher.setdefault(layer, {})[side] = (total / n).cpu()
        if self.options.ewc_normalize == "mean":
            mean = torch.cat([t.reshape(-1) for sides in fisher.values() for t in sides.values()]).mean()
            if mean > 0:
                fisher = {layer: {s: t / mean for s, t in sides.items()} for layer, sides in fisher.items()}
        return fisher

    def after_task(self, k, ctx):
        if k == len(ctx.tasks) - 1:
            return  # no later task to protect this one from
        fisher = self.fisher(ctx, k)
        anchor = {f.layer: {"A": f.A.detach().cpu().clone(), "B": f.B.detach().cpu().clone()}
                  for f in ctx.adapters.factors(ctx.adapters.current)}
        if self.options.ewc_mode == "separate" or not self.anchors:
            self.anchors.append((fisher, anchor))
            return
        gamma = self.options.ewc_gamma
        old, _ = self.anchors[0]
        accumulated = {layer: {s: gamma * old[layer][s] + t for s, t in sides.items()}
                       for layer, sides in fisher.items()}
        self.anchors = [(accumulated, anchor)]

    # ---------------------------------------------------------------- state
    def state_dict(self):
        return {"anchors": [{"fisher": f, "anchor": a} for f, a in self.anchors]}

    def load_state_dict(self, state):
        self.anchors = [(entry["fisher"], entry["anchor"]) for entry in state["anchors"]]
