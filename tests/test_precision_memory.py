"""Weight dtypes, the lean decoder loss and scoring against the plain versions, gradient checkpointing, and the
precision/device/quantization option checks."""

import copy
import json

import pytest
import torch
import yaml

from nlora.adapters import ContinualAdapters
from nlora.config import RunConfig
from nlora.errors import NloraError
from nlora.eval.evaluate import eval_batches, evaluate
from nlora.export import read_run
from nlora.models import default_target_modules, load_backbone
from nlora.objectives import (IGNORE, Objective, align_right, cache_keyword, collect_scores, make_objective,
                              option_at, option_slots, token_log_likelihood)
from nlora.precision import check_runtime, resolve_dtype, warn_precision
from nlora.predict import load_model, predict_run
from nlora.runner import run
from nlora.tasks.data import Example
from nlora.train.engine import make_accelerator


def _ex(label, sentence="some text", options=("yes", "no", "maybe")):
    return Example("t", sentence, label, options, f"Q?\nOptions: {', '.join(options)}\nText: {sentence}\nAnswer:")


EXAMPLES = [_ex("yes"), _ex("no", "a much longer sentence here, with more words in it"),
            _ex("maybe", "mid-length text"), Example("u", "s", "red", ("red", "blue"), "Which colour?\nAnswer:")]


def _adapted(name, dtype="auto", dropout=0.0, adapters=1, **kw):
    torch.manual_seed(0)  # the same LoRA initialisation at every call
    bb = load_backbone(name, dtype=dtype, **kw)
    ad = ContinualAdapters(bb.model, bb.kind, 4, 8, dropout, default_target_modules(bb.model_type))
    for k in range(adapters):
        ad.add(f"task{k}")
    with torch.no_grad():  # B is zero at init: give it values, so that the adapters change the outputs
        for f in ad.factors(ad.current):
            f.B.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return bb, ad


# ------------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_base_takes_the_dtype_and_lora_factors_stay_float32(name, dtype):
    bb, ad = _adapted(name, dtype, adapters=2)  # the second adapter goes through peft's add_adapter
    expected = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype]
    base = {p.dtype for n, p in ad.model.named_parameters() if "lora_" not in n}
    lora = {p.dtype for n, p in ad.model.named_parameters() if "lora_" in n}
    assert base == {expected} and bb.dtype == str(expected).removeprefix("torch.")
    assert lora == {torch.float32}


def test_auto_dtype_by_kind_and_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_dtype("auto", "decoder", cuda) == "bfloat16"
    assert resolve_dtype("auto", "seq2seq", cuda) == "float32"  # T5 overflows in half precision
    assert resolve_dtype("auto", "encoder", cuda) == "float32"
    assert resolve_dtype("auto", "decoder", cpu) == "float32"
    assert resolve_dtype("float16", "decoder", cpu) == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "decoder", cuda) == "float32"


def test_bf16_base_trains_float32_factors_with_float32_penalty():
    from nlora.methods.penalties import lora_l1

    bb, ad = _adapted("tiny-llama", "bfloat16")
    obj = make_objective("decoder", bb.tokenizer, 64, 8)
    loss = obj.loss(ad.model, obj.collate(EXAMPLES))
    reg = sum(lora_l1("delta", f.A, f.B, f.scaling) for f in ad.factors(ad.current))
    assert reg.dtype == torch.float32
    (loss + 1e-3 * reg).backward()
    grads = [p.grad for p in ad.adapter_parameters(ad.current)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------- decoder loss

def test_align_right_moves_tokens_to_the_end():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    ids = torch.tensor([[5, 6, 0, 0], [1, 2, 3, 4], [9, 0, 0, 0]])
    m, i = align_right(mask, ids)
    assert m.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert i.tolist() == [[0, 0, 5, 6], [1, 2, 3, 4], [0, 0, 0, 9]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoder_loss_and_gradients_equal_the_full_logits_loss(dtype):
    bb, ad = _adapted("tiny-llama", dtype)
    obj = make_objective("decoder", bb.tokenizer, 64, 8)
    batch = obj.collate(EXAMPLES)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1  # rows of different lengths: padding
    params = ad.adapter_parameters(ad.current)

    old = ad.model(**batch).loss  # the model's own loss over full-vocabulary logits at every position
    old_grads = torch.autograd.grad(old, params)
    new = obj.loss(ad.model, batch)
    new_grads = torch.autograd.grad(new, params)
    tol = {"float32": dict(rtol=1e-5, atol=1e-6), "bfloat16": dict(rtol=2e-2, atol=2e-3)}[dtype]
    torch.testing.assert_close(new, old, **tol)
    for g_new, g_old in zip(new_grads, old_grads):
        torch.testing.assert_close(g_new, g_old, **tol)


def test_decoder_logits_grow_with_the_answer_not_the_prompt():
    bb, ad = _adapted("tiny-llama")
    obj = make_objective("decoder", bb.tokenizer, 512, 8)
    seen = []
    head = ad.model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    try:
        for sentence in ("short", "long " * 80):
            obj.loss(ad.model, obj.collate([_ex("yes", sentence), _ex("no", sentence)]))
    finally:
        hook.remove()
    short, long_ = seen
    assert short == long_ and short[1] == len(obj._answer_ids("yes")) + 1


def test_seq2seq_loss_is_the_models_own():
    bb, ad = _adapted("tiny-t5")
    obj = make_objective("seq2seq", bb.tokenizer, 64, 8)
    batch = obj.collate(EXAMPLES)
    logits = ad.model(**batch).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                 ignore_index=IGNORE)
    torch.testing.assert_close(obj.loss(ad.model, batch), expected)


# ------------------------------------------------------------------------------------------- scoring

def _scores_by_copying_the_cache(obj, model, examples):
    """The plain implementation: one deep copy of the prompt cache per option slot, full logits everywhere."""
    input_ids, mask, _ = obj._left_padded_prompts(examples)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                use_cache=True)
    prompt_cache = out["cache"] if "cache" in out else out["past_key_values"]
    first_logits, lengths = out.logits[:, -1:], mask.sum(-1, keepdim=True)
    per_slot = []
    for slot in option_slots(examples):
        answers = [obj._answer_ids(option_at(e, slot)) for e in examples]
        steps = max(map(len, answers))
        ids = torch.full((len(answers), steps), obj.tokenizer.pad_token_id)
        amask = torch.zeros((len(answers), steps), dtype=torch.long)
        for i, a in enumerate(answers):
            ids[i, : len(a)], amask[i, : len(a)] = torch.tensor(a), 1
        cont = model(input_ids=ids, attention_mask=torch.cat([mask, amask], -1),
                     position_ids=lengths + torch.arange(steps), use_cache=True,
                     **{cache_keyword(model): copy.deepcopy(prompt_cache)})
        logits = torch.cat([first_logits, cont.logits[:, :-1]], 1)
        per_slot.append(token_log_likelihood(logits, ids, amask).tolist())
    return collect_scores(examples, per_slot)


@torch.no_grad()
def test_decoder_scores_equal_the_cache_copying_implementation(monkeypatch):
    bb, ad = _adapted("tiny-llama")
    obj = make_objective("decoder", bb.tokenizer, 64, 8, eval_mode="score")
    ad.model.eval()
    expected = _scores_by_copying_the_cache(obj, ad.model, EXAMPLES)
    got = obj.option_log_likelihoods(ad.model, EXAMPLES, "cpu")
    assert [len(s) for s in got] == [3, 3, 3, 2]
    torch.testing.assert_close(torch.tensor([x for s in got for x in s]),
                               torch.tensor([x for s in expected for x in s]), rtol=1e-5, atol=1e-5)
    # a cache that cannot be cropped (a full sliding window) is rebuilt: the same scores
    monkeypatch.setattr("nlora.objectives.crop_cache", lambda cache, tokens: False)
    rebuilt = obj.option_log_likelihoods(ad.model, EXAMPLES, "cpu")
    torch.testing.assert_close(torch.tensor([x for s in rebuilt for x in s]),
                               torch.tensor([x for s in expected for x in s]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5", "tiny-bert"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    grads = []
    for checkpointing in (False, True):
        bb, ad = _adapted(name, gradient_checkpointing=checkpointing, dropout=0.1, adapters=2)
        obj = make_objective(bb.kind, bb.tokenizer, 64, 8)
        ad.model.train()
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG state in the recompute)
        loss = obj.loss(ad.model, obj.collate(EXAMPLES))
        grads.append(torch.autograd.grad(loss, ad.adapter_parameters(ad.current)))
        if checkpointing:
            assert bb.model.is_gradient_checkpointing
    for g_plain, g_ckpt in zip(*grads):
        assert g_plain.abs().sum() > 0  # the lowest adapted layer trains too
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- evaluation

class _RecordsAutocast(Objective):
    kind = "decoder"

    def __init__(self):
        self.seen = []

    def predict(self, model, examples, device):
        self.seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return [e.label for e in examples]


def test_evaluation_runs_under_the_training_autocast():
    objective = _RecordsAutocast()
    acc = make_accelerator(RunConfig(tasks=["x"], device="cpu", mixed_precision="bf16"))
    assert evaluate(objective, torch.nn.Linear(1, 1), EXAMPLES, 2, acc, progress=False)[0] == 100.0
    assert objective.seen == [True, True]
    make_accelerator(RunConfig(tasks=["x"], device="cpu"))  # leave the default state behind


# ------------------------------------------------------------------------------------------- option checks

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
@pytest.mark.parametrize("changes, option", [
    ({"load_in_4bit": True}, "load_in_4bit"),
    ({"load_in_8bit": True}, "load_in_8bit"),
    ({"device": "cuda"}, "device"),
    ({"device": "cuda:1"}, "device"),
    ({"attn_implementation": "flash_attention_2"}, "attn_implementation"),
])
def test_what_this_machine_cannot_run_is_refused_before_anything_is_written(tmp_path, synthetic_dir, changes,
                                                                            option):
    config = RunConfig(model="tiny-llama" if "load_in" not in option else str(tmp_path / "saved-model"),
                       tasks=["harbor"], data_dir=str(synthetic_dir), output_dir=str(tmp_path / "run"), **changes)
    with pytest.raises(NloraError, match=f"option '{option}'"):
        check_runtime(config)
    with pytest.raises(NloraError, match=f"option '{option}'"):
        run(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_cuda_index_under_several_processes_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NloraError, match="option 'device': cuda:1 names one GPU, but 2 processes"):
        check_runtime(RunConfig(tasks=["x"], device="cuda:1"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_runtime(RunConfig(tasks=["x"], device="cuda:1"))  # one process: honoured (set as the current device)
    with pytest.raises(NloraError, match="this machine has 2 CUDA device"):
        check_runtime(RunConfig(tasks=["x"], device="cuda:2"))


@pytest.mark.parametrize("changes, message", [
    ({"load_in_4bit": True, "load_in_8bit": True}, "option 'load_in_8bit': excludes option 'load_in_4bit'"),
    ({"load_in_4bit": True, "model": "tiny-llama"}, "option 'load_in_4bit': the built-in 'tiny-llama'"),
    ({"dtype": "float64"}, "option 'dtype': 'float64' is not one of"),
    ({"attn_implementation": "flash"}, "option 'attn_implementation'"),
])
def test_option_combinations_are_validated(changes, message):
    with pytest.raises(NloraError, match=message):
        RunConfig(tasks=["x"], **changes).validate()


def test_float16_on_t5_warns():
    with pytest.warns(UserWarning, match="option 'dtype': float16 weights on a seq2seq"):
        warn_precision("seq2seq", "float16", "no")
    with pytest.warns(UserWarning, match="option 'mixed_precision': fp16"):
        warn_precision("seq2seq", "float32", "fp16")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_precision("decoder", "float16", "fp16")
        warn_precision("seq2seq", "bfloat16", "bf16")


def test_run_records_the_resolved_precision_and_trains_a_bf16_base(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    metrics = run(RunConfig(model="tiny-llama", tasks=["harbor"], data_dir=str(synthetic_dir), output_dir=str(out),
                            max_train_samples=8, max_eval_samples=4, batch_size=4, dtype="bfloat16",
                            gradient_checkpointing=True, eval_mode="score", device="cpu"), progress=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dtype"] == "bfloat16" and saved["attn_implementation"] == "sdpa"
    assert saved["gradient_checkpointing"] is True
    assert metrics["complete"] and metrics["train"]["harbor"]["steps"] == 2
    # bf16: the frozen adapters fold as a past path (no merge into a bf16 weight); `nlora predict` rebuilds the
    # run's bf16 base and fold, and gives the predictions the run wrote
    assert metrics["fold_form"] == "concat"
    adapters, _ = load_model(read_run(out))
    assert adapters.fold_form == "concat" and adapters.base_model.dtype == torch.bfloat16
    rows = predict_run(out, tasks=["harbor"], output=tmp_path / "p.jsonl", progress=False)
    written = [json.loads(line) for line in (out / "predictions" / "0-harbor" / "harbor.jsonl").open()]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in written] and len(rows) == 4
    auto = run(RunConfig(model="tiny-llama", tasks=["harbor"], data_dir=str(synthetic_dir),
                         output_dir=str(tmp_path / "auto"), max_train_samples=4, max_eval_samples=2, batch_size=4,
                         device="cpu"), progress=False)
    assert auto["complete"]
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["dtype"] == "float32"  # CPU


def test_eval_batch_size_is_global():
    lengths = [5, 1, 4, 2, 3, 6, 7]
    assert eval_batches(lengths, 4, 0, 1) == [[1, 3, 4, 2], [0, 5, 6]]
    # two processes: each predicts 2 at once; together they cover every example once
    parts = [eval_batches(lengths, 4, rank, 2) for rank in (0, 1)]
    assert parts == [[[1, 3], [0, 5]], [[4, 2], [6]]]
    assert sorted(i for part in parts for batch in part for i in batch) == list(range(7))
    # sampled decoding: the single-process batches, shared out whole, so that each draws the same samples
    whole = [eval_batches(lengths, 4, rank, 2, whole=True) for rank in (0, 1)]
    assert whole == [[[1, 3, 4, 2]], [[0, 5, 6]]]


@pytest.mark.parametrize("recipe", ["decoder-7b-80gb.yaml", "decoder-7b-4bit-24gb.yaml"])
def test_recipes_combine_with_a_preset(recipe):
    from pathlib import Path

    from nlora.config import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "recipes" / recipe
    config = load_config(path, {"benchmark": "long", "order": 4, "model": "meta-llama/Llama-2-7b-hf"}).validate()
    assert config.batch_size * config.gradient_accumulation_steps == 32  # the preset's examples per step
    assert config.penalty_form == "reference" and len(config.tasks) == 15  # the preset's keys stay
    assert config.dtype == "bfloat16"


def test_a_saved_model_loads_in_the_dtype_with_the_attention_kernel(tmp_path):
    tiny = load_backbone("tiny-llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    for dtype, expected in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        bb = load_backbone(str(tmp_path), dtype=dtype, device="cpu", attn_implementation="eager",
                           gradient_checkpointing=True)
        assert {p.dtype for p in bb.model.parameters()} == {expected}
        assert bb.attn_implementation == "eager" and bb.model.is_gradient_checkpointing
        for p, q in zip(bb.model.parameters(), tiny.model.parameters()):
            assert torch.equal(p, q.to(expected))


def test_memory_benchmark_counts_weight_copies_and_checkpointed_inputs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = dict(model="tiny", autocast=False, prompt=16)
    results = [bench.measure({**row, "dtype": "float32", "checkpointing": False}),
               bench.measure({**row, "dtype": "float32", "autocast": True, "checkpointing": False}),
               bench.measure({**row, "dtype": "bfloat16", "checkpointing": False}),
               bench.measure({**row, "dtype": "bfloat16", "checkpointing": True}),
               bench.measure({**row, "dtype": "bfloat16", "checkpointing": False, "prompt": 8})]
    fp32, autocast, bf16, ckpt, short = results
    assert autocast["saved_wcopy"] > 0 and fp32["saved_wcopy"] == bf16["saved_wcopy"] == 0
    assert sum(fp32["params_base"].values()) == 2 * bf16["params_base"]["bfloat16"]
    assert bf16["params_lora"].keys() == {"float32"}
    assert 0 < ckpt["saved_activation"] < bf16["saved_activation"]
    assert short["logits"] == bf16["logits"] < bf16["full_logits"]
    checks = dict(bench.check_targets(results))
    assert all(ok for text, ok in checks.items() if "halve" in text or "logits" in text or "weight copy" in text)
    assert "tiny |" in bench.table(results)
