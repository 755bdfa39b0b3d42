"""Prompt formats: the text an example becomes, and how a prompt longer than `max_source_length` is cut.

- `nlora` (the default): "{instruction}\\nOptions: {a, b}\\nText: {sentence}\\nAnswer:". A prompt over the
  limit loses the end of its sentence only: the instruction, the options, the answer cue and the tokenizer's
  special tokens (BOS, EOS / SEP) stay, for every model kind.
- `reference`: the prompt of the O-LoRA / N-LoRA code. Its dataset (src/uie_dataset_lora.py) builds
  "{instruction}Option: {a, b} \\n{0}\\nAnswer:" ("{0}\\nAnswer:" for COPA: no instruction, no options), with
  the instruction of configs/instruction_config.json; its collator (src/uie_collator.py) puts
  "Task:{family}\\n" and "Dataset:{dataset}\\n" in front (add_task_name, add_dataset_name) and fills the sentence
  in with str.format. Over the limit, the end of the tokenized prompt is cut, as that collator cuts it: on long
  inputs (BoolQA, MultiRC passages) the end of the passage, the question and the answer cue are lost.
  Decoders get the tokenizer's BOS text in front of the prompt, as the reference's decoder path adds it; in
  training their prompt and label are tokenized as one text, and their prediction is read after the last
  "Answer:" of the decoded prompt + generation, as there (`reference_decoder_training_ids`,
  `reference_decoder_prediction`).

Free-text examples in prompt style `trace` (nlora.tasks.loading) carry a third format, `trace`: TRACE's prompt as it
is, BOS in front for decoders, and over the limit the start of the prompt cut (`trace_prompt_ids`).

All formats share one interface: `build_prompt` gives the text, `prompt_token_ids` the ids the model reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import NloraError

PROMPT_FORMATS = ("nlora", "reference")
# The format of free-text examples in prompt style "trace" (nlora.tasks.loading): never a classification prompt format.
TRACE_FORMAT = "trace"

# The instruction of each task family in the reference code: cmnfriend/O-LoRA configs/instruction_config.json
# (PKU-YuanGroup/N-LoRA ships the same file), its first zero-shot instruction per family (instruction_strategy
# single). COPA has none: the reference builds its prompt without instruction or options.
REFERENCE_INSTRUCTIONS = {
    "NLI": "What is the logical relationship between the \"sentence 1\" and the \"sentence 2\"? "
           "Choose one from the option.\n",
    "QQP": "Whether the \"first sentence\" and the \"second sentence\" have the same meaning? "
           "Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
               "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
           "Choose one from the option.\n",
}
# Families whose reference prompt is the bare sentence and answer cue.
REFERENCE_BARE_FAMILIES = ("COPA",)


@dataclass(frozen=True)
class PromptSpec:
    """How prompts are built: the format, and the reference format's task-name / dataset-name lines."""
    format: str = "nlora"
    add_task_name: bool = False
    add_dataset_name: bool = False

    @classmethod
    def of(cls, config) -> "PromptSpec":
        """The prompt options of a run's configuration."""
        return cls(config.prompt_format, config.add_task_name, config.add_dataset_name)

    def __post_init__(self):
        if self.format not in PROMPT_FORMATS:
            raise NloraError(f"option 'prompt_format': {self.format!r} is not one of {', '.join(PROMPT_FORMATS)}")


def read_instruction_file(path: str | Path) -> dict[str, str]:
    """A JSON file of instructions: nlora's {"family or dataset": "text"}, or the reference's
    instruction_config.json, {"family": [{"instruction_type": "zero-shot", "instruction": "text"}, ...]}, of which
    the first zero-shot instruction of each family is used (the reference's instruction_strategy single)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NloraError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NloraError(f"{path}: not a JSON file ({e})") from None
    expected = (f"{path}: expected a JSON object mapping task family or dataset name to instruction text, or the "
                "reference's instruction_config.json (family -> list of {\"instruction_type\", \"instruction\"})")
    if not isinstance(data, dict):
        raise NloraError(expected)
    out = {}
    for key, value in data.items():
        if isinstance(value, str):
            out[key] = value
            continue
        if not isinstance(value, list) or not all(isinstance(v, dict) and isinstance(v.get("instruction"), str)
                                                  for v in value):
            raise NloraError(f"{expected}; key {key!r} is neither")
        zero_shot = [v["instruction"] for v in value if v.get("instruction_type", "zero-shot") == "zero-shot"]
        if not zero_shot:
            raise NloraError(f"{path}: family {key!r} has no zero-shot instruction")
        out[key] = zero_shot[0]
    return out


def build_prompt(spec: PromptSpec, instruction: str, family: str, dataset: str, options: tuple[str, ...],
                 sentence: str) -> str:
    if spec.format == "nlora":
        return f"{instruction}\nOptions: {', '.join(options)}\nText: {sentence}\nAnswer:"
    if family in REFERENCE_BARE_FAMILIES:
        template = "{0}\nAnswer:"
    else:
        template = instruction + "Option: " + ", ".join(options) + " \n" + "{0}" + "\nAnswer:"
    prefix = ""
    if spec.add_task_name:
        prefix += "Task:" + family + "\n"
    if spec.add_dataset_name:
        prefix += "Dataset:" + dataset + "\n"
    template = prefix + template
    try:
        return template.format(sentence)
    except Exception:  # braces in a label or an instruction ({1}, {x}, {0.x}, {0[x]}): whatever the error, the
        return template  # reference keeps the template unfilled (its `finally: return`), and so do we


def reference_instruction(instructions: dict[str, str], family: str, dataset: str) -> str:
    if family in REFERENCE_BARE_FAMILIES:
        return ""
    text = instructions.get(dataset) or instructions.get(family)
    if text is None:
        raise NloraError(f"prompt format 'reference': no instruction for task family '{family}' (dataset "
                         f"'{dataset}'); the reference's instruction_config.json covers "
                         f"{', '.join(REFERENCE_INSTRUCTIONS)}. Give one with option 'instructions'")
    return text


def split_prompt(prompt: str, sentence: str) -> tuple[str, str, str]:
    """(before, sentence, after) of a prompt: in both formats the sentence is the last free text, followed only by
    the answer cue, so its last occurrence is its slot."""
    at = prompt.rfind(sentence) if sentence else -1
    if at < 0:
        return prompt, "", ""
    return prompt[:at], sentence, prompt[at + len(sentence):]


def _ids(tokenizer, text: str, kind: str, **kw) -> list[int]:
    ids = tokenizer(text, **kw)["input_ids"]
    if kind == "decoder" and ids and ids[-1] == tokenizer.eos_token_id:  # byte-level tokenizers append eos
        ids = ids[:-1]
    return ids


def prompt_token_ids(tokenizer, prompt: str, sentence: str, prompt_format: str, max_length: int, kind: str,
                     task: str = "") -> list[int]:
    """The token ids of a prompt, at most `max_length`, cut the way the prompt's format cuts."""
    if prompt_format == "reference":
        return _reference_ids(tokenizer, prompt, max_length, kind)
    if prompt_format == TRACE_FORMAT:
        return trace_prompt_ids(tokenizer, prompt, max_length, kind, task)
    ids = _ids(tokenizer, prompt, kind)
    if len(ids) <= max_length:
        return ids
    before, sentence, after = split_prompt(prompt, sentence)
    fixed = _ids(tokenizer, before + after, kind)
    if len(fixed) > max_length:
        raise NloraError(f"option 'max_source_length': {max_length} tokens cannot hold the prompt of task "
                         f"'{task}' even without its text ({len(fixed)} tokens of instruction, options and answer "
                         "cue); raise it")
    # the longest start of the sentence that fits (binary search: tokenization is not additive across a cut)
    lo, hi, best = 0, len(sentence), fixed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = _ids(tokenizer, before + sentence[:mid] + after, kind)
        if len(candidate) <= max_length:
            lo, best = mid, candidate
        else:
            hi = mid
    return best


def trace_prompt_ids(tokenizer, prompt: str, max_length: int, kind: str, task: str = "") -> list[int]:
    """TRACE's prompt tokens (utils/data/data_collator.py): decoders get BOS + prompt (the tokenizer's BOS, where
    it has one, even if it would not add it itself), seq2seq encoders the prompt with the tokenizer's special
    tokens; over the limit the start of the prompt text is cut (left truncation), the special tokens stay."""
    body = _ids(tokenizer, prompt, kind, add_special_tokens=False)
    if kind == "decoder":
        head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        tail: list[int] = []
    else:
        full = _ids(tokenizer, prompt, kind)
        at = next((i for i in range(len(full) - len(body) + 1) if full[i: i + len(body)] == body), 0)
        head, tail = full[:at], full[at + len(body):] if body else full
    room = max_length - len(head) - len(tail)
    if room < 1:
        raise NloraError(f"option 'max_source_length': {max_length} tokens cannot hold a prompt of task '{task}' "
                         f"beside its {len(head) + len(tail)} special tokens; raise it")
    return head + body[-room:] + tail


def _reference_ids(tokenizer, prompt: str, max_length: int, kind: str) -> list[int]:
    """src/uie_collator.py: tokenize; over the limit, decode the first max_length ids back to text and tokenize
    that with truncation (seq2seq drops special tokens in the decode, the decoder path keeps them)."""
    if kind == "decoder" and tokenizer.bos_token:
        prompt = tokenizer.bos_token + prompt
    ids = _ids(tokenizer, prompt, kind)
    if len(ids) <= max_length:
        return ids
    text = tokenizer.decode(ids[:max_length], skip_special_tokens=kind != "decoder")
    return _ids(tokenizer, text, kind, max_length=max_length, truncation=True)


def reference_decoder_training_ids(tokenizer, prompt: str, label: str, max_source_length: int,
                                   max_target_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a decoder training example in the reference format, as src/uie_collator.py's
    decoder path builds it: BOS text + prompt + label tokenized as one text, so the label follows "Answer:"
    without a space, and the EOS; the answer is what follows the prompt's own tokens (at most
    `max_target_length` of them, then the EOS). The prompt is cut as the collator cuts it: where prompt and label
    together exceed max_source_length + max_target_length, it decodes the ids back to text and tokenizes that
    again (one more BOS in front); otherwise it cuts the ids. Unlike the collator, nlora keeps the answer."""
    bos = tokenizer.bos_token or ""
    prompt_ids = _ids(tokenizer, bos + prompt, "decoder")
    full = _ids(tokenizer, bos + prompt + label, "decoder")
    shared = 0  # the prompt's tokens that the joint text kept (its last one may merge with the label's first)
    while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
        shared += 1
    answer = full[shared:][:max_target_length] + [tokenizer.eos_token_id]
    label_length = len(tokenizer(label + tokenizer.eos_token)["input_ids"])  # what the collator counts
    if len(prompt_ids) + label_length > max_source_length + max_target_length:
        text = tokenizer.decode(prompt_ids[:max_source_length], skip_special_tokens=False)
        return _ids(tokenizer, text, "decoder", max_length=max_source_length, truncation=True), answer
    return full[:shared][:max_source_length], answer


ANSWER_PREFIX = "Answer:"


def reference_decoder_prediction(text: str) -> str:
    """The reference's decoder post-processing (src/uie_trainer_lora.py, skip_instructions) of the decoded prompt
    and generation: the text after the last "Answer:", or nothing where none is left (a prompt cut before its
    answer cue, and a generation that writes none)."""
    return text.split(ANSWER_PREFIX)[-1].strip() if ANSWER_PREFIX in text else ""


def check_prompt_budget(tokenizer, tasks, max_length: int, kind: str) -> None:
    """Fail before training when some task's prompt cannot fit even with an empty sentence (nlora format)."""
    for task in tasks:
        for example in (task.train[:1] + task.test[:1]):
            if example.prompt_format == "nlora":
                before, _, after = split_prompt(example.prompt, example.sentence)
                prompt_token_ids(tokenizer, before + after, "", "nlora", max_length, kind, task.name)
