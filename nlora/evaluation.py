"""Evaluation of one task's test examples: batched predictions (the objective's eval_mode: greedy generation, or
the label option of highest log-likelihood; encoders always pick the best-scoring option) scored by exact match
after the reference code's normalisation (case, punctuation, whitespace: `metrics.normalize_answer`), in percent.
With several processes, each predicts a shard and the predictions are gathered."""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .data import Example
from .engine import evaluation_split
from .faults import fault_point
from .metrics import normalize_answer
from .objectives import Objective


def eval_batches(prompt_lengths: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """The example indices this process predicts, batch by batch. `batch_size` is global (as the training batch):
    each process predicts its share of it, ceil(batch_size / world) examples, at once. Batches of similar length
    waste less padding (records go back to input order afterwards); processes take whole local batches in turn,
    so a batch's padding does not depend on the process that predicts it."""
    local_size = -(-batch_size // world)
    order = sorted(range(len(prompt_lengths)), key=prompt_lengths.__getitem__)
    return [order[s: s + local_size] for s in range(0, len(order), local_size)][rank::world]


@torch.no_grad()
def evaluate(objective: Objective, model, examples: list[Example], batch_size: int, accelerator=None,
             desc: str = "eval", progress: bool = True) -> tuple[float, list[dict]]:
    """Returns (accuracy in percent, one record per example in input order)."""
    model.eval()
    rank, world = evaluation_split(model, accelerator)
    device = accelerator.device if accelerator else next(model.parameters()).device
    batches = eval_batches([len(e.prompt) for e in examples], batch_size, rank, world)
    local: list[tuple[int, str]] = []
    # Under the training's autocast (mixed_precision), so that evaluation sees the model training saw.
    precision = accelerator.autocast if accelerator else contextlib.nullcontext
    for idx in tqdm(batches, desc=desc, disable=not progress or rank != 0, leave=False, dynamic_ncols=True):
        with precision():
            local.extend(zip(idx, objective.predict(model, [examples[i] for i in idx], device)))
        fault_point("eval_batch")
    predictions = dict(gather_object(local) if world > 1 else local)
    records = []
    for i, e in enumerate(examples):
        correct = normalize_answer(predictions[i]) == normalize_answer(e.label)
        records.append({"input": e.prompt, "target": e.label, "prediction": predictions[i], "correct": correct})
    accuracy = 100.0 * sum(r["correct"] for r in records) / max(len(records), 1)
    return accuracy, records
