"""Extra passes a method runs besides training, built on the same batching and process split as the engine:

- `my_share(examples, ctx)`: this process's part of a list of examples (all of it under FSDP2 sharding, where every
  forward is a collective that every process must run);
- `sum_over_processes(tensors, ctx)`: sums a per-process partial result in place, so a pass over the split data
  equals the one-process pass;
- `per_example_squared_gradients`: Σ_i (∂ log p(y_i|x_i)/∂θ)² with one example per backward (the diagonal Fisher's
  numerator: squares of batch-mean gradients would mix examples and shrink it by about the batch size);
- `loss_gradients(ctx, examples, params)`: the gradient of the task loss on given examples (a replay memory's
  reference gradient), and `task_loss_gradients(ctx, params)` the same on the step being trained: the task loss
  alone, without the regularisers and the method's own loss that the trained gradients hold;
- `auxiliary_outputs(ctx, names, batch)`: the objective's outputs with another set of adapters active (a teacher),
  on the same model, no copy, no gradient, dropout off;
- `rng_state(device)` and `same_dropout_outputs(ctx, names, batch, state)`: the same, dropout as in training, with
  the dropout masks of the forward that started at `state` (the training forward's own masks);
- `layer_inputs(ctx, examples, layers, fn)`: a no-grad pass that hands each adapted layer's input to `fn`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..objectives import IGNORE, StepOutputs, to_device
from ..train.engine import evaluation_split


def my_share(examples: list, ctx) -> list:
    """This process's part of `examples` in a pass split over the processes (all of them under FSDP2)."""
    rank, world = evaluation_split(ctx.adapters.model, ctx.accelerator)
    return examples[rank::world]


def splits_work(ctx) -> bool:
    return evaluation_split(ctx.adapters.model, ctx.accelerator)[1] > 1


def sum_over_processes(tensors: list[torch.Tensor], ctx) -> None:
    """Sum each tensor across the processes that split the work (in place, one collective)."""
    if not tensors or not splits_work(ctx):
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off inside the block; the model's train/eval state back after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def auxiliary_outputs(ctx, names: list[str], batch: dict) -> StepOutputs:
    """The objective's outputs on `batch` with adapters `names` active instead of the trained set: no copy of the
    model, no gradient, dropout off (a teacher's or a stable adapter's view)."""
    with torch.no_grad(), ctx.adapters.using(names) as model, eval_mode(model):
        return ctx.objective.forward(model, batch)


def rng_state(device: torch.device) -> dict:
    """The random state a forward draws its dropout masks from (the CPU's, and the device's on CUDA)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def same_dropout_outputs(ctx, names: list[str], batch: dict, state: dict) -> StepOutputs:
    """The objective's outputs on `batch` with adapters `names` active instead, no gradient, the model in its
    current mode, drawing its dropout masks from `state` (`rng_state` taken as the training forward began): the
    masks of that forward, since the same modules draw in the same order (an adapter's LoRA dropout as the trained
    one's). The random state is left as it was."""
    cuda = state["cuda"] is not None
    with torch.no_grad(), ctx.adapters.using(names) as model, \
            torch.random.fork_rng(devices=[ctx.device] if cuda else []):
        torch.set_rng_state(state["cpu"])
        if cuda:
            torch.cuda.set_rng_state(state["cuda"], ctx.device)
        return ctx.objective.forward(model, batch)


def sequence_log_likelihood(ctx, model, example, labels: str = "gold") -> torch.Tensor:
    """log p(y|x) of one example, summed over its loss items. `labels`: "gold" (the empirical Fisher's), or
    "sampled": each item's target drawn from the model's own predictive distribution at that position (teacher
    forcing on the gold prefix: the true Fisher's sampling, per position)."""
    batch = to_device(ctx.objective.collate([example]), ctx.device)
    out = ctx.objective.forward(model, batch)
    logits, targets = out.item_logits.float(), out.item_targets
    if labels == "sampled":
        with torch.no_grad():
            finite = torch.isfinite(logits)  # encoder scores are -inf off the example's options
            probs = torch.where(finite, logits, torch.full_like(logits, -1e30)).softmax(-1)
            targets = torch.multinomial(probs, 1).squeeze(-1)
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked[targets != IGNORE].sum()


def per_example_squared_gradients(ctx, examples: list, params: dict[str, torch.Tensor], labels: str = "gold"
                                  ) -> tuple[dict[str, torch.Tensor], int]:
    """Σ_i (∂ log p(y_i|x_i)/∂θ)² over `examples` for each of `params`, one example per backward, summed over the
    processes; returns the sums and the example count (the Fisher is their quotient). Dropout off."""
    model = ctx.adapters.model
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    names, tensors = list(params), list(params.values())
    with eval_mode(model):
        for example in my_share(examples, ctx):
            log_likelihood = sequence_log_likelihood(ctx, model, example, labels)
            grads = torch.autograd.grad(log_likelihood, tensors, allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    sums[name] += g.detach().float() ** 2
    sum_over_processes(list(sums.values()), ctx)
    return sums, len(examples)


def loss_gradients(ctx, examples: list, params: dict[str, torch.Tensor], batch_size: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """The gradient, for each of `params` (tensors that require grad), of the task loss on `examples` as training
    defines it: the mean over all their loss items (answer tokens, or examples for encoders), at the current
    parameters, with dropout off and the adapters active as they are. Computed in batches of `batch_size` (the
    run's eval_batch_size) split over the processes and summed, so it is the same for any batch size and process
    count. Neither the parameters' `.grad` nor the optimizer is touched. A parameter the loss does not reach gets
    zeros."""
    model = ctx.adapters.model
    size = batch_size or ctx.config.eval_batch_size
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    names, tensors = list(params), list(params.values())
    items = ctx.objective.count_terms(ctx.objective.collate(list(examples))) if examples else 0
    with eval_mode(model):
        share = my_share(examples, ctx)
        for start in range(0, len(share), size):
            batch = ctx.objective.collate(share[start: start + size])
            weight = ctx.objective.count_terms(batch) / items  # this batch's part of the mean over every item
            loss = ctx.objective.forward(model, to_device(batch, ctx.device)).loss * weight
            for name, g in zip(names, torch.autograd.grad(loss, tensors, allow_unused=True)):
                if g is not None:
                    grads[name] += g.detach().float()
    sum_over_processes(list(grads.values()), ctx)
    return grads


def task_loss_gradients(ctx, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of the task loss alone on the optimizer step being trained (`ctx.step_examples`: every
    micro-batch's examples, of every process), at the parameters before the step: call it from
    `transform_gradients`. The gradients the loop hands that hook hold the task loss plus the loss terms and
    `batch_loss`; this is the first part only (see `loss_gradients`: dropout off)."""
    if not ctx.step_examples:
        raise RuntimeError("task_loss_gradients needs the step's examples: call it from transform_gradients")
    return loss_gradients(ctx, ctx.step_examples, params)


def layer_inputs(ctx, examples: list, layers: dict[str, torch.nn.Module],
                 fn: Callable[[str, torch.Tensor], None], batch_size: int | None = None) -> None:
    """Run `examples` through the model (no gradient, dropout off, the adapters active as they are) and call
    fn(layer_name, input) with each of `layers`' inputs, flattened to (tokens, d_in), padding positions excluded,
    so that each example contributes the same rows whatever batch it falls in:
      - the prompts' padding (Objective.input_mask) in the sequence fed to the model, and, in a seq2seq model, in
        its encoder and in what reads the encoder's output (cross-attention keys and values);
      - the answer side's (Objective.answer_mask) in the rest of a seq2seq decoder, and in the encoder objective's
        second model call (its option texts), whose rows are repeated as often as the batch's examples list them
        (Objective.answer_repeats)."""
    model = ctx.adapters.model
    size = batch_size or ctx.config.eval_batch_size
    handles = []
    current: dict[str, Any] = {}
    encoder = model.get_encoder() if ctx.objective.kind == "seq2seq" else None

    def rows(x):
        if encoder is not None:
            answer = not current.get("inside") and x is not current.get("encoded")
        else:
            answer = current["calls"] > 1
        mask = current["answer_mask"] if answer else current["mask"]
        if mask is None or x.dim() != 3 or x.shape[:2] != mask.shape:
            return x.reshape(-1, x.shape[-1])
        repeats = current["repeats"] if answer else None
        if repeats is None:
            return x[mask.bool()]
        return x[mask.bool()].repeat_interleave(repeats.unsqueeze(1).expand_as(mask)[mask.bool()], dim=0)

    def hook(name):
        def run(module, args):
            fn(name, rows(args[0]).detach())
        return run

    def count_call(module, args):
        current["calls"] += 1

    def enter_encoder(module, args):
        current["inside"] = True

    def leave_encoder(module, args, output):
        current["inside"] = False
        current["encoded"] = output[0]  # the tensor the decoder's cross-attention keys and values read

    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    handles.append(model.register_forward_pre_hook(count_call))
    if encoder is not None:
        handles += [encoder.register_forward_pre_hook(enter_encoder), encoder.register_forward_hook(leave_encoder)]
    try:
        with torch.no_grad(), eval_mode(model):
            share = my_share(examples, ctx)
            for start in range(0, len(share), size):
                batch = to_device(ctx.objective.collate(share[start: start + size]), ctx.device)
                current.clear()
                current.update(calls=0, mask=ctx.objective.input_mask(model, batch),
                               answer_mask=ctx.objective.answer_mask(batch),
                               repeats=ctx.objective.answer_repeats(batch))
                ctx.objective.forward(model, batch)
    finally:
        current.clear()
        for handle in handles:
            handle.remove()
