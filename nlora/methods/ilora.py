"""I-LoRA (Ren et al., "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning", arXiv
2402.18865): one plastic adapter θ_w trained through every task, a stable adapter θ_s that follows it as a moving
average, and replay from a buffer of earlier tasks' examples, with a one-sided consistency loss that keeps the
plastic adapter's hidden states from falling below the stable one's on the replayed examples.

- Moving average, after every optimizer step, on A and B: θ_s ← d·θ_s + (1 − d)·θ_w, `ilora_decay` d being the
  weight the stable adapter keeps (the official code's convention and value, 0.25; EasyCL multiplies the plastic
  adapter by it instead). θ_s starts as θ_w's initial value. It is method state, so it is in every mid-task
  checkpoint.
- Evaluated: the stable adapter, as in the paper (the official code saves and evaluates the plastic one). So
  adapters/<k>-<task>/ holds θ_s after task k, which `nlora predict` and `nlora export` use as they are; θ_w, which
  the next task continues to train, is in the method's state beside it.
- Buffer: a reservoir of `ilora_buffer` examples over the training examples of the tasks trained so far, each task
  read once in its stored order, the draws keyed by the seed and the task (the official buffer takes every batch,
  the current task's included, from a global numpy stream).
- Replay: task k > 0 trains on its examples plus round(ρ·n) examples drawn from the buffer (ρ = `ilora_replay`;
  passes over the shuffled buffer, keyed by the seed and the task). They join the task's examples, so the
  loss is the mean cross-entropy over the answer tokens of both, normalised like any batch (1 and N processes, any
  accumulation), and a batch holds about ρ/(1+ρ) of replayed examples; the paper's |b_M| = |b| is ρ = 1 with twice
  the batch size.
- Consistency, on the replayed examples of each batch: h_w, h_s = the output of every transformer block that holds
  an adapted layer, under θ_w (the training forward itself) and under θ_s (one more forward, no gradient, with
  dropout on as in the official code, and the training forward's own dropout masks, base and LoRA: so the term
  compares the adapters, not two dropout draws, and is 0 when θ_s = θ_w; with dropout off in one pass only, a
  base with dropout of its own, such as T5, gives a large term at θ_s = θ_w); c = mean over blocks, tokens
  (padding excluded where the block sees the prompt side; a seq2seq decoder's blocks see the answer) and
  features of (h_w − max(h_w, h_s))², zero wherever the plastic value is at least the stable one, no gradient
  into θ_s. Each replayed example adds λ·(1+ρ)/ρ·c per answer token, which in expectation over
  the batches gives the paper's ½(CE(b) + CE(b_M)) + λ·L_cons at ρ = 1.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from ..errors import NloraError
from ..objectives import IGNORE
from ..options import MethodOptions, option
from ..train.engine import transformer_blocks
from .base import Method
from .passes import rng_state, same_dropout_outputs
from .registry import register

STABLE = "stable"  # the PEFT adapter that holds θ_s while a task trains

Factors = dict[str, dict[str, torch.Tensor]]  # layer name -> {"A": tensor, "B": tensor}


@dataclass
class ILoRAOptions(MethodOptions):
    ilora_decay: float = option("weight the stable adapter keeps at each optimizer step: "
                                "stable <- d*stable + (1 - d)*plastic", default=0.25, minimum=0, maximum=1)
    ilora_lambda: float = option("weight of the one-sided consistency loss on the replayed examples",
                                 default=1.0, minimum=0)
    ilora_buffer: int = option("examples of earlier tasks kept in the reservoir buffer", default=500, minimum=1)
    ilora_replay: float = option("replayed examples per training example of the task", default=1.0, above=0)


def ema_step(stable: torch.Tensor, plastic: torch.Tensor, decay: float) -> None:
    """stable ← decay·stable + (1 − decay)·plastic, in place."""
    stable.mul_(decay).add_(plastic.to(stable), alpha=1 - decay)


def one_sided_consistency(plastic: torch.Tensor, stable: torch.Tensor, mask: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (rows, tokens, features) states: the sum of (h_w − max(h_w, h_s))² over the unmasked tokens and
    features, and the count of its terms. The stable states get no gradient."""
    gap = (stable.detach().float() - plastic.float()).clamp_min(0).pow(2).sum(-1)  # (rows, tokens)
    if mask is None:
        mask = torch.ones(gap.shape, device=gap.device)
    mask = mask.to(gap)
    return (gap * mask).sum(-1), mask.sum(-1) * plastic.shape[-1]


@register
class ILoRA(Method):
    name = "i-lora"
    description = ("one plastic adapter + a stable moving average of it (evaluated), replay of a reservoir buffer "
                   "and a one-sided hidden-state consistency to the stable adapter (I-LoRA)")
    Options = ILoRAOptions
    adapter_layout = "snapshot"
    smoke_options = {"ilora_buffer": 4, "ilora_decay": 0.5, "ilora_lambda": 10.0}

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.buffer: list[list[int]] = []  # [task index, example index] of each kept example
        self.seen = 0  # examples the reservoir has read
        self.plastic: Factors | None = None  # θ_w between tasks (the adapter folder then holds θ_s)
        self._stable_held: Factors | None = None  # θ_s of a state loaded before the model has its stable adapter
        self._adapters = None
        self._replayed: set[int] = set()  # ids of this phase's replayed examples
        self._hooks: list = []
        self._records: list[dict[int, torch.Tensor]] = []  # block outputs of each model call, while capturing
        self._rng_at_batch: dict | None = None  # the random state as the batch's training forward began
        self._stable_pass = False
        self._source_blocks: set[int] = set()  # blocks that see the prompt side of a seq2seq model

    def setup(self, ctx):
        self._adapters = ctx.adapters

    # ---------------------------------------------------------------- the stable adapter
    def _ensure_stable(self, adapters) -> None:
        if STABLE in adapters.peft_model.peft_config:
            return
        flags = {p: p.requires_grad for p in adapters.model.parameters()}
        with torch.random.fork_rng(devices=[]):  # its initial values are overwritten: leave the RNG as it was
            adapters.peft_model.add_adapter(STABLE, LoraConfig(**adapters.lora_config))
        for p, flag in flags.items():  # PEFT's add_adapter resets requires_grad of the existing adapters
            p.requires_grad_(flag)
        for f in adapters.factors(STABLE):
            f.A.requires_grad_(False)
            f.B.requires_grad_(False)

    @staticmethod
    def _read(adapters, name: str) -> Factors:
        return {f.layer: {"A": f.A.detach().cpu().clone(), "B": f.B.detach().cpu().clone()}
                for f in adapters.factors(name)}

    @staticmethod
    def _write(adapters, name: str, values: Factors) -> None:
        with torch.no_grad():
            for f in adapters.factors(name):
                f.A.copy_(values[f.layer]["A"])
                f.B.copy_(values[f.layer]["B"])

    def before_task(self, k, ctx):
        adapters = ctx.adapters
        self._ensure_stable(adapters)
        evaluated = self._read(adapters, adapters.current)  # θ_s after the last task (θ_w's start before task 0)
        if self.plastic is None and k > 0:
            raise NloraError(f"i-lora: task {k} starts without the plastic adapter of task {k - 1} in the "
                             "method state")
        self._write(adapters, STABLE, evaluated)
        if self.plastic is not None:  # the plastic adapter continues
            self._write(adapters, adapters.current, self.plastic)
            self.plastic = None
        if k > 0 and self.buffer and self.options.ilora_lambda > 0:
            self._capture(ctx)

    def after_step(self, k, ctx):
        adapters, decay = ctx.adapters, self.options.ilora_decay
        with torch.no_grad():
            for s, w in zip(adapters.factors(STABLE), adapters.factors(adapters.current)):
                ema_step(s.A, w.A, decay)
                ema_step(s.B, w.B, decay)

    def after_task(self, k, ctx):
        self._release()
        self._add_to_buffer(ctx.tasks, k)
        adapters = ctx.adapters
        # the saved (and evaluated) adapter is the stable one; the plastic one waits in the state
        self.plastic = self._read(adapters, adapters.current)
        self._write(adapters, adapters.current, self._read(adapters, STABLE))

    # ---------------------------------------------------------------- buffer and replay
    def _add_to_buffer(self, tasks, k: int) -> None:
        size = self.options.ilora_buffer
        rng = random.Random(f"{self.config.seed}/ilora/buffer/{tasks[k].name}")
        for i in range(len(tasks[k].train)):
            if self.seen < size:
                self.buffer.append([k, i])
            else:
                j = rng.randrange(self.seen + 1)
                if j < size:
                    self.buffer[j] = [k, i]
            self.seen += 1

    def replayed_examples(self, tasks, k: int) -> list:
        n = round(self.options.ilora_replay * len(tasks[k].train))
        if k == 0 or not self.buffer or n == 0:
            return []
        rng = random.Random(f"{self.config.seed}/ilora/replay/{tasks[k].name}")
        order: list[int] = []
        while len(order) < n:
            passes = list(range(len(self.buffer)))
            rng.shuffle(passes)
            order += passes
        # copies: each replayed example is its own object, so a batch's replayed rows are known by identity
        return [dataclasses.replace(tasks[t].train[i]) for t, i in (self.buffer[j] for j in order[:n])]

    def training_examples(self, tasks, k):
        replayed = self.replayed_examples(tasks, k)
        self._replayed = {id(e) for e in replayed}
        return list(tasks[k].train) + replayed

    # ---------------------------------------------------------------- the consistency loss
    def _capture(self, ctx) -> None:
        """Record each transformer block's output, per call of the model, until `_release`."""
        model = ctx.adapters.model.get_base_model()
        blocks = [b for b in transformer_blocks(model) if any(isinstance(m, LoraLayer) for m in b.modules())]
        encoder = model.get_encoder() if ctx.objective.kind == "seq2seq" else None
        inside = {id(m) for m in encoder.modules()} if encoder is not None else set()
        self._source_blocks = {i for i, b in enumerate(blocks) if id(b) in inside}
        self._records = []

        device = ctx.device

        def start(module, args, kwargs):
            if not self._records and not self._stable_pass:  # the training forward's first model call
                self._rng_at_batch = rng_state(device)
            self._records.append({})

        def record(i):
            def keep(module, args, output):
                if self._records:  # not in backward's recomputation, which comes after batch_loss
                    self._records[-1].setdefault(i, output[0] if isinstance(output, tuple) else output)
            return keep

        self._hooks = [model.register_forward_pre_hook(start, with_kwargs=True)]
        self._hooks += [b.register_forward_hook(record(i)) for i, b in enumerate(blocks)]

    def _release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._records = [], []

    def _masks(self, ctx, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the prompt side's token mask, the answer side's for a seq2seq decoder)."""
        source = ctx.objective.input_mask(ctx.adapters.model, batch)
        target = batch["labels"] != IGNORE if ctx.objective.kind == "seq2seq" else None
        return source, target

    def batch_loss(self, k, batch, out, ctx):
        if not self._hooks:
            return None
        plastic = self._records[0] if self._records else {}  # the first call: the batch's examples
        self._records = []
        self._stable_pass = True
        try:  # on every process: under sharding a forward is collective
            same_dropout_outputs(ctx, [STABLE], batch, self._rng_at_batch)
        finally:
            self._stable_pass = False
        stable = self._records[0] if self._records else {}
        self._records = []
        rows = [i for i, e in enumerate(ctx.examples) if id(e) in self._replayed]
        if not rows:
            return out.loss.new_zeros(())
        index = torch.tensor(rows, device=out.loss.device)
        source, target = self._masks(ctx, batch)
        total = torch.zeros(len(rows), device=out.loss.device)
        count = torch.zeros(len(rows), device=out.loss.device)
        for i, h_w in plastic.items():
            mask = target if (target is not None and i not in self._source_blocks) else source
            if mask.shape != h_w.shape[:2]:
                raise NloraError(f"i-lora: block {i}'s output {tuple(h_w.shape)} does not match the batch's "
                                 f"tokens {tuple(mask.shape)}")
            s, c = one_sided_consistency(h_w[index], stable[i][index], mask[index])
            total, count = total + s, count + c
        per_example = total / count.clamp_min(1)
        items = (out.labels[index] != IGNORE).sum(-1).to(per_example)
        rho = self.options.ilora_replay
        return self.options.ilora_lambda * (1 + rho) / rho * (items * per_example).sum()

    # ---------------------------------------------------------------- state
    def state_dict(self):
        state = {"buffer": [list(x) for x in self.buffer], "seen": self.seen}
        if self.plastic is not None:  # between tasks
            state["plastic"] = self.plastic
        elif self._adapters is not None and STABLE in (self._adapters.peft_model.peft_config or {}):
            state["stable"] = self._read(self._adapters, STABLE)  # in a task: the moving average
        elif self._stable_held is not None:
            state["stable"] = self._stable_held
        return state

    def load_state_dict(self, state):
        self.buffer = [list(x) for x in state["buffer"]]
        self.seen = int(state["seen"])
        self.plastic = state.get("plastic")
        stable = state.get("stable")
        if stable is not None and self._adapters is not None and STABLE in self._adapters.peft_model.peft_config:
            self._write(self._adapters, STABLE, stable)
        else:
            self._stable_held = stable
