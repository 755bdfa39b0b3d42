"""Folding the frozen adapters into one past LoRA path: the same function as the separate adapters (logits within
float tolerance, the same predictions) on the three model kinds with 4 tasks, O-LoRA's orthogonality against the
concatenated past A, which methods fold, and a folded run that stops and resumes in-process."""


import pytest
import torch

import nlora.runner as runner
import nlora.train.loop as training
from nlora import RunConfig
from nlora.adapters import PAST, ContinualAdapters, folding
from nlora.errors import NloraError
from nlora.methods import get_method
from nlora.methods.penalties import olora_orthogonality
from nlora.models import default_target_modules, load_backbone
from nlora.objectives import make_objective
from nlora.tasks.data import load_task
from nlora.tasks.synthetic import TASK_NAMES
from nlora.train.regularization import Regularization
from same_run import outcome

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _four_random_adapters(model_name, tmp_path, dropout=0.1, form="merge"):
    """4 adapters with random A and B (B is zero at init), each saved; all 4 summed and active. `form`: the fold
    form the float32 tiny models get ("merge", the default) or the one of other bases ("concat")."""
    bb = load_backbone(model_name)
    ad = ContinualAdapters(bb.model, bb.kind, r=4, alpha=8, dropout=dropout,
                           target_modules=default_target_modules(bb.model_type), merge_fp32=form == "merge")
    folders = {}
    for t in range(4):
        name = ad.add(f"task{t}")
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for f in ad.factors(name):
                f.A.copy_(torch.randn(f.A.shape, generator=g) * 0.1)
                f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.1)
        folders[name] = ad.save(name, tmp_path / name)
    ad.model.eval()
    return bb, ad, folders


def _outputs(objective, model, examples):
    batch = objective.collate(examples)
    with torch.no_grad():
        logits = objective.scores(model, batch) if objective.kind == "encoder" else model(**batch).logits
    return logits, objective.option_log_likelihoods(model, examples, "cpu"), \
        objective.predict(model, examples, "cpu")


@pytest.mark.parametrize("form", ["merge", "concat"])
@pytest.mark.parametrize("model_name", ["tiny-t5", "tiny-llama", MINILM])
def test_folded_adapters_compute_what_the_separate_adapters_compute(tmp_path, synthetic_dir, model_name, form):
    bb, ad, folders = _four_random_adapters(model_name, tmp_path, form=form)
    examples = [e for name in TASK_NAMES for e in load_task(synthetic_dir, name).test[:3]]
    objective = make_objective(bb.kind, bb.tokenizer, 128, 8, "generate")
    ad.activate([])
    base = _outputs(objective, ad.model, examples)
    ad.activate(ad.names)
    logits, scores, predictions = _outputs(objective, ad.model, examples)
    assert not torch.allclose(logits, base[0], atol=1e-3), "the adapters must change the model for this test"
    past = [PAST] if form == "concat" else []  # merged, the base weights hold the folded tasks
    steps = [(list(folders)[:3], [*past, "task3"]), (list(folders), past)]  # past + current, then all folded
    for names, paths in steps:
        ad.fold({n: folders[n] for n in names})
        ad.activate(ad.names)
        assert ad.fold_form == form and ad.lora_paths(ad.names) == paths
        if paths:
            assert list(ad.peft_model.base_model.active_adapters) == paths
        assert set(ad.peft_model.peft_config) == {PAST, "task3"} - set(names)
        folded = _outputs(objective, ad.model, examples)
        torch.testing.assert_close(folded[0], logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.tensor(folded[1]), torch.tensor(scores), rtol=1e-4, atol=1e-4)
        assert folded[2] == predictions


def test_past_path_is_the_concatenation_without_dropout(tmp_path):
    bb, ad, folders = _four_random_adapters("tiny-bert", tmp_path, form="concat")
    separate = {f"task{t}": {f.layer: (f.A.detach().clone(), f.B.detach().clone(), f.scaling)
                             for f in ad.factors(f"task{t}")} for t in range(4)}
    rng = torch.get_rng_state()
    ad.fold(folders)
    assert torch.equal(torch.get_rng_state(), rng), "folding must not move the RNG (training draws from it)"
    for name, layer in ad.lora_layers():
        assert isinstance(layer.lora_dropout[PAST], torch.nn.Identity) and layer.scaling[PAST] == 1.0
        A, B = layer.lora_A[PAST].weight, layer.lora_B[PAST].weight
        assert A.shape == (16, layer.in_features) and not A.requires_grad and not B.requires_grad
        expected = sum(s * Bs @ As for As, Bs, s in (separate[f"task{t}"][name] for t in range(4)))
        torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="folded"):
        ad.factors("task0")
    with pytest.raises(NloraError, match="folded into one path"):
        ad.activate(["task1"])


def _base_weights(ad):
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in ad.lora_layers()}


def test_merge_adds_each_task_into_the_float32_base_once_in_task_order(tmp_path):
    bb, ad, folders = _four_random_adapters("tiny-bert", tmp_path)
    before = _base_weights(ad)
    updates = {f"task{t}": {f.layer: (f.scaling * f.B.double() @ f.A.double()).detach() for f in
                            ad.factors(f"task{t}")} for t in range(4)}
    ad.fold({n: folders[n] for n in list(folders)[:2]})  # as a run folds: after task 2, then after task 4
    ad.fold(folders)
    after = _base_weights(ad)
    for name, w in after.items():
        expected = before[name].double() + sum(updates[f"task{t}"][name] for t in range(4))
        assert not torch.equal(w, before[name])
        torch.testing.assert_close(w.double(), expected, rtol=0, atol=4 * 2 ** -24 * float(expected.abs().max()))
    # a resumed run folds them all at once into a fresh base: the very same bits
    _, fresh, _ = _four_random_adapters("tiny-bert", tmp_path / "again")
    fresh.fold(folders)
    assert all(torch.equal(w, after[name]) for name, w in _base_weights(fresh).items())
    assert fresh.lora_paths(fresh.names) == [] and fresh.past_factors()  # the past A's stay for O-LoRA
    with pytest.raises(NloraError, match="merged into the base weights"):
        fresh.activate([])
    with pytest.raises(NloraError, match="folded into one path"):
        fresh.activate(["task1"])


def test_merge_only_into_float32_base_weights(tmp_path):
    bb, ad, folders = _four_random_adapters("tiny-bert", tmp_path)
    for _, layer in ad.lora_layers():
        layer.get_base_layer().to(torch.bfloat16)  # a bf16 base: the update would round into the weight
    ad.fold(folders)
    assert ad.fold_form == "concat" and ad.lora_paths(ad.names) == [PAST]


@pytest.mark.parametrize("form", ["merge", "concat"])
def test_orthogonality_against_the_past_A_equals_the_sum_over_earlier_tasks(tmp_path, form):
    bb, ad, folders = _four_random_adapters("tiny-bert", tmp_path, form=form)
    ad.add("task4")
    current = ad.factors("task4")
    with torch.no_grad():
        for f in current:
            f.A.copy_(torch.randn(f.A.shape, generator=torch.Generator().manual_seed(9)))
    # brute force: every earlier task's A_s separately, Σ_s Σ_ij |(A_s A_tᵀ)_ij|
    reference = {f.layer: sum(sum(abs(float(x)) for x in (g.A @ f.A.T).detach().flatten())
                              for t in range(4) for g in ad.factors(f"task{t}") if g.layer == f.layer)
                 for f in current}
    def earlier_A():  # what the in-forward regulariser hands O-LoRA's term: the layer's other adapters' A
        reg = Regularization(ad.model, "task4", [])
        return {name: reg.layer_factors(name, module).earlier_A for name, module in ad.lora_layers()}

    unfolded = earlier_A()
    ad.fold(folders)
    folded = earlier_A()
    for f in current:
        assert len(unfolded[f.layer]) == 4 and len(folded[f.layer]) == 1
        assert folded[f.layer][0].shape == (16, f.A.shape[1])
        assert torch.equal(folded[f.layer][0], torch.cat(unfolded[f.layer]))
        assert olora_orthogonality(f.A, folded[f.layer]).item() == pytest.approx(reference[f.layer], rel=1e-5)
    assert ad.past_factors() and all(p.A is folded[p.layer][0] for p in ad.past_factors())


@pytest.mark.parametrize("method,extra,folds", [
    ("n-lora", {}, True), ("o-lora", {}, True), ("inc-lora", {}, True),
    ("replay", {"replay_base": "inc-lora"}, True), ("n-lora", {"fold_adapters": False}, False),
    ("per-task", {}, False), ("seq-lora", {}, False), ("mtl", {}, False), ("replay", {}, False),
])
def test_which_runs_fold(method, extra, folds):
    config = RunConfig(method=method, tasks=["a"], **extra)
    assert folding(get_method(method)(config), config) is folds


def _config(tmp_path, synthetic_dir, out, **kw):
    return RunConfig(**{**dict(
        model="tiny-bert", method="o-lora", tasks=list(TASK_NAMES), data_dir=str(synthetic_dir),
        output_dir=str(tmp_path / out), max_train_samples=8, max_eval_samples=4, batch_size=4, eval_batch_size=8,
        epochs=2, lr=5e-3, device="cpu", l2_lambda=0.01, checkpoint_steps=2), **kw})


def _outcome(run_dir):
    """metrics.json without its timings, and the bytes of the adapters and predictions (tests/same_run.py)."""
    found = outcome(run_dir)
    return found["metrics"], found["files"]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def folded_reference(tmp_path_factory, synthetic_dir):
    root = tmp_path_factory.mktemp("folded")
    runner.run(_config(root, synthetic_dir, "ref"), progress=False)
    return _outcome(root / "ref")


@pytest.mark.parametrize("event,nth", [("task_trained", 2), ("train_step", 11)])
def test_folded_run_stopped_and_resumed_ends_the_same(tmp_path, synthetic_dir, monkeypatch, folded_reference,
                                                      event, nth):
    """Stopped after task 2 was saved (the past path is rebuilt from the files on resume), or mid-task 3 after
    a checkpoint (tasks 1-2 folded, the current adapter from the checkpoint)."""
    seen = {"n": 0}
    real = runner.fault_point

    def stop_at(name):
        if name == event:
            seen["n"] += 1
            if seen["n"] == nth:
                raise Stop
        real(name)

    monkeypatch.setattr(runner, "fault_point", stop_at)
    monkeypatch.setattr(training, "fault_point", stop_at)
    config = _config(tmp_path, synthetic_dir, "run")
    with pytest.raises(Stop):
        runner.run(config, progress=False)
    monkeypatch.setattr(runner, "fault_point", real)
    monkeypatch.setattr(training, "fault_point", real)
    runner.run(config, progress=False, resume=True)
    metrics, files = _outcome(tmp_path / "run")
    assert metrics == folded_reference[0] and files == folded_reference[1]


def test_folded_and_unfolded_runs_agree_without_dropout(tmp_path, synthetic_dir):
    """With lora_dropout 0 folding changes nothing but rounding: same accuracy matrix, adapters within 1e-5."""
    outcomes = []
    for fold in (True, False):
        runner.run(_config(tmp_path, synthetic_dir, f"fold-{fold}", lora_dropout=0.0, fold_adapters=fold,
                           epochs=1), progress=False)
        outcomes.append(_outcome(tmp_path / f"fold-{fold}"))
    (m_fold, f_fold), (m_sep, f_sep) = outcomes
    assert m_fold["accuracy_matrix"] == m_sep["accuracy_matrix"]
    assert m_fold["train"].keys() == m_sep["train"].keys()
    for task in m_fold["train"]:
        assert m_fold["train"][task]["mean_loss"] == pytest.approx(m_sep["train"][task]["mean_loss"], rel=1e-5)
    from safetensors.torch import load

    adapters = [k for k in f_fold if k.startswith("adapters/")]
    assert len(adapters) == 4 and adapters == [k for k in f_sep if k.startswith("adapters/")]
    for key in adapters:
        a, b = load(f_fold[key]), load(f_sep[key])
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_a_damaged_adapter_file_is_named_and_nothing_is_folded(tmp_path):
    bb, ad, folders = _four_random_adapters("tiny-bert", tmp_path)
    (folders["task2"] / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NloraError, match=f"adapter {folders['task2']} is unreadable"):
        ad.fold(folders)
    assert ad.folded == [] and set(ad.peft_model.peft_config) == set(folders)
