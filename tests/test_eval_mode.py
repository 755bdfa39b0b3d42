import json

import pytest
import torch

from nlora.adapters import ContinualAdapters
from nlora.config import RunConfig, load_config
from nlora.errors import NloraError
from nlora.models import load_backbone
from nlora.objectives import make_objective
from nlora.runner import run
from nlora.tasks.data import Example

TARGETS = {"tiny-t5": ["q", "v"], "tiny-llama": ["q_proj", "v_proj"]}
KINDS = {"tiny-t5": "seq2seq", "tiny-llama": "decoder"}


def _ex(sentence, options, label=None):
    prompt = f"Pick one.\nOptions: {', '.join(options)}\nText: {sentence}\nAnswer:"
    return Example("t", sentence, label or options[0], tuple(options), prompt)


EXAMPLES = [
    _ex("a short one", ["yes", "no"]),
    _ex("a somewhat longer sentence, so the batch needs padding", ["yes", "no"]),
    _ex("colours", ["red", "blue", "green"], "blue"),  # more options than the others in the batch
    _ex("x" * 50, ["no", "no way", "not at all"], "no way"),  # options sharing a prefix: eos decides
]


def _model_with_random_adapter(name):
    """The tiny base plus one LoRA adapter with random (non-zero) B, so the adapter changes every score."""
    bb = load_backbone(name)
    adapters = ContinualAdapters(bb.model, bb.kind, 4, 8.0, 0.0, TARGETS[name])
    adapters.add("task0")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for f in adapters.factors("task0"):
            f.B.copy_(torch.randn(f.B.shape, generator=gen) * 0.5)
    adapters.model.eval()
    return bb, adapters.model


def _brute_force_log_likelihood(name, obj, model, example, option) -> float:
    """log P(option tokens, eos included | prompt) for one unpadded example, one option, no cache."""
    tok = obj.tokenizer
    if KINDS[name] == "seq2seq":
        src = torch.tensor([obj.prompt_ids(example)])  # the prompt as cut to max_source_length
        target = tok(text_target=option, max_length=obj.max_target_length, truncation=True,
                     return_tensors="pt")["input_ids"]
        logits = model(input_ids=src, attention_mask=torch.ones_like(src), labels=target).logits
        return logits.log_softmax(-1)[0].gather(-1, target[0].unsqueeze(-1)).sum().item()
    prompt, answer = obj.prompt_ids(example), obj._answer_ids(option)
    ids = torch.tensor([prompt + answer])
    logp = model(input_ids=ids).logits.log_softmax(-1)[0]
    return sum(logp[len(prompt) + t - 1, a].item() for t, a in enumerate(answer))


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_score_mode_is_the_argmax_of_brute_force_log_likelihoods(name):
    bb, model = _model_with_random_adapter(name)
    obj = make_objective(KINDS[name], bb.tokenizer, 96, 8, eval_mode="score")
    with torch.no_grad():
        expected = [[_brute_force_log_likelihood(name, obj, model, e, o) for o in e.options] for e in EXAMPLES]
        batched = obj.option_log_likelihoods(model, EXAMPLES, "cpu")
        predictions = obj.predict(model, EXAMPLES, "cpu")
    for got, want in zip(batched, expected):
        assert got == pytest.approx(want, abs=1e-3)
    assert predictions == [e.options[max(range(len(s)), key=s.__getitem__)] for e, s in zip(EXAMPLES, expected)]


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_score_mode_predicts_only_options(name):
    bb, model = _model_with_random_adapter(name)
    obj = make_objective(KINDS[name], bb.tokenizer, 128, 4, eval_mode="score")
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma delta", "e", "zeta eta theta iota", "no", "no way"]
    examples = []
    for i in range(12):
        k = 2 + i % 4
        idx = torch.randperm(len(words), generator=gen)[:k].tolist()
        examples.append(_ex(f"sentence number {i} " * (1 + i % 3), [words[j] for j in idx]))
    with torch.no_grad():
        predictions = obj.predict(model, examples, "cpu")
    assert all(p in e.options for p, e in zip(predictions, examples))


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_generate_mode_stays_the_default(name):
    bb, model = _model_with_random_adapter(name)
    obj = make_objective(KINDS[name], bb.tokenizer, 64, 4)
    assert obj.eval_mode == "generate" and RunConfig().eval_mode == "generate"
    with torch.no_grad():
        assert obj.predict(model, EXAMPLES[:2], "cpu") == obj.generate(model, EXAMPLES[:2], "cpu")


def test_encoder_predicts_the_most_similar_option_in_both_modes():
    """Both modes pick the option whose embedding (mean-pooled, unpadded, alone) is nearest the prompt's."""
    bb = load_backbone("tiny-bert")
    adapters = ContinualAdapters(bb.model, "encoder", 4, 8.0, 0.0, ["query", "value"])
    adapters.add("task0")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for f in adapters.factors("task0"):
            f.B.copy_(torch.randn(f.B.shape, generator=gen) * 0.5)
    model = adapters.model.eval()

    def embed(text):
        hidden = model(input_ids=torch.tensor([bb.tokenizer(text)["input_ids"]])).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.mean(0), dim=-1)

    with torch.no_grad():
        expected = []
        for e in EXAMPLES:
            sims = [float(embed(e.prompt) @ embed(o)) for o in e.options]
            expected.append(e.options[max(range(len(sims)), key=sims.__getitem__)])
        for mode in ("generate", "score"):
            obj = make_objective("encoder", bb.tokenizer, 256, 16, eval_mode=mode)  # nothing cut
            assert obj.predict(model, EXAMPLES, "cpu") == expected
            scores = obj.option_log_likelihoods(model, EXAMPLES, "cpu")
            assert [e.options[max(range(len(s)), key=s.__getitem__)] for e, s in zip(EXAMPLES, scores)] == expected


def test_bad_eval_mode_is_named():
    with pytest.raises(NloraError, match="option 'eval_mode': 'beam' is not one of generate, score"):
        RunConfig(tasks=["a"], eval_mode="beam").validate()
    with pytest.raises(ValueError, match="eval_mode"):
        make_objective("seq2seq", load_backbone("tiny-t5").tokenizer, 8, 8, eval_mode="beam")


def test_run_in_score_mode_records_options_only(synthetic_dir, tmp_path):
    config = load_config(overrides={
        "model": "tiny-t5", "method": "inc-lora", "tasks": "harbor,orchard", "data_dir": str(synthetic_dir),
        "output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 8, "max_train_samples": 8,
        "max_eval_samples": 6, "max_source_length": 128, "device": "cpu", "eval_mode": "score"})
    metrics = run(config, progress=False)
    assert metrics["eval_mode"] == "score" and metrics["complete"]
    options = json.loads((synthetic_dir / "synthetic" / "harbor" / "labels.json").read_text())
    records = [json.loads(line) for line in
               (tmp_path / "run" / "predictions" / "1-orchard" / "harbor.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["prediction"] in options for r in records)


def _generate_alone(name, obj, model, example) -> str:
    """HF `generate` on one unpadded example: at most max_target_length answer tokens, up to the first eos."""
    tok, limit = obj.tokenizer, obj.max_target_length
    if KINDS[name] == "seq2seq":
        src = torch.tensor([tok(example.prompt)["input_ids"]])
        out = model.generate(input_ids=src, max_new_tokens=limit, do_sample=False, num_beams=1)[0, 1:]
    else:
        prompt = tok(example.prompt)["input_ids"]
        prompt = prompt[:-1] if prompt[-1] == tok.eos_token_id else prompt
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=limit + 1, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(prompt):]
    ids = out.tolist()
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    return tok.decode(ids[:limit], skip_special_tokens=True).strip()


def assert_batched_generation_is_per_example(name, obj, model, examples):
    with torch.no_grad():
        batched = obj.generate(model, examples, "cpu")
        alone = [_generate_alone(name, obj, model, e) for e in examples]
    assert batched == alone


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_batched_left_padded_generation_is_generation_per_example(name):
    """Prompts of 4 lengths in one padded batch; the random model never stops early, so the answer-length cut,
    the prompt slicing and the padding all show in the text."""
    bb, model = _model_with_random_adapter(name)
    obj = make_objective(KINDS[name], bb.tokenizer, 256, 6)  # no prompt is cut
    assert_batched_generation_is_per_example(name, obj, model, EXAMPLES)
