"""Prompt formats: the reference's strings, derived by hand from its code (src/uie_dataset_lora.py builds
"{instruction}Option: {labels} \\n{0}\\nAnswer:", src/uie_collator.py prefixes "Task:..\\n" and "Dataset:..\\n"),
and the truncation of each format."""

import json
import re

import pytest

from nlora.errors import NloraError
from nlora.models import load_backbone
from nlora.objectives import IGNORE, make_objective
from nlora.tasks.data import Example, load_instructions, load_task
from nlora.tasks.prompts import REFERENCE_INSTRUCTIONS, PromptSpec, prompt_token_ids

REF = PromptSpec("reference", add_task_name=True, add_dataset_name=True)

# (family, dataset, labels, sentence, the prompt the reference builds with add_task_name and add_dataset_name)
FAMILIES = [
    ("TC", "agnews", ["World", "Sports"], "Stocks fell.",
     "Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? Choose one from the option.\n"
     "Option: World, Sports \nStocks fell.\nAnswer:"),
    ("SC", "yelp", ["very negative", "negative"], "Great food!",
     "Task:SC\nDataset:yelp\nWhat is the sentiment of the following paragraph? Choose one from the option.\n"
     "Option: very negative, negative \nGreat food!\nAnswer:"),
    ("NLI", "CB", ["entailment", "contradiction", "neutral"], "sentence 1: A\nsentence 2: B",
     "Task:NLI\nDataset:CB\nWhat is the logical relationship between the \"sentence 1\" and the \"sentence 2\"? "
     "Choose one from the option.\nOption: entailment, contradiction, neutral \nsentence 1: A\nsentence 2: B\nAnswer:"),
    ("QQP", "QQP", ["False", "True"], "q1\nq2",
     "Task:QQP\nDataset:QQP\nWhether the \"first sentence\" and the \"second sentence\" have the same meaning? "
     "Choose one from the option.\nOption: False, True \nq1\nq2\nAnswer:"),
    ("BoolQA", "BoolQA", ["True", "False"], "passage\nquestion",
     "Task:BoolQA\nDataset:BoolQA\nAccording to the following passage, is the question true or false? "
     "Choose one from the option.\nOption: True, False \npassage\nquestion\nAnswer:"),
    ("MultiRC", "MultiRC", ["False", "True"], "p\nq\na",
     "Task:MultiRC\nDataset:MultiRC\nAccording to the following passage and question, is the candidate answer "
     "true or false? Choose one from the option.\nOption: False, True \np\nq\na\nAnswer:"),
    ("WiC", "WiC", ["True", "False"], "word: call\nS1.\nS2.",
     "Task:WiC\nDataset:WiC\nGiven a word and two sentences, whether the word is used with the same sense in both "
     "sentence? Choose one from the option.\nOption: True, False \nword: call\nS1.\nS2.\nAnswer:"),
    ("COPA", "COPA", ["A", "B"], "Which is the cause? {braces} stay.\nA: x\nB: y",  # no instruction, no options
     "Task:COPA\nDataset:COPA\nWhich is the cause? {braces} stay.\nA: x\nB: y\nAnswer:"),
]


@pytest.mark.parametrize("family,dataset,labels,sentence,expected", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_reference_prompt_of_each_task_family(tmp_path, make_task, family, dataset, labels, sentence, expected):
    make_task(tmp_path, family, dataset, labels, [{"label": labels[0], "sentence": sentence}])
    task = load_task(tmp_path, dataset, load_instructions(None, "reference"), prompt=REF)
    assert task.train[0].prompt == expected and task.train[0].prompt_format == "reference"


def test_reference_prompt_without_the_name_lines(tmp_path, make_task):
    make_task(tmp_path, "SC", "IMDB", ["Good", "Bad"], [{"label": "Good", "sentence": "Fine."}])
    task = load_task(tmp_path, "IMDB", prompt=PromptSpec("reference"))
    assert task.train[0].prompt == ("What is the sentiment of the following paragraph? Choose one from the option.\n"
                                    "Option: Good, Bad \nFine.\nAnswer:")
    only_dataset = load_task(tmp_path, "IMDB", prompt=PromptSpec("reference", add_dataset_name=True))
    assert only_dataset.train[0].prompt.startswith("Dataset:IMDB\nWhat is the sentiment")


def test_reference_instruction_config_is_accepted_as_it_is(tmp_path, make_task):
    config = {family: [{"instruction_type": "zero-shot", "instruction": text}] for family, text in
              REFERENCE_INSTRUCTIONS.items()}
    config["TC"] = [{"instruction_type": "few-shot", "instruction": "not this one"},
                    {"instruction_type": "zero-shot", "instruction": "Topic? \n"},
                    {"instruction_type": "zero-shot", "instruction": "not the second"}]
    path = tmp_path / "instruction_config.json"
    path.write_text(json.dumps(config))
    make_task(tmp_path / "data", "TC", "agnews", ["World"], [{"label": "World", "sentence": "s"}])
    task = load_task(tmp_path / "data", "agnews", load_instructions(path, "reference"), prompt=PromptSpec("reference"))
    assert task.train[0].prompt == "Topic? \nOption: World \ns\nAnswer:"
    # the same file serves nlora's own layout too
    task = load_task(tmp_path / "data", "agnews", load_instructions(path))
    assert task.train[0].prompt == "Topic? \n\nOptions: World\nText: s\nAnswer:"


@pytest.mark.parametrize("field", ["{0.x}", "{0[x]}", "{0!z}", "{1}", "{x}"])
def test_a_template_that_cannot_be_filled_stays_unfilled_as_in_the_reference(tmp_path, make_task, field):
    """The reference fills the sentence in with str.format in a try whose `finally: return` keeps the template
    as it is on any error."""
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps({"SC": f"Rate {field} here.\n"}))
    make_task(tmp_path / "data", "SC", "yelp", ["good", "bad"], [{"label": "good", "sentence": "Fine."}])
    task = load_task(tmp_path / "data", "yelp", load_instructions(path, "reference"), prompt=PromptSpec("reference"))
    assert task.train[0].prompt == f"Rate {field} here.\nOption: good, bad \n{{0}}\nAnswer:"


def test_reference_format_needs_an_instruction_for_the_family(tmp_path, make_task):
    make_task(tmp_path, "synthetic", "harbor", ["a"], [{"label": "a", "sentence": "s"}])
    with pytest.raises(NloraError, match=r"no instruction for task family 'synthetic'.*option 'instructions'"):
        load_task(tmp_path, "harbor", prompt=PromptSpec("reference"))


class CharTokenizer:
    """One id per character, BOS in front and EOS at the end (as LLaMA / BERT-style tokenizers add them)."""
    bos_token, eos_token, bos_token_id, eos_token_id = "<s>", "</s>", 1, 2

    def __call__(self, text, max_length=None, truncation=False):
        ids = [1] + [ord(c) + 10 for c in text] + [2]
        if truncation and max_length and len(ids) > max_length:
            ids = ids[: max_length - 1] + [2]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 10) if i > 2 else ("" if skip_special_tokens else ("<s>", "</s>")[i - 1]) for i in ids)


BEFORE, AFTER = "Classify.\nOptions: a, b\nText: ", "\nAnswer:"


@pytest.mark.parametrize("kind", ["seq2seq", "decoder", "encoder"])
def test_nlora_format_cuts_only_the_sentence_and_keeps_bos(kind):
    tok = CharTokenizer()
    sentence = "word " * 40
    prompt = BEFORE + sentence + AFTER
    ids = prompt_token_ids(tok, prompt, sentence, "nlora", 60, kind)
    text = tok.decode(ids)
    assert len(ids) == 60 and text.startswith("<s>" + BEFORE) and text.endswith(AFTER + ("" if kind == "decoder"
                                                                                        else "</s>"))
    # brute force: the longest start of the sentence that fits
    fits = [n for n in range(len(sentence) + 1)
            if len(prompt_token_ids(tok, BEFORE + sentence[:n] + AFTER, "", "nlora", 10**6, kind)) <= 60]
    assert text == tok.decode(prompt_token_ids(tok, BEFORE + sentence[:max(fits)] + AFTER, "", "nlora", 10**6, kind))
    assert prompt_token_ids(tok, BEFORE + "short" + AFTER, "short", "nlora", 60, kind) == \
        tok(BEFORE + "short" + AFTER)["input_ids"][: -1 if kind == "decoder" else None]  # short prompts: untouched


def test_nlora_format_refuses_to_drop_the_instruction():
    with pytest.raises(NloraError, match=r"option 'max_source_length': 20 tokens cannot hold the prompt of task 't'"):
        prompt_token_ids(CharTokenizer(), BEFORE + "x" * 50 + AFTER, "x" * 50, "nlora", 20, "seq2seq", "t")


@pytest.mark.parametrize("kind", ["seq2seq", "encoder"])
def test_reference_format_cuts_the_end_of_the_tokenized_prompt(kind):
    tok = CharTokenizer()
    prompt = BEFORE + "word " * 40 + AFTER
    ids = prompt_token_ids(tok, prompt, "", "reference", 30, kind)
    # the collator: decode the first 30 ids without special tokens, tokenize again with truncation at 30
    assert ids == tok(prompt[:28])["input_ids"] and len(ids) == 30


def test_reference_format_decoder_puts_bos_text_in_front_and_cuts_the_end():
    tok = CharTokenizer()
    prompt = BEFORE + "word " * 40 + AFTER
    ids = prompt_token_ids(tok, prompt, "", "reference", 30, "decoder")
    # bos_token + prompt is tokenized (a second BOS, as the reference gets), cut at 30, decoded with the special
    # tokens, tokenized again with truncation; the trailing EOS of a prompt is dropped for decoders
    assert tok.decode(ids) == "<s><s><s>" + prompt[:22]  # 1 BOS id + "<s><s>" as text + 22 + no EOS = 29


def test_t5_reference_truncation_matches_the_collator():
    tok = load_backbone("tiny-t5").tokenizer  # byte-level: one id per byte, EOS appended
    prompt = "Task:SC\nDataset:yelp\n" + "x" * 100 + "\nAnswer:"
    ids = prompt_token_ids(tok, prompt, "", "reference", 40, "seq2seq")
    assert ids == tok(prompt[:39])["input_ids"] and ids[-1] == tok.eos_token_id


class LlamaLikeTokenizer(CharTokenizer):
    """As LLaMA's tokenizer: BOS added in front, no EOS at the end, and "<s>" / "</s>" in the text read as the
    special tokens (so a decoded "<s>" comes back as a BOS id)."""
    pad_token_id = 0

    def __call__(self, text, max_length=None, truncation=False, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        for part in re.split(r"(<s>|</s>)", text):
            ids += [{"<s>": 1, "</s>": 2}[part]] if part in ("<s>", "</s>") else [ord(c) + 10 for c in part]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


def _collator_training_ids(tok, prompt, label, max_source, max_target):
    """src/uie_collator.py's decoder path on a training example, step by step (as read in its code)."""
    task_input, label_text = tok.bos_token + prompt, label + tok.eos_token
    tokenized_input, tokenized_label = tok(task_input)["input_ids"], tok(label_text)["input_ids"]
    limit = max_source + max_target
    if len(tokenized_input) + len(tokenized_label) <= limit:
        source = task_input + label_text
    else:
        source = tok.decode((tokenized_input + tokenized_label)[:limit], skip_special_tokens=False)
    return tok(source, max_length=max_source, truncation=True)["input_ids"]


# prompt lengths around the limits (30 + 10 tokens): short; over 30 with prompt + label within 40 (the collator
# cuts the ids: two BOS); prompt + label over 40 (it decodes and tokenizes again: three BOS)
@pytest.mark.parametrize("length,bos", [(10, 2), (30, 2), (40, 3)])
def test_reference_decoder_training_sequence_follows_the_collator(length, bos):
    tok = LlamaLikeTokenizer()
    prompt = "x" * (length - 8) + "\nAnswer:"
    example = Example("t", "x", "True", ("True", "False"), prompt, "reference")
    batch = make_objective("decoder", tok, 30, 10).collate([example])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    answer = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    reference = _collator_training_ids(tok, prompt, "True", 30, 10)
    assert ids[:bos + 1] == [1] * bos + [ord("x") + 10]
    assert answer == tok("True</s>", add_special_tokens=False)["input_ids"]  # "Answer:True</s>": no space
    if len(reference) < 30:  # the collator kept the whole sequence: the very same ids
        assert ids == reference and tok.decode(ids).endswith("\nAnswer:True</s>")
    else:  # it cut the answer off at 30 tokens; nlora keeps it after the same 30 prompt tokens
        assert ids == reference + answer
