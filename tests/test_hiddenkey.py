"""HiddenKey (nlora.train.hiddenkey, option dropout_scheme hiddenkey): DropKey's attention against a brute-force
softmax over each row's kept keys, its drops whole key columns and HiddenCut drops block outputs element-wise (and
each only there), the bidirectional KL against its formula, evaluation unchanged on T5, LLaMA and BERT, every option
acting on a run, a base it cannot reach refused, and a killed run resuming to the same bytes."""

import math
import os
import signal

import pytest
import torch

import fresh_process
from nlora.cli import main
from nlora.errors import NloraError
from nlora.models import load_backbone
from nlora.objectives import StepOutputs
from nlora.train.hiddenkey import HiddenKey, attention_blocks, bidirectional_kl, check_base, dropkey_attention
from nlora.train.loop import _second_pass
from same_run import outcome

fresh_process.start()

MODELS = ("tiny-t5", "tiny-llama", "tiny-bert")


def _without_dropout(model):
    """The tiny bases' own dropouts off (modules, and T5's attention rate, a float), so only the scheme drops."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model


def _inputs(name):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding
    kw = {"input_ids": ids, "attention_mask": mask}
    if name == "tiny-t5":
        kw["labels"] = torch.randint(3, 200, (2, 5), generator=g)
    return kw


def _out(model, kw):
    out = model(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ------------------------------------------------------------------------------------------------- DropKey

def _brute_attention(q, k, v, permitted, keep, scaling):
    """Row by row: softmax of the scaled logits over the permitted keys the keep mask leaves (all permitted keys
    if it leaves none), then the weighted sum of the values."""
    b, h, n, d = q.shape
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                allowed = [j for j in range(k.shape[2]) if permitted[bi, 0, i, j]]
                kept = [j for j in allowed if keep[bi, hi, 0, j]] or allowed
                s = [float(q[bi, hi, i] @ k[bi, hi, j]) * scaling for j in kept]
                top = max(s)
                w = [math.exp(x - top) for x in s]
                total = sum(w)
                for weight, j in zip(w, kept):
                    out[bi, i, hi] += weight / total * v[bi, hi, j].double()
    return out


class _Attention(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "causal"])
@pytest.mark.parametrize("rate", [0.0, 0.4, 0.9])
def test_dropkey_attention_is_a_softmax_over_the_kept_keys(mask_kind, rate):
    torch.manual_seed(3)
    b, h, n, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    permitted = torch.ones(b, 1, n, n, dtype=torch.bool).tril()
    permitted[1, :, :, 3:] = False  # padding of the second example
    permitted[1, :, 3:, 0] = True  # rows with no allowed key but one
    if mask_kind == "bool":
        mask = permitted
    elif mask_kind == "additive":
        mask = torch.zeros(b, 1, n, n).masked_fill(~permitted, torch.finfo(torch.float32).min)
    else:  # sdpa's None with a causal module: the causal pattern alone
        mask, permitted = None, torch.ones(b, 1, n, n, dtype=torch.bool).tril()
    torch.manual_seed(7)
    out, weights = dropkey_attention(_Attention(), q, k, v, mask, rate, scaling=0.5)
    torch.manual_seed(7)
    keep = torch.rand(b, h, 1, n) >= rate  # the draw the function makes
    expected = _brute_attention(q, k, v, permitted, keep, 0.5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert out.shape == (b, n, h, d) and weights.shape == (b, h, n, n)


@pytest.mark.parametrize("name", MODELS)
def test_dropkey_drops_whole_key_columns_and_hiddencut_elements_of_block_outputs(name):
    model = _without_dropout(load_backbone(name).model)
    kw = _inputs(name)
    blocks = attention_blocks(model)
    attentions = [m for m in model.modules() if type(m).__name__ in ("T5Attention", "LlamaAttention",
                                                                    "BertSelfAttention")]
    assert blocks and attentions
    raw, dropped, weights = [], [], []

    def first(output):
        return output if isinstance(output, torch.Tensor) else output[0]
    hooks = [b.register_forward_hook(lambda m, a, o: raw.append(first(o).detach())) for b in blocks]
    scheme = HiddenKey(model, key_rate=0.0, hidden_rate=0.0, kl_weight=1.0)
    hooks += [b.register_forward_hook(lambda m, a, o: dropped.append(first(o).detach())) for b in blocks]
    hooks += [m.register_forward_hook(lambda m, a, o: weights.append(o[-1].detach())) for m in attentions]
    model.train()
    _out(model, kw)
    permitted = [w > 0 for w in weights]  # what the model's own mask allows (masked weights underflow to 0)
    raw.clear(), dropped.clear(), weights.clear()
    scheme.key_rate = 0.5
    torch.manual_seed(0)
    _out(model, kw)
    # DropKey only: block outputs untouched; in each head a dropped key is dropped for every query that may see
    # it (a row whose allowed keys are all dropped keeps them)
    assert all(torch.equal(r, d) for r, d in zip(raw, dropped))
    shares = []
    for w, allowed in zip(weights, permitted):
        zero = (w == 0) & allowed
        columns = zero.any(-2, keepdim=True)  # (batch, heads, 1, keys): the keys dropped somewhere
        expected = columns & allowed
        fallback = (expected == allowed).all(-1, keepdim=True) & ~zero.any(-1, keepdim=True)
        assert torch.equal(zero | (fallback & allowed), expected)
        shares.append(columns.float().mean().item())
    assert 0.3 < sum(shares) / len(shares) < 0.7  # rate 0.5 of the keys
    # HiddenCut only: the block outputs, element-wise, kept ones scaled by 1 / (1 - rate); no key dropped
    raw.clear(), dropped.clear(), weights.clear()
    scheme.key_rate, scheme.hidden_rate = 0.0, 0.3
    _out(model, kw)
    for r, d in zip(raw, dropped):
        kept = d != 0
        torch.testing.assert_close(d[kept], r[kept] / 0.7)
        assert 0.2 < (~kept).float().mean() < 0.4
    assert all(torch.equal(w > 0, allowed) for w, allowed in zip(weights, permitted))  # no key dropped
    for h in hooks:
        h.remove()
    scheme.close()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_evaluation_is_untouched_and_rates_zero_add_nothing(name, implementation):
    model = _without_dropout(load_backbone(name, attn_implementation=implementation).model)
    kw = _inputs(name)
    model.eval()
    plain = _out(model, kw)
    model.train()
    torch.manual_seed(0)
    plain_train = _out(model, kw)
    scheme = HiddenKey(model, key_rate=0.7, hidden_rate=0.5, kl_weight=1.0)
    model.eval()
    assert torch.equal(_out(model, kw), plain)  # the original attention function, the same call
    assert scheme.attention_calls == 0
    scheme.key_rate = scheme.hidden_rate = 0.0
    model.train()
    torch.manual_seed(0)
    if implementation == "eager":  # the training path is the model's eager computation, to the bit
        assert torch.equal(_out(model, kw), plain_train)
    else:  # eager against sdpa: rounding
        torch.testing.assert_close(_out(model, kw), plain_train, atol=1e-5, rtol=1e-5)
    assert scheme.attention_calls > 0
    scheme.close()
    assert all(m.config._attn_implementation == implementation for m in model.modules() if hasattr(m, "config"))


# ------------------------------------------------------------------------------------------------- the KL

def _brute_kl(a, b):
    def probs(row):
        inside = [j for j in range(len(row)) if math.isfinite(row[j])]
        top = max(row[j] for j in inside)
        total = sum(math.exp(row[j] - top) for j in inside)
        return {j: math.exp(row[j] - top) / total for j in inside}
    out = []
    for ra, rb in zip(a.tolist(), b.tolist()):
        p, q = probs(ra), probs(rb)
        out.append((sum(p[j] * math.log(p[j] / q[j]) for j in p) + sum(q[j] * math.log(q[j] / p[j]) for j in q)) / 2)
    return torch.tensor(out, dtype=torch.float64)


def test_the_kl_is_the_mean_of_both_directions():
    torch.manual_seed(0)
    a, b = torch.randn(6, 11) * 3, torch.randn(6, 11) * 3
    a[4, 5:] = b[4, 5:] = float("-inf")  # an encoder's scores off the example's options
    torch.testing.assert_close(bidirectional_kl(a, b), _brute_kl(a, b))
    torch.testing.assert_close(bidirectional_kl(a, a), torch.zeros(6, dtype=torch.float64))


class _Objective:
    """Two fixed passes, as a model with independent drops gives them."""
    def __init__(self, passes):
        self.passes = list(passes)

    def forward(self, model, batch):
        return self.passes.pop(0)


def test_the_loss_is_the_mean_task_loss_plus_the_weighted_kl_sum():
    torch.manual_seed(0)
    labels = torch.tensor([[1, -100, 2], [0, 3, -100]])
    first, second = (StepOutputs(torch.rand(()), torch.randn(2, 3, 5), labels) for _ in range(2))
    scheme = HiddenKey.__new__(HiddenKey)
    scheme.attention_calls, scheme.kl_weight = 1, 0.7
    task, kl = _second_pass(scheme, _Objective([second]), None, {}, first)
    torch.testing.assert_close(task, (first.loss + second.loss) / 2)
    items = labels != -100
    torch.testing.assert_close(kl.double(), 0.7 * _brute_kl(first.logits[items], second.logits[items]).sum(),
                               rtol=1e-6, atol=1e-7)
    scheme.kl_weight = 0.0  # no KL: one pass, the first
    assert _second_pass(scheme, _Objective([]), None, {}, first) == (first.loss, None)
    scheme.attention_calls = 0
    with pytest.raises(NloraError, match="AttentionInterface"):
        _second_pass(scheme, _Objective([second]), None, {}, first)


# ------------------------------------------------------------------------------------------------- bases

def test_a_base_it_cannot_reach_is_refused():
    model = load_backbone("tiny-llama").model
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(NloraError, match="attn_implementation sdpa or eager"):
        check_base(model)

    class OwnAttention(torch.nn.Module):  # a model whose code does not call the registry
        def __init__(self):
            super().__init__()
            self.config = load_backbone("tiny-llama").model.config
    with pytest.raises(NloraError, match="AttentionInterface"):
        check_base(OwnAttention())


# ------------------------------------------------------------------------------------------------- runs

RUN = ["--method", "seq-lora", "--model", "tiny-llama", "--tasks", "harbor", "--max-train-samples", "8",
       "--max-eval-samples", "2", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--quiet"]
SCHEME = ["--dropout-scheme", "hiddenkey", "--hiddenkey-key-rate", "0.3", "--hiddenkey-hidden-rate", "0.2",
          "--hiddenkey-kl-weight", "1.0"]


def test_every_option_changes_the_run(tmp_path, synthetic_dir):
    from safetensors.torch import load_file

    def adapter(name, extra):
        out = tmp_path / name
        assert main(["run", *RUN, "--data-dir", str(synthetic_dir), "--output-dir", str(out), *SCHEME, *extra]) == 0
        return load_file(str(out / "adapters" / "0-harbor" / "adapter_model.safetensors"))

    base = adapter("base", [])
    for name, extra in {"none": ["--dropout-scheme", "none"], "key": ["--hiddenkey-key-rate", "0.6"],
                        "hidden": ["--hiddenkey-hidden-rate", "0.5"], "kl": ["--hiddenkey-kl-weight", "3.0"]}.items():
        other = adapter(name, extra)
        assert any(not torch.equal(base[k], other[k]) for k in base), f"option {name} changed nothing"


def test_checkpointing_recomputes_the_same_drops(tmp_path, synthetic_dir):
    """Backward's recomputation of a checkpointed layer draws the forward's masks again (the generator's state is
    kept), so the run is the run without checkpointing."""
    from safetensors.torch import load_file

    saved = []
    for extra in ([], ["--gradient-checkpointing"]):
        out = tmp_path / str(len(saved))
        assert main(["run", *RUN, "--data-dir", str(synthetic_dir), "--output-dir", str(out), *SCHEME, *extra]) == 0
        saved.append(load_file(str(out / "adapters" / "0-harbor" / "adapter_model.safetensors")))
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_a_bad_rate_is_refused_before_anything_is_written(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "bad"
    assert main(["run", *RUN, "--data-dir", str(synthetic_dir), "--output-dir", str(out), *SCHEME,
                 "--hiddenkey-hidden-rate", "1.5"]) != 0
    assert "hiddenkey_hidden_rate" in capsys.readouterr().err and not out.exists()


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, synthetic_dir):
    argv = ["run", *RUN, "--model", "tiny-t5", "--tasks", "harbor,orchard", "--checkpoint-steps", "1",
            "--log-steps", "1", "--max-target-length", "4", "--data-dir", str(synthetic_dir), *SCHEME]
    reference = tmp_path / "reference"
    assert main([*argv, "--output-dir", str(reference)]) == 0
    out = tmp_path / "run"
    killed = fresh_process.run(fresh_process.nlora_main, [*argv, "--output-dir", str(out)], log=tmp_path / "k.log",
                               env=dict(os.environ, NLORA_FAULT="train_step:3"))
    assert killed.returncode == -signal.SIGKILL, killed.output
    assert main(["resume", str(out), "--quiet"]) == 0
    assert outcome(out, log=True) == outcome(reference, log=True)
