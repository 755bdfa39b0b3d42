"""One interface over the three model kinds: how a batch of examples is encoded, what the training loss is, and
how a prediction is made.

- seq2seq (T5): the label text is the decoder target; prediction by greedy generation.
- free-text examples (nlora.tasks.loading), seq2seq and decoder: the answer tokenized on its own after the prompt (which
  holds any separator), loss on the answer tokens; generated as a `Generation` says (greedy or sampled, a number
  of new tokens per task); encoders cannot generate them.
- decoder (LLaMA): prompt + label + eos, loss on the answer tokens only; prediction by greedy generation. In the
  reference prompt format, as its code: "Answer:{label}" without a space, and the prediction read off the
  decoded prompt + generation after its last "Answer:" (nothing where truncation cut the answer cue).
- encoder (BERT): prompt and each label option are embedded by the same encoder (mean pooling), scored by scaled
  cosine similarity and trained with cross-entropy over the task's options; the head has no weights of its own,
  so all task learning stays in the LoRA adapters. Prediction is the best-scoring option.

Evaluation modes (`eval_mode`) of seq2seq and decoder models:
- generate (default, the papers' protocol): greedy generation; the text is compared with the label.
- score: each label option is scored by the summed log-likelihood of its tokens, end-of-sequence included, given
  the prompt: log P(option, then stop | prompt), the probability of generating exactly that option. Not length
  normalised, so a longer option is not favoured for having confident continuation tokens. The prompt is encoded
  once per batch (seq2seq: the encoder states; decoder: the key/value cache, which each option slot extends and
  then crops back, never copied) and each option slot is one batched pass over the option tokens only. The
  prediction is always one of the options.
The encoder objective always scores its options with its similarity head, so both modes are the same for it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from .errors import NloraError
from .tasks.data import Example
from .tasks.prompts import prompt_token_ids, reference_decoder_prediction, reference_decoder_training_ids

IGNORE = -100
EVAL_MODES = ("generate", "score")


@dataclass(frozen=True)
class Generation:
    """How the answers of free-text examples are generated: at most `max_new_tokens` tokens, greedily, or sampled
    at `temperature` (TRACE's inference) from a generator seeded with `seed` (the caller seeds each batch)."""
    max_new_tokens: int
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0

    def keywords(self) -> dict[str, Any]:
        if self.sample:
            return {"do_sample": True, "temperature": self.temperature, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens}


@dataclass
class StepOutputs:
    """One training forward: the task loss (the mean over the batch's loss items) and, for a method's own loss,
    the logits that produced each item. Items are answer tokens (seq2seq, decoder: logits over the vocabulary,
    targets the gold tokens) or examples (encoder: scores over the batch's option texts, -inf off the example's
    options). `item_logits` is formed on first use, so a run that never reads it pays nothing."""
    loss: torch.Tensor
    logits: torch.Tensor  # (batch, positions, classes)
    labels: torch.Tensor  # (batch, positions), IGNORE where no item

    @property
    def item_mask(self) -> torch.Tensor:
        return self.labels != IGNORE

    @property
    def item_logits(self) -> torch.Tensor:
        """(items, classes), in row-major order of the batch's positions."""
        return self.logits[self.item_mask]

    @property
    def item_targets(self) -> torch.Tensor:
        return self.labels[self.item_mask]

    @property
    def items(self) -> int:
        return int(self.item_mask.sum())


class Objective:
    """How a base model of one kind (seq2seq, decoder, encoder) trains and predicts: `collate(examples)` makes a
    batch, `forward(model, batch)` the training forward's StepOutputs, `count_terms(batch)` the batch's loss items
    (answer tokens, or examples for encoders)."""
    kind: str

    def __init__(self, tokenizer, max_source_length: int = 256, max_target_length: int = 16,
                 eval_mode: str = "generate"):
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.eval_mode = eval_mode

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        raise NotImplementedError

    def prompt_ids(self, example: Example) -> list[int]:
        """The example's prompt tokens, cut to max_source_length as its prompt format cuts (nlora.tasks.prompts)."""
        return prompt_token_ids(self.tokenizer, example.prompt, example.sentence, example.prompt_format,
                                self.max_source_length, self.kind, example.task)

    def encode_prompts(self, examples: list[Example]):
        """input_ids and attention_mask of the prompts, padded on the tokenizer's side."""
        return self.tokenizer.pad({"input_ids": [self.prompt_ids(e) for e in examples]}, return_tensors="pt")

    def forward(self, model, batch: dict[str, Any]) -> StepOutputs:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        return self.forward(model, batch).loss

    def input_mask(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """The attention mask of the token sequence `forward` feeds the model (a pass reading layer inputs
        drops the padding with it)."""
        return batch["attention_mask"]

    def answer_mask(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The real positions of the answer side `forward` feeds the model besides the prompts, or None: a seq2seq
        decoder's own sequence; the option texts, which the encoder objective feeds in a second model call."""
        return None

    def answer_repeats(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """How many of the batch's examples each answer-side sequence stands for (None: one each); a pass that
        sums over layer inputs counts each sequence that often, as batches of one example would."""
        return None

    def count_terms(self, batch: dict[str, Any]) -> int:
        """How many terms `loss` averages over for this batch (training normalises by the count of a whole
        optimizer step, so that any split of the step across processes or micro-batches gives the same gradient)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model, examples: list[Example], device, generation: Generation | None = None) -> list[str]:
        """Predictions of a batch of one task's examples: free-text examples are generated as `generation` says
        (default: greedily, max_target_length tokens); classification examples as the eval mode says."""
        if examples and examples[0].free_text:
            return self.generate_text(model, examples, device, generation or Generation(self.max_target_length))
        if self.eval_mode == "score":
            return self.predict_by_score(model, examples, device)
        return self.generate(model, examples, device)

    @torch.no_grad()
    def generate(self, model, examples: list[Example], device) -> list[str]:
        raise NotImplementedError

    @torch.no_grad()
    def generate_text(self, model, examples: list[Example], device, generation: Generation) -> list[str]:
        """The free-text answers generated after the prompts, each stripped of surrounding whitespace."""
        raise NloraError(f"a {self.kind} model cannot generate the free-text answers of task "
                         f"'{examples[0].task}'; use a seq2seq or decoder model")

    @torch.no_grad()
    def option_log_likelihoods(self, model, examples: list[Example], device) -> list[list[float]]:
        """log P(option | prompt) of each example's options, in the order of `example.options`."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_by_score(self, model, examples: list[Example], device) -> list[str]:
        scores = self.option_log_likelihoods(model, examples, device)
        return [e.options[max(range(len(s)), key=s.__getitem__)] for e, s in zip(examples, scores)]


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """A collated batch with its tensors on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over positions where `mask` is set of log softmax(logits)[target]: (N, T, V), (N, T), (N, T) -> (N,)."""
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def forward_parameters(model) -> set[str]:
    """The keywords the transformers model under `model`'s wrappers (DDP, peft) accepts."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def cache_keyword(model) -> str:
    """The forward() keyword of the key/value cache: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def align_right(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rotate each row so that its tokens (where `mask` is set, one contiguous run) end at the last column:
    right padding becomes left padding. Returns the rotated mask, then each of `tensors` rotated alike."""
    width = mask.shape[1]
    ends = width - torch.where(mask.bool(), torch.arange(width, device=mask.device), -1).amax(-1) - 1
    index = (torch.arange(width, device=mask.device) - ends[:, None]) % width
    return tuple(t.gather(1, index) for t in (mask, *tensors))


def crop_cache(cache, tokens: int) -> bool:
    """Drop the last `tokens` positions of a key/value cache in place; False where the cache cannot (a sliding
    window already full), and then the caller rebuilds it. A negative count means "remove this many" both in
    transformers 4.x (`crop(max_length)`) and 5.x (`crop(tokens_to_remove)`)."""
    try:
        cache.crop(-tokens)
    except (AttributeError, RuntimeError, ValueError, NotImplementedError):
        return False
    return True


def option_slots(examples: list[Example]) -> range:
    return range(max(len(e.options) for e in examples))


def option_at(example: Example, slot: int) -> str:
    """The example's option in `slot`; examples with fewer options repeat their first (scored, then ignored)."""
    return example.options[slot] if slot < len(example.options) else example.options[0]


def collect_scores(examples: list[Example], per_slot: list[list[float]]) -> list[list[float]]:
    return [[per_slot[s][i] for s in range(len(e.options))] for i, e in enumerate(examples)]


class Seq2SeqObjective(Objective):
    kind = "seq2seq"

    def collate(self, examples):
        enc = self.encode_prompts(examples)
        tgt = self.tokenizer(text_target=[e.label for e in examples], max_length=self.max_target_length,
                             truncation=True, padding=True, return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, IGNORE)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    def forward(self, model, batch):
        out = model(**batch)
        return StepOutputs(out.loss, out.logits, batch["labels"])

    def count_terms(self, batch):
        return int((batch["labels"] != IGNORE).sum())

    def answer_mask(self, batch):
        # decoder position i reads label i-1 (or the start token) and predicts label i: real while label i is
        return batch["labels"] != IGNORE

    @torch.no_grad()
    def option_log_likelihoods(self, model, examples, device):
        enc = self.encode_prompts(examples).to(device)
        encoded = model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        encoded = BaseModelOutput(last_hidden_state=encoded.last_hidden_state)
        per_slot = []
        for slot in option_slots(examples):
            tgt = self.tokenizer(text_target=[option_at(e, slot) for e in examples],
                                 max_length=self.max_target_length, truncation=True, padding=True,
                                 return_tensors="pt").to(device)
            labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, IGNORE)
            logits = model(encoder_outputs=encoded, attention_mask=enc["attention_mask"], labels=labels,
                           use_cache=False).logits
            per_slot.append(token_log_likelihood(logits, labels, tgt["attention_mask"]).tolist())
        return collect_scores(examples, per_slot)

    @torch.no_grad()
    def generate(self, model, examples, device):
        enc = self.encode_prompts(examples).to(device)
        out = model.generate(**enc, max_new_tokens=self.max_target_length, do_sample=False, num_beams=1)
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_text(self, model, examples, device, generation):
        enc = self.encode_prompts(examples).to(device)
        out = model.generate(**enc, **generation.keywords())
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class DecoderObjective(Objective):
    kind = "decoder"

    def _answer_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return ids[: self.max_target_length] + [self.tokenizer.eos_token_id]

    def _free_answer_ids(self, text: str) -> list[int]:
        """A free-text answer tokenized on its own (its prompt holds whatever separates the two), then EOS."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return ids[: self.max_target_length] + [self.tokenizer.eos_token_id]

    def training_ids(self, example: Example) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of a training example. nlora's format: the answer " {label}" tokenized on its
        own; the reference format: prompt and label as one text, "Answer:{label}", as its collator builds it; a
        free-text answer: tokenized on its own, with no space added (TRACE's BOS + prompt + answer + EOS)."""
        if example.free_text:
            return self.prompt_ids(example), self._free_answer_ids(example.label)
        if example.prompt_format == "reference":
            return reference_decoder_training_ids(self.tokenizer, example.prompt, example.label,
                                                  self.max_source_length, self.max_target_length)
        return self.prompt_ids(example), self._answer_ids(example.label)

    def option_ids(self, example: Example, option: str) -> list[int]:
        """An option's tokens after the example's prompt, as training tokenizes a label there."""
        if example.prompt_format == "reference":
            return reference_decoder_training_ids(self.tokenizer, example.prompt, option, self.max_source_length,
                                                  self.max_target_length)[1]
        return self._answer_ids(option)

    def collate(self, examples):
        pad = self.tokenizer.pad_token_id
        seqs, labels = [], []
        for e in examples:
            p, a = self.training_ids(e)
            seqs.append(p + a)
            labels.append([IGNORE] * len(p) + a)
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        label_ids = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            label_ids[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}

    def forward(self, model, batch):
        """Mean cross-entropy of the answer tokens. The LM head runs only over the last columns that hold answer
        tokens (rows aligned to end together), so the logits grow with the answer, not with the prompt: a
        128k-vocabulary model would otherwise materialise batch x sequence x vocabulary floats, and upcast them."""
        if "logits_to_keep" not in forward_parameters(model):  # full logits: models without the keyword
            out = model(**batch)
            return StepOutputs(out.loss, out.logits[:, :-1], batch["labels"][:, 1:])
        mask, input_ids, labels = align_right(batch["attention_mask"], batch["input_ids"], batch["labels"])
        width = labels.shape[1]
        has_label = (labels != IGNORE).any(0)
        span = width - int(has_label.float().argmax()) if has_label.any() else 1
        # Positions count real tokens only, as the right-padded batch had them, so values do not change.
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                    logits_to_keep=span + 1, use_cache=False)
        logits = out.logits[:, :-1]  # column t predicts token t + 1
        targets = labels[:, width - span:]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        return StepOutputs(loss, logits, targets)

    def count_terms(self, batch):
        return int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels: token t predicts t+1

    def input_mask(self, model, batch):
        if "logits_to_keep" not in forward_parameters(model):
            return batch["attention_mask"]
        return align_right(batch["attention_mask"])[0]  # forward feeds the rows aligned to end together

    def _left_padded_prompts(self, examples) -> tuple[torch.Tensor, torch.Tensor, int]:
        prompts = [self.prompt_ids(e) for e in examples]
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, so every answer starts at column `width`
            input_ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return input_ids, mask, width

    @torch.no_grad()
    def option_log_likelihoods(self, model, examples, device):
        input_ids, mask, width = self._left_padded_prompts(examples)
        input_ids, mask = input_ids.to(device), mask.to(device)
        cache_kw = cache_keyword(model)
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}

        def encode_prompts():
            # Positions count real tokens only, as in generation, so padding changes no score.
            out = model(input_ids=input_ids, attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, **last_only)
            return out["cache"] if "cache" in out else out["past_key_values"], out.logits[:, -1:]

        prompt_cache, first_logits = encode_prompts()
        lengths = mask.sum(-1, keepdim=True)
        per_slot = []
        for slot in option_slots(examples):
            answers = [self.option_ids(e, option_at(e, slot)) for e in examples]
            steps = max(map(len, answers))
            answer_ids = torch.full((len(answers), steps), self.tokenizer.pad_token_id, dtype=torch.long)
            answer_mask = torch.zeros((len(answers), steps), dtype=torch.long)
            for i, a in enumerate(answers):
                answer_ids[i, : len(a)] = torch.tensor(a)
                answer_mask[i, : len(a)] = 1
            answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
            # The pass appends the option's keys and values to the prompt cache; cropping them afterwards gives
            # the next slot the prompt cache back without copying it.
            cont = model(input_ids=answer_ids, attention_mask=torch.cat([mask, answer_mask], -1),
                         position_ids=lengths + torch.arange(steps, device=device),
                         use_cache=True, **{cache_kw: prompt_cache})
            if not crop_cache(prompt_cache, steps):
                prompt_cache, _ = encode_prompts()
            # The first answer token is predicted by the prompt's last position, token t by answer token t-1.
            logits = torch.cat([first_logits, cont.logits[:, :-1]], 1)
            per_slot.append(token_log_likelihood(logits, answer_ids, answer_mask).tolist())
        return collect_scores(examples, per_slot)

    @torch.no_grad()
    def generate(self, model, examples, device):
        input_ids, mask, width = self._left_padded_prompts(examples)
        pad = self.tokenizer.pad_token_id
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=self.max_target_length + 1, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id)
        # one step more than max_target_length leaves room for the eos; the answer itself is cut there
        answers = out[:, width: width + self.max_target_length]
        predictions = [s.strip() for s in self.tokenizer.batch_decode(answers, skip_special_tokens=True)]
        for i, e in enumerate(examples):
            if e.prompt_format == "reference":  # the reference reads the answer off prompt + generation
                start = width - int(mask[i].sum())
                text = self.tokenizer.decode(out[i, start: width + self.max_target_length], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=True)
                predictions[i] = reference_decoder_prediction(text)
        return predictions

    @torch.no_grad()
    def generate_text(self, model, examples, device, generation):
        input_ids, mask, width = self._left_padded_prompts(examples)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                             **generation.keywords())
        return [s.strip() for s in self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


class EncoderScoringObjective(Objective):
    kind = "encoder"
    scale = 20.0  # fixed inverse temperature of the cosine scores (no trainable head)

    def _embed(self, model, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def collate(self, examples):
        enc = self.encode_prompts(examples)
        texts = sorted({o for e in examples for o in e.options})
        index = {t: i for i, t in enumerate(texts)}
        opt = self.tokenizer(texts, max_length=self.max_target_length, truncation=True, padding=True,
                             return_tensors="pt")
        allowed = torch.zeros((len(examples), len(texts)), dtype=torch.bool)
        for i, e in enumerate(examples):
            allowed[i, [index[o] for o in e.options]] = True
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "option_input_ids": opt["input_ids"], "option_attention_mask": opt["attention_mask"],
                # a label outside the options (kept by the label policy) is never a target: ignored by the loss
                "allowed": allowed, "target": torch.tensor([index.get(e.label, IGNORE) for e in examples]),
                "option_texts": texts}

    def scores(self, model, batch) -> torch.Tensor:
        prompts = self._embed(model, batch)
        options = self._embed(model, {"input_ids": batch["option_input_ids"],
                                      "attention_mask": batch["option_attention_mask"]})
        logits = self.scale * prompts @ options.T
        return logits.masked_fill(~batch["allowed"], float("-inf"))

    def forward(self, model, batch):
        scores = self.scores(model, batch)
        if not (batch["target"] != IGNORE).any():  # every label outside the options: nothing to learn
            loss = scores.masked_fill(torch.isinf(scores), 0).sum() * 0
        else:
            loss = F.cross_entropy(scores, batch["target"])
        return StepOutputs(loss, scores.unsqueeze(1), batch["target"].unsqueeze(1))

    def count_terms(self, batch):
        return int((batch["target"] != IGNORE).sum())

    def answer_mask(self, batch):
        return batch["option_attention_mask"]

    def answer_repeats(self, batch):
        return batch["allowed"].sum(0)  # each option text is embedded once for every example that lists it

    @torch.no_grad()
    def option_log_likelihoods(self, model, examples, device):
        """Log-softmax of the similarity scores over each example's options."""
        batch = to_device(self.collate(examples), device)
        logp = self.scores(model, batch).log_softmax(-1)
        index = {t: i for i, t in enumerate(batch["option_texts"])}
        return [[logp[i, index[o]].item() for o in e.options] for i, e in enumerate(examples)]

    @torch.no_grad()
    def predict(self, model, examples, device, generation=None):  # both eval modes: the head is the only predictor
        if examples and examples[0].free_text:
            return self.generate_text(model, examples, device, generation)
        batch = to_device(self.collate(examples), device)
        best = self.scores(model, batch).argmax(-1).tolist()
        return [batch["option_texts"][i] for i in best]


OBJECTIVES = {o.kind: o for o in (Seq2SeqObjective, DecoderObjective, EncoderScoringObjective)}


def make_objective(kind: str, tokenizer, max_source_length: int, max_target_length: int,
                   eval_mode: str = "generate") -> Objective:
    return OBJECTIVES[kind](tokenizer, max_source_length, max_target_length, eval_mode)
