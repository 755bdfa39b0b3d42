"""The in-forward regularisers (nlora.train.regularization) by value and by gradient.

Values: for each phase, the collected regulariser equals λ_k · Σ over the layers of the chosen form of the
*current* adapter's factors, computed here independently in float64 from the saved factors and the LoRA config
(not from the code under test). Gradients: the gradient the mechanism produces equals plain autograd of
(task loss + regulariser) written out by hand, also with a scaled loss and with gradient checkpointing,
reentrant or not (which recomputes each layer's forward during backward)."""

from __future__ import annotations

import pytest
import torch

from nlora.adapters import ContinualAdapters
from nlora.config import RunConfig
from nlora.methods import get_method
from nlora.models import load_backbone
from nlora.objectives import make_objective
from nlora.tasks.data import Example
from nlora.train.regularization import LossTerm, Regularization

R, ALPHA = 4, 8.0
S = ALPHA / R
TARGETS = {"tiny-llama": ["q_proj", "v_proj"], "tiny-t5": ["q", "v"], "tiny-bert": ["query", "value"]}
N_LAYERS = {"tiny-llama": 2 * 2, "tiny-t5": 3 * 2 * 2, "tiny-bert": 2 * 2}  # adapted linear layers


def _randomize(adapters, name, seed):
    """Non-zero B (PEFT starts it at 0, where the L1 subgradient vanishes) and a fresh A."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in adapters.factors(name):
            f.A.copy_(torch.randn(f.A.shape, generator=g) * 0.3)
            f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.3)


def _build(model="tiny-llama", n_adapters=1, seed=0):
    torch.manual_seed(seed)
    bb = load_backbone(model)
    ad = ContinualAdapters(bb.model, bb.kind, r=R, alpha=ALPHA, dropout=0.0, target_modules=TARGETS[model])
    for k in range(n_adapters):
        ad.add(f"task{k}")
        _randomize(ad, f"task{k}", seed * 100 + k)
    return bb, ad


def _examples(n=3):
    labels = ["yes", "no", "maybe"]
    return [Example(task="t", sentence=f"s{i}", label=labels[i % 3], options=tuple(labels),
                    prompt=f"question number {i} about apples and pears: answer")
            for i in range(n)]


class _SameDropout:
    """The objective with the RNG reseeded before every loss: the base models' own dropout (train mode) then
    draws the same masks in every forward, so two forwards are comparable."""

    def __init__(self, objective):
        self.objective = objective

    def loss(self, model, batch):
        torch.manual_seed(1234)
        return self.objective.loss(model, batch)


def _batch(bb):
    objective = make_objective(bb.kind, bb.tokenizer, 64, 8)
    return _SameDropout(objective), objective.collate(_examples())


def _layer_factors(ad, name):
    """{layer: (A, B)} of adapter `name` in float64, read from the modules' weights."""
    return {f.layer: (f.A.detach().double(), f.B.detach().double()) for f in ad.factors(name)}


def _expected_l1(form, A, B):
    if form == "delta":
        return (S * B @ A).abs().sum()
    if form == "reference":  # the public code: unscaled r x r product
        return (A @ B).abs().sum()
    return A.abs().sum() + B.abs().sum()


def _collected(ad, method, k, bb):
    objective, batch = _batch(bb)
    with Regularization(ad.model, ad.current, method.loss_terms(k)) as reg:
        ad.model.train()
        loss = objective.loss(ad.model, batch)
        values = reg.collect()
        reg.anchor(loss).backward()
    return {key: v.item() for key, v in values.items()}


# -------------------------------------------------------------------------------------------- by value

@pytest.mark.parametrize("form,chunk", [("delta", 1), ("delta", 3), ("delta", 1024), ("reference", 1024),
                                        ("factors", 1024)])
def test_nlora_regulariser_by_value_for_each_phase(form, chunk):
    lambdas = [0.3, 0.0, 2.5]
    config = RunConfig(tasks=["a", "b", "c"], method="n-lora", penalty_form=form, penalty_chunk_size=chunk,
                       lambda_per_task=lambdas)
    method = get_method("n-lora")(config)
    bb, ad = _build(n_adapters=0)
    for k in range(3):
        ad.add(f"task{k}")  # the phase's new adapter
        _randomize(ad, f"task{k}", 10 + k)
        values = _collected(ad, method, k, bb)
        layers = _layer_factors(ad, f"task{k}")
        assert len(layers) == N_LAYERS["tiny-llama"]
        expected = lambdas[k] * sum(_expected_l1(form, A, B) for A, B in layers.values()).item()
        if lambdas[k] == 0:
            assert values == {}
        else:
            assert values.keys() == {"l1"}
            assert values["l1"] == pytest.approx(expected, rel=1e-5)
            # not the earlier adapters' factors: a different value
            earlier = lambdas[k] * sum(_expected_l1(form, A, B) for A, B in _layer_factors(ad, "task0").values())
            assert k == 0 or abs(values["l1"] - earlier.item()) > 1e-3 * expected


def test_nlora_single_lambda_and_default_chunking():
    config = RunConfig(tasks=["a", "b"], method="n-lora", penalty_form="delta", penalty_chunk_size=None,
                       lambda_=0.7)
    method = get_method("n-lora")(config)
    bb, ad = _build(n_adapters=2)
    values = _collected(ad, method, 1, bb)
    expected = 0.7 * sum(_expected_l1("delta", A, B) for A, B in _layer_factors(ad, "task1").values())
    assert values["l1"] == pytest.approx(expected.item(), rel=1e-5)


def test_olora_regulariser_by_value_against_every_earlier_A():
    config = RunConfig(tasks=["a", "b", "c", "d"], method="o-lora", orth_lambda=0.6, l2_lambda=0.05)
    method = get_method("o-lora")(config)
    bb, ad = _build(n_adapters=0)
    for k in range(4):
        ad.add(f"task{k}")
        _randomize(ad, f"task{k}", 20 + k)
        values = _collected(ad, method, k, bb)
        current = _layer_factors(ad, f"task{k}")
        earlier = [_layer_factors(ad, f"task{s}") for s in range(k)]
        l2 = 0.05 * sum((A ** 2).sum() + (B ** 2).sum() for A, B in current.values())
        assert values["l2"] == pytest.approx(l2.item(), rel=1e-5)
        if k == 0:
            assert "orthogonality" not in values
            continue
        # Σ_layers Σ_{s<k} Σ_ij |(A_s A_kᵀ)_ij| with explicit loops over the earlier tasks
        orth = 0.0
        for layer, (A, _) in current.items():
            for past in earlier:
                orth += (past[layer][0] @ A.T).abs().sum().item()
        assert values["orthogonality"] == pytest.approx(0.6 * orth, rel=1e-5)


def test_olora_term_reads_a_concatenated_past_adapter_the_same():
    """A folded layout (one "past" adapter of rank r·k holding the earlier A's) gives the same orthogonality."""
    from nlora.methods.penalties import olora_orthogonality
    from nlora.train.regularization import LayerFactors

    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 9, generator=g, dtype=torch.float64)
    earlier = [torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    method = get_method("o-lora")(RunConfig(tasks=["a", "b"], method="o-lora", orth_lambda=1.0))
    term = next(t for t in method.loss_terms(1) if t.name == "orthogonality")
    separate = term.per_layer(LayerFactors("l", A, A.T, 1.0, earlier))
    folded = term.per_layer(LayerFactors("l", A, A.T, 1.0, [torch.cat(earlier)]))
    torch.testing.assert_close(separate, folded)
    torch.testing.assert_close(separate, olora_orthogonality(A, earlier))


def test_methods_without_regulariser_install_nothing():
    bb, ad = _build(n_adapters=2)
    for name in ("inc-lora", "seq-lora", "replay", "per-task", "mtl"):
        method = get_method(name)(RunConfig(tasks=["a", "b"], method=name))
        assert method.loss_terms(1) == []
        with Regularization(ad.model, ad.current, method.loss_terms(1)) as reg:
            assert not reg.active
            assert _collected(ad, method, 1, bb) == {}


# -------------------------------------------------------------------------------------------- gradients

def _plain_penalty(ad, name, lam, form="delta"):
    """λ Σ_layers form(A, B), by plain autograd on the parameters (dense ΔW for delta)."""
    terms = []
    for f in ad.factors(name):
        if form == "delta":
            terms.append((f.scaling * f.B @ f.A).abs().sum())
        else:
            terms.append(f.A.abs().sum() + f.B.abs().sum())
    return lam * torch.stack(terms).sum()


def _grads(ad, name):
    return {f.layer: (f.A.grad.detach().clone(), f.B.grad.detach().clone()) for f in ad.factors(name)}


def _zero(ad):
    for p in ad.trainable_parameters():
        p.grad = None


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5", "tiny-bert"])
def test_in_forward_gradient_equals_plain_autograd(model):
    lam = 0.05
    bb, ad = _build(model, n_adapters=2, seed=3)
    objective, batch = _batch(bb)
    ad.model.train()
    method = get_method("n-lora")(RunConfig(tasks=["a", "b"], method="n-lora", lambda_=lam, penalty_chunk_size=5))

    (objective.loss(ad.model, batch) + _plain_penalty(ad, "task1", lam)).backward()
    plain = _grads(ad, "task1")
    _zero(ad)
    with Regularization(ad.model, "task1", method.loss_terms(1)) as reg:
        loss = objective.loss(ad.model, batch)
        value = reg.collect()["l1"]
        reg.anchor(loss).backward()
    torch.testing.assert_close(value, _plain_penalty(ad, "task1", lam).detach(), rtol=1e-5, atol=0)
    mine = _grads(ad, "task1")
    assert len(mine) == N_LAYERS[model]
    for layer in plain:
        for got, want in zip(mine[layer], plain[layer]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for f in ad.factors("task0") for p in (f.A, f.B)), "frozen adapters get nothing"
    # the penalty's share of the gradient is not negligible here, so a dropped or doubled term would show
    _zero(ad)
    objective.loss(ad.model, batch).backward()
    task_only = _grads(ad, "task1")
    assert any((plain[k][1] - task_only[k][1]).abs().max() > 1e-3 * plain[k][1].abs().max() for k in plain)


def test_loss_scale_reaches_the_term():
    """anchor(loss) under backward of c·loss gives the term the gradient c (loss scaling by accelerate or a
    gradient scaler), as the task."""
    lam = 0.1
    bb, ad = _build("tiny-llama", n_adapters=1, seed=4)
    objective, batch = _batch(bb)
    ad.model.train()
    c = 3.0
    (c * (objective.loss(ad.model, batch) + _plain_penalty(ad, "task0", lam))).backward()
    plain = _grads(ad, "task0")
    _zero(ad)
    terms = [LossTerm("l1", lam, lambda f: (f.scaling * f.B @ f.A).abs().sum())]
    with Regularization(ad.model, "task0", terms) as reg:
        loss = objective.loss(ad.model, batch)
        (c * reg.anchor(loss)).backward()
    for layer, (gA, gB) in _grads(ad, "task0").items():
        torch.testing.assert_close(gA, plain[layer][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gB, plain[layer][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_values_and_gradients_once(reentrant):
    lam = 0.05
    bb, ad = _build("tiny-llama", n_adapters=2, seed=5)
    objective, batch = _batch(bb)
    method = get_method("n-lora")(RunConfig(tasks=["a", "b"], method="n-lora", lambda_=lam, penalty_chunk_size=7))
    ad.model.train()
    (objective.loss(ad.model, batch) + _plain_penalty(ad, "task1", lam)).backward()
    plain = _grads(ad, "task1")
    expected = _plain_penalty(ad, "task1", lam).item()
    _zero(ad)

    bb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    bb.model.enable_input_require_grads()
    assert bb.model.model.gradient_checkpointing
    recomputed = []
    with Regularization(ad.model, "task1", method.loss_terms(1)) as reg:
        for _, module in ad.lora_layers():  # count the forwards of the adapted layers
            module.register_forward_hook(lambda *a: recomputed.append(torch.is_grad_enabled()))
        loss = objective.loss(ad.model, batch)
        forwards = len(recomputed)
        reg.anchor(loss).backward()
        assert len(recomputed) > forwards, "backward recomputed the checkpointed layers"
        value = reg.collect()["l1"].item()  # forward and recomputation wrote the same value, not twice
        # a second step: the forward counts restarted when the first backward ended
        loss = objective.loss(ad.model, batch)
        _zero(ad)
        reg.anchor(loss).backward()
        second = reg.collect()["l1"].item()
    assert value == pytest.approx(expected, rel=1e-5) and second == pytest.approx(expected, rel=1e-5)
    for layer, (gA, gB) in _grads(ad, "task1").items():
        torch.testing.assert_close(gA, plain[layer][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gB, plain[layer][1], rtol=1e-5, atol=1e-6)


def test_no_terms_in_evaluation_forward_and_hooks_removed():
    bb, ad = _build("tiny-llama", n_adapters=1)
    objective, batch = _batch(bb)
    method = get_method("n-lora")(RunConfig(tasks=["a"], method="n-lora", lambda_=1.0))
    reg = Regularization(ad.model, "task0", method.loss_terms(0))
    assert reg.active
    with torch.no_grad():
        objective.loss(ad.model, batch)
    assert reg.collect() == {}
    reg.close()
    assert not reg.active
    objective.loss(ad.model, batch)
    assert reg.collect() == {}
    assert all(not m._forward_hooks for _, m in ad.lora_layers())


def test_backward_from_an_unanchored_loss_is_refused():
    bb, ad = _build("tiny-llama", n_adapters=1)
    objective, batch = _batch(bb)
    method = get_method("n-lora")(RunConfig(tasks=["a"], method="n-lora", lambda_=1.0))
    with Regularization(ad.model, "task0", method.loss_terms(0)):
        with pytest.raises(RuntimeError, match="anchor"):
            objective.loss(ad.model, batch).backward()


def test_terms_keep_float32_under_autocast():
    """A bf16 autocast forward (mixed precision) does not round the regulariser: it is the float32 value."""
    lam = 0.05
    bb, ad = _build("tiny-llama", n_adapters=1, seed=6)
    objective, batch = _batch(bb)
    for form in ("delta", "reference", "factors"):
        method = get_method("n-lora")(RunConfig(tasks=["a"], method="n-lora", lambda_=lam, penalty_form=form))
        want = lam * sum(_expected_l1(form, A, B) for A, B in _layer_factors(ad, "task0").values()).item()
        with Regularization(ad.model, "task0", method.loss_terms(0)) as reg:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = objective.loss(ad.model, batch)
            reg.anchor(loss).backward()
            value = reg.collect()["l1"]
        assert value.dtype == torch.float32 and value.item() == pytest.approx(want, rel=1e-5)
        assert all(p.grad.dtype == torch.float32 for p in ad.trainable_parameters())
        _zero(ad)
