import torch

from nlora.models import load_backbone
from nlora.objectives import IGNORE, make_objective
from nlora.tasks.data import Example


def _ex(label, sentence="some text", options=("yes", "no")):
    return Example("t", sentence, label, options, f"Q?\nOptions: yes, no\nText: {sentence}\nAnswer:")


def test_decoder_loss_only_on_answer_tokens():
    bb = load_backbone("tiny-llama")
    obj = make_objective("decoder", bb.tokenizer, 64, 8)
    batch = obj.collate([_ex("yes"), _ex("no", "a much longer sentence here")])
    for i, label in enumerate(["yes", "no"]):
        supervised = batch["labels"][i][batch["labels"][i] != IGNORE].tolist()
        # the answer (" yes") and eos, nothing of the prompt
        assert supervised == obj._answer_ids(label)
        assert bb.tokenizer.decode(supervised, skip_special_tokens=True) == " " + label
    for i, e in enumerate([_ex("yes"), _ex("no", "a much longer sentence here")]):
        assert batch["attention_mask"][i].sum() == len(obj.prompt_ids(e)) + len(obj._answer_ids(e.label))


def test_decoder_truncation_keeps_the_answer_cue():
    bb = load_backbone("tiny-llama")
    obj = make_objective("decoder", bb.tokenizer, 40, 8)
    ids = obj.prompt_ids(_ex("yes", "x" * 200))
    # byte-level: 26 bytes before the text, 8 after it, so 6 bytes of the text fit
    assert len(ids) == 40 and bb.tokenizer.decode(ids) == "Q?\nOptions: yes, no\nText: xxxxxx\nAnswer:"


def test_seq2seq_labels_mask_padding():
    bb = load_backbone("tiny-t5")
    obj = make_objective("seq2seq", bb.tokenizer, 64, 8)
    batch = obj.collate([_ex("yes"), _ex("no")])
    assert batch["labels"][1].tolist()[-1] == IGNORE  # "no" is shorter than "yes": padded and ignored
    assert torch.isfinite(obj.loss(bb.model, batch))


def test_encoder_scores_only_the_examples_own_options():
    bb = load_backbone("tiny-bert")
    obj = make_objective("encoder", bb.tokenizer, 64, 8)
    examples = [_ex("yes"), Example("u", "s", "red", ("red", "blue"), "Which?\nText: s\nAnswer:")]
    batch = obj.collate(examples)
    assert batch["option_texts"] == ["blue", "no", "red", "yes"]
    scores = obj.scores(bb.model, batch)
    assert torch.isinf(scores[0, [0, 2]]).all() and torch.isfinite(scores[0, [1, 3]]).all()
    assert torch.isinf(scores[1, [1, 3]]).all()
    preds = obj.predict(bb.model, examples, "cpu")
    assert preds[0] in ("yes", "no") and preds[1] in ("red", "blue")
    # cross-entropy over allowed options equals the brute-force log-softmax over that subset
    expected = -torch.stack([scores[0, [1, 3]].log_softmax(0)[1], scores[1, [0, 2]].log_softmax(0)[1]]).mean()
    torch.testing.assert_close(obj.loss(bb.model, batch), expected)


class _Writes:
    """A model whose generation appends the same text to every prompt."""

    def __init__(self, tokenizer, text):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        return torch.cat([input_ids, torch.tensor([self.ids] * len(input_ids))], 1)[:, : input_ids.shape[1]
                                                                                       + max_new_tokens]


def test_reference_decoder_prediction_is_the_text_after_the_last_answer_cue():
    tok = load_backbone("tiny-llama").tokenizer
    obj = make_objective("decoder", tok, 40, 20)
    short, long = "short text", "x" * 100
    examples = [Example("t", text, "True", ("True", "False"), f"Q?\n{text}\nAnswer:", fmt)
                for text, fmt in ((short, "reference"), (long, "reference"), (long, "nlora"))]
    # the reference decodes prompt + generation and keeps what follows the last "Answer:": nothing where
    # truncation cut the prompt's cue (40 tokens of the long one); nlora's format keeps the cue
    assert obj.generate(_Writes(tok, " True"), examples, "cpu") == ["True", "", "True"]
    assert obj.generate(_Writes(tok, " x Answer: False"), examples, "cpu") == ["False", "False", "x Answer: False"]
