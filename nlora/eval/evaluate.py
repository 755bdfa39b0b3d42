"""Evaluation of one task's test examples: batched predictions (the objective's eval_mode: greedy generation, or
the label option of highest log-likelihood; encoders always pick the best-scoring option; free-text answers are
generated greedily or sampled, nlora.objectives.Generation) scored with the task's metric on 0-100
(nlora.tasks.scoring). A classification task's metric is exact match after the reference code's normalisation (case,
punctuation, whitespace: `metrics.normalize_answer`), in percent. With several processes, each predicts a shard
and the predictions are gathered (sampled decoding: in whole batches, so that the draws do not depend on the
process count).

A prediction record keeps what scoring needs, so that `nlora rescore` recomputes any metric from the predictions
files alone (`score_records`, the one scoring path of evaluation and rescoring):
- classification: input (the prompt), target, prediction, correct (exact match), and score where the task's
  metric is another;
- free text: input (the prompt), source (the raw input, SARI's source), target, references (where an example
  has several acceptable answers), prediction (the generated text, stripped of surrounding whitespace), score.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..faults import fault_point
from ..objectives import Generation, Objective
from ..tasks.data import Example
from ..tasks.scoring import example_scores
from ..train.engine import evaluation_split, gathered_root
from .continual import normalize_answer

CLASSIFICATION_METRIC = "exact_match"


@dataclass(frozen=True)
class Scoring:
    """How a task's predictions are scored: its metric (a nlora.tasks.scoring spec), the scoring mode, and the
    separator that prompt style nlora put after a TRACE prompt (removed again where trace_reference mode scores
    against TRACE's own prompt)."""
    metric: str = CLASSIFICATION_METRIC
    mode: str = "standard"
    separator: str = ""


def scoring_of(config, task) -> Scoring:
    """The scoring of a run's task."""
    separator = config.answer_separator if config.prompt_style == "nlora" and task.family == "trace" else ""
    return Scoring(task.metric, config.scoring_mode, separator)


def generation_of(config, task, j: int, phase: int) -> Generation | None:
    """How a run generates task j's answers after phase `phase` (-1: the base model): None for classification.
    Sampling is seeded from the run's seed, the phase and the task, so a resumed run samples the same."""
    if task.kind != "free_text":
        return None
    seed = zlib.crc32(f"{config.seed}/{phase}/{task.name}".encode())
    return Generation(config.max_new_tokens_of(j), config.decoding == "sample", config.temperature, seed)


def eval_batches(prompt_lengths: list[int], batch_size: int, rank: int, world: int,
                 whole: bool = False) -> list[list[int]]:
    """The example indices this process predicts, batch by batch. `batch_size` is global (as the training batch):
    each process predicts its share of it, ceil(batch_size / world) examples, at once; with `whole`, whole global
    batches (sampled decoding: a batch's draws depend on all its examples, so its examples must not depend on the
    process count). Batches of similar length waste less padding (records go back to input order afterwards);
    processes take whole local batches in turn, so a batch's padding does not depend on the process that
    predicts it."""
    local_size = batch_size if whole else -(-batch_size // world)
    order = sorted(range(len(prompt_lengths)), key=prompt_lengths.__getitem__)
    return [order[s: s + local_size] for s in range(0, len(order), local_size)][rank::world]


@contextlib.contextmanager
def _seeded(generation: Generation | None, idx: list[int], device):
    """Sampled decoding draws from a generator seeded per batch (by its first example), without disturbing the
    random state that training goes on with."""
    if generation is None or not generation.sample:
        yield
        return
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        torch.manual_seed(generation.seed + min(idx))
        yield


def _predict(objective: Objective, model, batch: list[Example], device, generation: Generation | None) -> list[str]:
    if generation is None:  # classification: the objective's own eval mode
        return objective.predict(model, batch, device)
    return objective.predict(model, batch, device, generation)


@torch.no_grad()
def evaluate(objective: Objective, model, examples: list[Example], batch_size: int, accelerator=None,
             desc: str = "eval", progress: bool = True, scoring: Scoring | None = None,
             generation: Generation | None = None) -> tuple[float, list[dict]]:
    """Returns (the task's score on 0-100, one record per example in input order). `scoring` defaults to exact
    match; `generation` (free-text tasks) to greedy decoding of max_target_length tokens."""
    model.eval()
    rank, world = evaluation_split(model, accelerator)
    device = accelerator.device if accelerator else next(model.parameters()).device
    if generation is None and examples and examples[0].free_text:
        generation = Generation(objective.max_target_length)
    sampled = generation is not None and generation.sample
    batches = eval_batches([len(e.prompt) for e in examples], batch_size, rank, world, whole=sampled)
    local: list[tuple[int, str]] = []
    # Under the training's autocast (mixed_precision), so that evaluation sees the model training saw.
    precision = accelerator.autocast if accelerator else contextlib.nullcontext
    with gathered_root(model):
        for idx in tqdm(batches, desc=desc, disable=not progress or rank != 0, leave=False, dynamic_ncols=True):
            with precision(), _seeded(generation, idx, device):
                local.extend(zip(idx, _predict(objective, model, [examples[i] for i in idx], device, generation)))
            fault_point("eval_batch")
    predictions = dict(gather_object(local) if world > 1 else local)
    records = [example_record(e, predictions[i]) for i, e in enumerate(examples)]
    return score_records(records, scoring or Scoring()), records


def example_record(example: Example, prediction: str) -> dict:
    if not example.free_text:
        return {"input": example.prompt, "target": example.label, "prediction": prediction}
    record = {"input": example.prompt, "source": example.sentence, "target": example.label}
    if example.references:
        record["references"] = list(example.references)
    record["prediction"] = prediction
    return record


def trace_prompt(text: str, separator: str) -> str:
    """The prompt as TRACE's data gives it: a record's input without the separator prompt style nlora added."""
    return text[: -len(separator)] if separator and text.endswith(separator) else text


def score_records(records: list[dict], scoring: Scoring) -> float:
    """Score every record (in place: "correct" of classification records, "score" where the metric is not exact
    match on classification) and return the task's score, the mean on 0-100 (0 for no records)."""
    classification = all("source" not in r for r in records)
    if classification:
        for r in records:
            r["correct"] = normalize_answer(r["prediction"]) == normalize_answer(r["target"])
    if classification and scoring.metric == CLASSIFICATION_METRIC:
        return 100.0 * sum(r["correct"] for r in records) / max(len(records), 1)
    if not records:
        return 0.0
    values = example_scores(scoring.metric, [r["prediction"] for r in records],
                            [r.get("references") or [r["target"]] for r in records],
                            sources=[r.get("source", r["input"]) for r in records],
                            prompts=[trace_prompt(r["input"], scoring.separator) for r in records],
                            mode=scoring.mode)
    for r, value in zip(records, values):
        r["score"] = value
    return sum(values) / len(values)
