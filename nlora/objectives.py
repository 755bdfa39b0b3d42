"""One interface over the three model kinds: how a batch of examples is encoded, what the training loss is, and
how a prediction is made.

- seq2seq (T5): the label text is the decoder target; prediction by greedy generation.
- decoder (LLaMA): prompt + label + eos, loss on the answer tokens only; prediction by greedy generation.
- encoder (BERT): prompt and each label option are embedded by the same encoder (mean pooling), scored by scaled
  cosine similarity and trained with cross-entropy over the task's options; the head has no weights of its own,
  so all task learning stays in the LoRA adapters. Prediction is the best-scoring option.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .data import Example

IGNORE = -100


class Objective:
    kind: str

    def __init__(self, tokenizer, max_source_length: int = 256, max_target_length: int = 16):
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model, examples: list[Example], device) -> list[str]:
        raise NotImplementedError


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Seq2SeqObjective(Objective):
    kind = "seq2seq"

    def collate(self, examples):
        enc = self.tokenizer([e.prompt for e in examples], max_length=self.max_source_length, truncation=True,
                             padding=True, return_tensors="pt")
        tgt = self.tokenizer(text_target=[e.label for e in examples], max_length=self.max_target_length,
                             truncation=True, padding=True, return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, IGNORE)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    def loss(self, model, batch):
        return model(**batch).loss

    @torch.no_grad()
    def predict(self, model, examples, device):
        enc = self.tokenizer([e.prompt for e in examples], max_length=self.max_source_length, truncation=True,
                             padding=True, return_tensors="pt").to(device)
        out = model.generate(**enc, max_new_tokens=self.max_target_length, do_sample=False, num_beams=1)
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class DecoderObjective(Objective):
    kind = "decoder"

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if ids and ids[-1] == self.tokenizer.eos_token_id:  # byte-level tokenizers append eos to every text
            ids = ids[:-1]
        return ids[-self.max_source_length:]  # keep the end: the answer cue must stay next to the answer

    def _answer_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return ids[: self.max_target_length] + [self.tokenizer.eos_token_id]

    def collate(self, examples):
        pad = self.tokenizer.pad_token_id
        seqs, labels = [], []
        for e in examples:
            p, a = self._prompt_ids(e.prompt), self._answer_ids(e.label)
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

    def loss(self, model, batch):
        return model(**batch).loss

    @torch.no_grad()
    def predict(self, model, examples, device):
        prompts = [self._prompt_ids(e.prompt) for e in examples]
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, so every answer starts at column `width`
            input_ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=self.max_target_length + 1, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id)
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
        enc = self.tokenizer([e.prompt for e in examples], max_length=self.max_source_length, truncation=True,
                             padding=True, return_tensors="pt")
        texts = sorted({o for e in examples for o in e.options})
        index = {t: i for i, t in enumerate(texts)}
        opt = self.tokenizer(texts, max_length=self.max_target_length, truncation=True, padding=True,
                             return_tensors="pt")
        allowed = torch.zeros((len(examples), len(texts)), dtype=torch.bool)
        for i, e in enumerate(examples):
            allowed[i, [index[o] for o in e.options]] = True
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "option_input_ids": opt["input_ids"], "option_attention_mask": opt["attention_mask"],
                "allowed": allowed, "target": torch.tensor([index[e.label] for e in examples]),
                "option_texts": texts}

    def scores(self, model, batch) -> torch.Tensor:
        prompts = self._embed(model, batch)
        options = self._embed(model, {"input_ids": batch["option_input_ids"],
                                      "attention_mask": batch["option_attention_mask"]})
        logits = self.scale * prompts @ options.T
        return logits.masked_fill(~batch["allowed"], float("-inf"))

    def loss(self, model, batch):
        return F.cross_entropy(self.scores(model, batch), batch["target"])

    @torch.no_grad()
    def predict(self, model, examples, device):
        batch = to_device(self.collate(examples), device)
        best = self.scores(model, batch).argmax(-1).tolist()
        return [batch["option_texts"][i] for i in best]


OBJECTIVES = {o.kind: o for o in (Seq2SeqObjective, DecoderObjective, EncoderScoringObjective)}


def make_objective(kind: str, tokenizer, max_source_length: int, max_target_length: int) -> Objective:
    return OBJECTIVES[kind](tokenizer, max_source_length, max_target_length)
