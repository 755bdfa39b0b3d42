"""S-LoRA / SD-LoRA (nlora.methods.slora): the norm of an update from its factors, the split of a trained adapter into
a unit direction and a magnitude, the gradient of the magnitudes, against dense computations on a small model; and a
run whose model, rebuilt from its saved adapters with the declared weights, is the one it evaluated."""

import json
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from nlora import RunConfig
from nlora.adapters import ContinualAdapters
from nlora.methods import get_method
from nlora.methods.slora import update_norm

D = 6


def _method(**options):
    config = RunConfig(method="s-lora", tasks=["a", "b", "c"], **options)
    config.validate()
    return get_method("s-lora")(config)


def _toy(seed=0):
    """Two adapted layers q and v in sequence, with three adapters: two trained (random B), the third current."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(OrderedDict(q=torch.nn.Linear(D, D), act=torch.nn.Tanh(), v=torch.nn.Linear(D, D)))
    adapters = ContinualAdapters(model, "encoder", r=2, alpha=3, dropout=0.0, target_modules=["q", "v"])
    g = torch.Generator().manual_seed(seed)
    for name in ("task0", "task1", "task2"):
        adapters.add(name)
        with torch.no_grad():
            for f in adapters.factors(name):
                f.B.copy_(torch.randn(f.B.shape, generator=g))
    return model, adapters


def _split(method, adapters):
    ctx = SimpleNamespace(adapters=adapters, device=torch.device("cpu"))
    method.setup(ctx)
    method.before_task(1, ctx)
    method.before_task(2, ctx)
    return ctx


def _dense(adapters, name):
    """{layer: s·B@A} of one adapter, formed densely."""
    return {f.layer: 1.5 * f.B.detach() @ f.A.detach() for f in adapters.factors(name)}


def test_update_norm_is_the_frobenius_norm_of_the_product():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    assert update_norm(A, B, 2.5) == pytest.approx(float(torch.linalg.norm(2.5 * B @ A)), rel=1e-6)
    # the public code's ‖B‖·‖A‖ is another (larger) number
    assert float(torch.linalg.norm(B) * torch.linalg.norm(A)) > 1.05 * float(torch.linalg.norm(B @ A))


def _effective_update(module, name):
    """The update a LoRA layer adds for adapter `name` alone, read off its forward on the identity."""
    eye = torch.eye(D)
    with torch.no_grad():
        module.set_adapter([name])
        with_adapter = module(eye)
        return (with_adapter - module.base_layer(eye)).T  # (d_out, d_in)


@pytest.mark.parametrize("scope", ["task", "layer"])
def test_a_frozen_task_is_its_magnitude_times_a_unit_direction(scope):
    model, adapters = _toy()
    method = _method(slora_alpha_scope=scope)
    dense = {name: _dense(adapters, name) for name in ("task0", "task1")}
    _split(method, adapters)
    layers = dict(adapters.lora_layers())
    for name in ("task0", "task1"):
        norms = {layer: torch.linalg.norm(u) for layer, u in dense[name].items()}
        alpha = method.alphas[name].detach()
        for i, (layer, update) in enumerate(dense[name].items()):
            magnitude = alpha if scope == "task" else alpha[i]
            expected = magnitude * update / norms[layer]
            torch.testing.assert_close(_effective_update(layers[layer], name), expected, rtol=1e-5, atol=1e-6)
            assert float(torch.linalg.norm(expected)) == pytest.approx(float(magnitude), rel=1e-5)
        if scope == "layer":  # each layer's own norm: the split leaves the model as it was
            torch.testing.assert_close(alpha, torch.stack(list(norms.values())), rtol=1e-6, atol=0)
        else:  # one magnitude: the mean of the layers' norms
            assert float(alpha) == pytest.approx(float(torch.stack(list(norms.values())).mean()), rel=1e-6)
    # the current adapter is unnormalised: s·B@A
    current = _dense(adapters, "task2")
    for layer, update in current.items():
        torch.testing.assert_close(_effective_update(layers[layer], "task2"), update, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["task", "layer"])
def test_the_gradient_of_alpha_matches_the_dense_model(scope):
    model, adapters = _toy(seed=1)
    method = _method(slora_alpha_scope=scope)
    _split(method, adapters)
    with torch.no_grad():  # magnitudes away from their initial values
        for alpha in method.alphas.values():
            alpha.mul_(torch.linspace(0.5, 1.5, alpha.numel()).reshape(alpha.shape))
    adapters.activate(adapters.names, trainable="task2")
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    target = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    loss = ((model(x) - target) ** 2).sum()
    loss.backward()

    # the same model written densely: W_ℓ = W0_ℓ + Σ_i α_i · U_i,ℓ / ‖U_i,ℓ‖_F + U_current,ℓ
    updates = {name: _dense(adapters, name) for name in adapters.names}
    alphas = {name: method.alphas[name].detach().clone().requires_grad_(True) for name in ("task0", "task1")}
    layers = dict(adapters.lora_layers())

    def weight(layer, i):
        w = layers[layer].base_layer.weight.detach() + updates["task2"][layer]
        for name, alpha in alphas.items():
            u = updates[name][layer]
            w = w + (alpha if scope == "task" else alpha[i]) * u / torch.linalg.norm(u)
        return w

    q, v = sorted(layers, key=lambda n: n.endswith(".v"))
    hidden = torch.tanh(x @ weight(q, 0).T + layers[q].base_layer.bias)
    dense_loss = ((hidden @ weight(v, 1).T + layers[v].base_layer.bias - target) ** 2).sum()
    dense_loss.backward()
    torch.testing.assert_close(loss.detach(), dense_loss.detach(), rtol=1e-5, atol=1e-6)
    for name in alphas:
        torch.testing.assert_close(method.alphas[name].grad, alphas[name].grad, rtol=1e-4, atol=1e-6)
        assert method.alphas[name].grad.abs().sum() > 0
    assert set(method.parameters(2)) == {"alpha.task0", "alpha.task1"}


def test_state_loads_into_the_tensors_the_optimizer_holds():
    _, adapters = _toy()
    method = _method()
    _split(method, adapters)
    held = method.alphas["task0"]
    state = method.state_dict()
    state["tasks"][0]["alpha"] = torch.tensor(7.0)
    method.load_state_dict(state)
    assert method.alphas["task0"] is held and float(held.detach()) == 7.0
    scales = method.update_scales(2)["task0"]
    norms = method.norms["task0"]
    assert list(scales) == method.layers
    assert list(scales.values()) == pytest.approx((7.0 / norms).tolist())


def test_a_run_is_rebuilt_from_its_saved_adapters_with_the_declared_weights(tmp_path, synthetic_dir):
    from lora_reference import add_adapters

    from nlora.cli import main
    from nlora.export import read_run
    from nlora.method_state import load_state
    from nlora.models import load_backbone
    from nlora.predict import load_model
    from nlora.runner import load_tasks

    out = tmp_path / "run"
    assert main(["run", "--method", "s-lora", "--model", "tiny-t5", "--tasks", "harbor,orchard",
                 "--data-dir", str(synthetic_dir), "--max-train-samples", "8", "--max-eval-samples", "4",
                 "--batch-size", "4", "--epochs", "2", "--lr", "1e-2", "--lora-dropout", "0", "--device", "cpu",
                 "--quiet", "--output-dir", str(out)]) == 0
    (entry,) = load_state(out / "adapters" / "1-orchard")["tasks"]
    assert float(entry["alpha"]) != pytest.approx(float(entry["norm"].mean()), rel=1e-4)  # trained in task 2

    run = read_run(out)
    adapters, objective = load_model(run)
    config = run.config
    batch = objective.collate(load_tasks(config)[0].test)
    with torch.no_grad():
        logits = adapters.model(**batch).logits

    def reference(scales):
        backbone = load_backbone(config.model, config.model_kind)
        model = add_adapters(backbone.model, run.folders, scales).eval()
        with torch.no_grad():
            return model(**batch).logits

    torch.testing.assert_close(logits, reference(run.scales()), rtol=1e-4, atol=1e-5)
    assert (logits - reference(None)).abs().max() > 1e-3  # the weights matter: the plain sum is another model


    # the diagnostics measure the updates the model uses: task 1's is α · a unit direction in each of its layers
    # (‖ΔW‖_F = α·√layers), task 2's its plain s·B·A
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    first, last = diagnostics["per_task"]
    layers = len(diagnostics["layers"])
    assert first["frobenius_norm"] == pytest.approx(abs(float(entry["alpha"])) * layers ** 0.5, rel=1e-5)
    assert float(entry["alpha"]) * layers ** 0.5 != pytest.approx(float(entry["norm"].square().sum().sqrt()),
                                                                 rel=1e-3)  # not the saved adapter's own norm
    config_2 = json.loads((out / "adapters" / "1-orchard" / "adapter_config.json").read_text())
    saved = load_file(str(out / "adapters" / "1-orchard" / "adapter_model.safetensors"))
    plain = sum(float(((config_2["lora_alpha"] / config_2["r"]) * saved[key.replace("lora_A", "lora_B")]
                       @ saved[key]).square().sum()) for key in saved if "lora_A" in key)
    assert last["frobenius_norm"] == pytest.approx(plain ** 0.5, rel=1e-5)
