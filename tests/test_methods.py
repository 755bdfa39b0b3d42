"""Every method end to end on a tiny model: what trains in each phase, that frozen adapters never change, on
which examples each phase trains, which adapters answer each evaluation (every task after every phase, with
eval_future), and that metrics.json is complete."""

import copy
import functools
import json

import pytest
import torch
from safetensors.torch import load_file

import nlora.runner as runner
from lora_reference import add_adapters
from nlora import RunConfig
from nlora.methods import METHODS, get_method
from nlora.models import load_backbone
from nlora.testing import builtin_methods
from nlora.train.regularization import LayerFactors

TASKS = ["harbor", "orchard", "library"]


def _lora_state(adapters):
    return {n: p.detach().clone() for n, p in adapters.model.named_parameters() if "lora_" in n}


@pytest.fixture
def traced(monkeypatch):
    """Wraps the training of each phase to record what was trainable, active and changed."""
    phases = []
    real = runner.train_task

    def wrapper(adapters, objective, method, examples, config, k, *args, **kwargs):
        before = _lora_state(adapters)
        trainable = {n for n, p in adapters.model.named_parameters() if p.requires_grad}
        active = list(adapters.peft_model.base_model.active_adapters)
        stats = real(adapters, objective, method, examples, config, k, *args, **kwargs)
        after = _lora_state(adapters)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        phases.append({"k": k, "trainable": trainable, "changed": changed, "active": active,
                       "n_examples": len(examples), "stats": stats, "adapters": adapters})
        return stats

    monkeypatch.setattr(runner, "train_task", wrapper)
    return phases


PROBE = torch.tensor([[5, 17, 80, 99, 120, 33, 1]])


def _probe(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).last_hidden_state.clone()


@pytest.fixture
def evaluations(monkeypatch):
    """What the model computes at each evaluation (hidden states of a fixed probe), in call order."""
    seen = []
    real = runner.evaluate

    def wrapper(objective, model, examples, *args, **kwargs):
        seen.append(_probe(model))
        return real(objective, model, examples, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", wrapper)
    return seen


def _expected_eval_adapters(method: str, k: int, j: int) -> list[str]:
    """The adapter folders (<phase>-<task>) whose summed updates answer task j after phase k; -1: the base."""
    if k < 0:
        return []
    if METHODS[method].adapter_layout == "snapshot" or method == "replay":  # one adapter, its state after k
        return [f"{k}-{TASKS[k]}"]
    if method == "per-task":  # the task's own adapter; a task not trained yet has none
        return [f"{j}-{TASKS[j]}"] if j <= k else []
    return [f"{i}-{TASKS[i]}" for i in range(k + 1)]


@functools.cache
def _base():
    return load_backbone("tiny-bert").model


def _check_evaluations(run_dir, method, seen, phases):
    calls = [(-1, j) for j in range(3)] + [(k, j) for k in phases for j in range(3)]
    assert len(seen) == len(calls)
    for (k, j), got in zip(calls, seen):
        folders = [run_dir / "adapters" / f for f in _expected_eval_adapters(method, k, j)]
        want = _probe(add_adapters(copy.deepcopy(_base()), folders))
        assert torch.allclose(got, want, atol=1e-5), f"{method}: evaluation of task {j} after phase {k}"


@pytest.mark.parametrize("method", builtin_methods())  # not those of an installed package
def test_active_for_eval_names_existing_adapters(method):
    """Any phase, any task (also one not trained yet): the adapters named exist."""
    m = get_method(method)(RunConfig(tasks=TASKS, method=method))
    for k in m.phases(3):
        names = list(dict.fromkeys(m.adapter_name(i) for i in range(k + 1)))  # created so far, in order
        for j in range(3):
            assert set(m.active_for_eval(k, j, names)) <= set(names)


# options that make each method's own part non-zero (only the method's own: another's is refused)
OPTIONS = {"n-lora": {"lambda_": 0.01}, "o-lora": {"l2_lambda": 0.01}, "replay": {"replay_per_task": 3}}


def _config(tmp_path, synthetic_dir, method, **kw):
    return RunConfig(model="tiny-bert", method=method, tasks=TASKS, data_dir=str(synthetic_dir),
                     output_dir=str(tmp_path / method), max_train_samples=8, max_eval_samples=4, batch_size=4,
                     eval_batch_size=8, epochs=1, lr=5e-3, device="cpu", **{**OPTIONS.get(method, {}), **kw})


def _adapter_of(name):
    return lambda n: f".{name}." in n


@pytest.mark.parametrize("method,trained_adapter,active", [
    ("inc-lora", lambda k: f"task{k}", lambda k: [f"task{i}" for i in range(k + 1)]),
    ("n-lora", lambda k: f"task{k}", lambda k: [f"task{i}" for i in range(k + 1)]),
    ("o-lora", lambda k: f"task{k}", lambda k: [f"task{i}" for i in range(k + 1)]),
    ("per-task", lambda k: f"task{k}", lambda k: [f"task{k}"]),
    ("seq-lora", lambda k: "shared", lambda k: ["shared"]),
    ("replay", lambda k: "shared", lambda k: ["shared"]),
])
def test_sequential_methods(tmp_path, synthetic_dir, traced, evaluations, method, trained_adapter, active):
    """One PEFT adapter per task (folding off)."""
    metrics = runner.run(_config(tmp_path, synthetic_dir, method, eval_future=True, fold_adapters=False),
                         progress=False)
    assert [p["k"] for p in traced] == [0, 1, 2]
    for p in traced:
        name = trained_adapter(p["k"])
        assert p["trainable"] and all(_adapter_of(name)(n) for n in p["trainable"])
        assert p["changed"] and p["changed"] <= p["trainable"], "only the current adapter may change"
        assert p["active"] == active(p["k"])
    # frozen adapters at the end of the run are bit-identical to what was saved after their own phase
    adapters = traced[-1]["adapters"]
    if METHODS[method].adapter_layout == "stacked" and method != "replay":
        final = _lora_state(adapters)
        for k, task in enumerate(TASKS):
            saved = load_file(str(tmp_path / method / "adapters" / f"{k}-{task}" / "adapter_model.safetensors"))
            for key, value in saved.items():
                assert torch.equal(final[key.replace(".weight", f".task{k}.weight")], value)
    replayed = [p["n_examples"] for p in traced]
    assert replayed == ([8, 11, 14] if method == "replay" else [8, 8, 8])
    _check_metrics(tmp_path / method, metrics, full_rows=True)
    _check_evaluations(tmp_path / method, method, evaluations, [0, 1, 2])
    regs = [p["stats"].mean_regularizer for p in traced]
    if method == "n-lora":
        assert all(r > 0 for r in regs)
    elif method == "o-lora":
        assert all(r > 0 for r in regs)  # the L2 term from phase 0, orthogonality from phase 1
    else:
        assert regs == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("method", ["n-lora", "o-lora"])
def test_folded_methods_train_only_the_current_adapter_on_the_folded_past(tmp_path, synthetic_dir, traced, method):
    metrics = runner.run(_config(tmp_path, synthetic_dir, method), progress=False)
    for p in traced:
        k = p["k"]
        assert p["trainable"] and all(_adapter_of(f"task{k}")(n) for n in p["trainable"])
        assert p["changed"] and p["changed"] <= p["trainable"]
        assert p["active"] == [f"task{k}"]  # the float32 base weights hold the earlier tasks (merge form)
    # at the end, the past adapter holds every task: the saved A's stacked, the saved B's scaled side by side
    adapters = traced[-1]["adapters"]
    assert adapters.folded == ["task0", "task1", "task2"] and adapters.fold_form == "merge"
    assert list(adapters.peft_model.peft_config) == ["past"]
    saved = [load_file(str(tmp_path / method / "adapters" / f"{k}-{t}" / "adapter_model.safetensors"))
             for k, t in enumerate(TASKS)]
    scaling = 32.0 / 8
    past = adapters.past_factors()
    assert len(past) == 4 and all(f.scaling == 1.0 and not f.A.requires_grad for f in past)
    for f in past:
        key = f.layer + ".lora_{}.weight"
        assert torch.equal(f.A, torch.cat([s[key.format("A")] for s in saved]))
        assert torch.equal(f.B, torch.cat([scaling * s[key.format("B")] for s in saved], dim=1))
    _check_metrics(tmp_path / method, metrics, full_rows=False)
    assert metrics["fold_form"] == "merge"
    assert all(p["stats"].mean_regularizer > 0 for p in traced)


def test_olora_orthogonality_enters_from_the_second_task(tmp_path, synthetic_dir, traced):
    runner.run(_config(tmp_path, synthetic_dir, "o-lora").replace(l2_lambda=0.0), progress=False)
    regs = [p["stats"].mean_regularizer for p in traced]
    assert regs[0] == 0.0 and regs[1] > 0 and regs[2] > 0


def test_olora_per_task_lambdas_epochs_and_reference_l2(tmp_path, synthetic_dir, traced):
    config = _config(tmp_path, synthetic_dir, "o-lora").replace(
        orth_lambda_per_task=[0.0, 0.0, 0.5], l2_lambda_per_task=[0.0, 0.2, 0.0], l2_form="reference",
        epochs_per_task=[1.0, 2.0, 1.0])
    method = METHODS["o-lora"](config)
    assert [method.lambdas(k) for k in range(3)] == [(0.0, 0.0), (0.0, 0.2), (0.5, 0.0)]
    runner.run(config, progress=False)
    regs = [p["stats"].mean_regularizer for p in traced]
    assert regs[0] == 0.0 and regs[1] > 0 and regs[2] > 0
    assert [p["stats"].steps for p in traced] == [2, 4, 2]  # 8 examples, batch 4; 2 epochs in phase 1
    # with phase 1's lambdas (λ₁ 0, λ₂ 0.2) the regulariser is 0.2 x Σ‖θ‖₂ over the current adapter's A and B
    g = torch.Generator().manual_seed(0)
    layers = [LayerFactors(f"layer{i}", torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 4.0)
              for i in range(3)]
    by_hand = 0.2 * sum(float(t.double().pow(2).sum()) ** 0.5 for f in layers for t in (f.A, f.B))
    value = sum(float(term.weight * term.per_layer(f)) for term in method.loss_terms(1) for f in layers)
    assert value == pytest.approx(by_hand, rel=1e-5)


def test_multitask_trains_once_on_the_union(tmp_path, synthetic_dir, traced, evaluations):
    metrics = runner.run(_config(tmp_path, synthetic_dir, "mtl", eval_future=True), progress=False)
    assert [p["k"] for p in traced] == [2] and traced[0]["n_examples"] == 24
    assert all(_adapter_of("shared")(n) for n in traced[0]["trainable"])
    R = metrics["accuracy_matrix"]
    assert R[0] == [None] * 3 and R[1] == [None] * 3 and all(x is not None for x in R[2])
    assert metrics["bwt"] is None and metrics["complete"] is True
    assert metrics["average_accuracy"] == pytest.approx(sum(R[2]) / 3)
    assert sorted(p.name for p in (tmp_path / "mtl" / "adapters").iterdir()) == ["2-library"]
    _check_evaluations(tmp_path / "mtl", "mtl", evaluations, [2])


def _check_metrics(run_dir, metrics, full_rows):
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("schema_version", "method", "model", "seed", "tasks", "accuracy_matrix", "average_accuracy",
                "bwt", "forgetting", "adapter_layout", "phases_completed", "complete"):
        assert key in on_disk, key
    assert on_disk["complete"] and on_disk["phases_completed"] == [0, 1, 2]
    R = on_disk["accuracy_matrix"]
    for i in range(3):
        for j in range(3):
            assert (R[i][j] is None) == (j > i and not full_rows)
