"""EWC (nlora.methods.ewc): the Fisher against per-example autograd through the model's own loss, the penalty and
its gradient against a dense computation, online accumulation, and a run where EWC must keep the parameters with a
large Fisher closer to the previous task's adapter than SeqLoRA does."""

import math
from types import SimpleNamespace

import pytest
import torch

from nlora import RunConfig
from nlora.adapters import ContinualAdapters
from nlora.cli import main
from nlora.method_state import load_state
from nlora.methods import get_method
from nlora.methods.passes import per_example_squared_gradients
from nlora.models import default_target_modules, load_backbone
from nlora.objectives import make_objective
from nlora.tasks.data import load_task
from nlora.train.regularization import LayerFactors


def _context(model_name, synthetic_dir):
    bb = load_backbone(model_name)
    adapters = ContinualAdapters(bb.model, bb.kind, r=2, alpha=4, dropout=0.0,
                                 target_modules=default_target_modules(bb.model_type))
    adapters.add("shared")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for f in adapters.factors("shared"):  # B = 0 at init would make A's gradient zero
            f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.1)
    objective = make_objective(bb.kind, bb.tokenizer, 256, 6)
    task = load_task(synthetic_dir, "harbor", max_train=5)
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    return SimpleNamespace(adapters=adapters, objective=objective, accelerator=accelerator, device="cpu",
                           tasks=[task], config=RunConfig(tasks=["harbor"]))


@pytest.mark.parametrize("model_name", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_fisher_is_the_mean_of_per_example_squared_gradients(synthetic_dir, model_name):
    ctx = _context(model_name, synthetic_dir)
    examples = ctx.tasks[0].train
    params = {f"{f.layer}/{s}": t for f in ctx.adapters.factors("shared") for s, t in (("A", f.A), ("B", f.B))}
    sums, n = per_example_squared_gradients(ctx, examples, params)
    # brute force: the model's own mean loss over one example's items, times their count, is -log p(y|x)
    model = ctx.adapters.model.eval()
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    batch_mean = {k: torch.zeros_like(p) for k, p in params.items()}
    for example in examples:
        batch = ctx.objective.collate([example])
        loss = ctx.objective.loss(model, batch) * ctx.objective.count_terms(batch)
        grads = torch.autograd.grad(loss, list(params.values()))
        for key, g in zip(params, grads):
            expected[key] += g ** 2
            batch_mean[key] += g / len(examples)
    assert n == len(examples)
    for key in params:
        torch.testing.assert_close(sums[key], expected[key], rtol=1e-4, atol=1e-10)
    # what peers compute, the squared gradient of the batch mean, is another quantity: never larger (Jensen,
    # entry by entry), smaller wherever the examples' gradients disagree
    for key in params:
        assert (batch_mean[key] ** 2 <= sums[key] / n * (1 + 1e-5) + 1e-12).all()
    assert not all(torch.allclose(batch_mean[k] ** 2, sums[k] / n) for k in params)


def _ewc(**options):
    config = RunConfig(method="ewc", tasks=["a", "b", "c"], **options)
    config.validate()
    return get_method("ewc")(config)


def test_penalty_and_gradient_match_a_dense_computation():
    method = _ewc(ewc_lambda=3.0)
    g = torch.Generator().manual_seed(1)
    F = {"A": torch.rand(2, 5, generator=g), "B": torch.rand(4, 2, generator=g)}
    star = {"A": torch.randn(2, 5, generator=g), "B": torch.randn(4, 2, generator=g)}
    method.anchors = [({"layer": F}, {"layer": star})]
    A = torch.randn(2, 5, generator=g, requires_grad=True)
    B = torch.randn(4, 2, generator=g, requires_grad=True)
    (term,) = method.loss_terms(1)
    value = term.weight * term.per_layer(LayerFactors("layer", A, B, 2.0))
    dense = 3.0 / 2 * sum(float(F[s][i].item() * (x[i].item() - star[s][i].item()) ** 2)
                          for s, x in (("A", A), ("B", B)) for i in map(tuple, torch.ones_like(F[s]).nonzero()))
    assert value.item() == pytest.approx(dense, rel=1e-5)
    value.backward()
    torch.testing.assert_close(A.grad, 3.0 * F["A"] * (A - star["A"]).detach())
    torch.testing.assert_close(B.grad, 3.0 * F["B"] * (B - star["B"]).detach())


def test_no_penalty_before_the_first_fisher():
    assert _ewc().loss_terms(0) == []


def test_online_mode_accumulates_and_keeps_one_anchor(monkeypatch):
    method = _ewc(ewc_gamma=0.5)
    fishers = iter([{"l": {"A": torch.full((1,), 2.0), "B": torch.full((1,), 4.0)}},
                    {"l": {"A": torch.full((1,), 1.0), "B": torch.full((1,), 1.0)}}])
    monkeypatch.setattr(method, "fisher", lambda ctx, k: next(fishers))
    weights = iter([1.0, 7.0])

    def ctx():
        value = next(weights)
        factors = [SimpleNamespace(layer="l", A=torch.full((1,), value), B=torch.full((1,), value))]
        return SimpleNamespace(tasks=[0, 1, 2], adapters=SimpleNamespace(current="shared",
                                                                        factors=lambda name: factors))
    method.after_task(0, ctx())
    method.after_task(1, ctx())
    (fisher, anchor), = method.anchors
    assert fisher["l"]["A"].item() == 0.5 * 2 + 1 and fisher["l"]["B"].item() == 0.5 * 4 + 1
    assert anchor["l"]["A"].item() == 7.0


def _distance_weighted(run, fisher_run):
    """Σ F (θ_after task 2 − θ_after task 1)², with the Fisher EWC took after task 1."""
    from safetensors.torch import load_file

    state = load_state(fisher_run / "adapters" / "0-harbor")
    (entry,) = state["anchors"]
    first = load_file(str(run / "adapters" / "0-harbor" / "adapter_model.safetensors"))
    second = load_file(str(run / "adapters" / "1-orchard" / "adapter_model.safetensors"))
    total = 0.0
    for key, before in first.items():
        layer = "base_model.model." + key.split(".lora_")[0].removeprefix("base_model.model.")
        side = "A" if ".lora_A." in key else "B"
        F = entry["fisher"][layer][side]
        total += float((F * (second[key] - before) ** 2).sum())
    return total


def test_ewc_keeps_what_mattered_for_the_first_task_closer_than_seq_lora(tmp_path, synthetic_dir):
    common = ["--model", "tiny-bert", "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir),
              "--max-train-samples", "16", "--max-eval-samples", "4", "--batch-size", "4", "--epochs", "2",
              "--lr", "1e-2", "--lora-dropout", "0", "--device", "cpu", "--quiet"]
    assert main(["run", "--method", "seq-lora", *common, "--output-dir", str(tmp_path / "seq")]) == 0
    assert main(["run", "--method", "ewc", "--ewc-lambda", "1000", "--ewc-samples", "16", *common,
                 "--output-dir", str(tmp_path / "ewc")]) == 0
    # the same first task (same seed): the runs part only where the penalty starts
    assert (tmp_path / "seq" / "adapters" / "0-harbor" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "ewc" / "adapters" / "0-harbor" / "adapter_model.safetensors").read_bytes()
    seq = _distance_weighted(tmp_path / "seq", tmp_path / "ewc")
    ewc = _distance_weighted(tmp_path / "ewc", tmp_path / "ewc")
    assert ewc < 0.5 * seq


def _squared_gradient_sums(ctx, examples, params):
    """Σ_i (∂ log p(y_i|x_i)/∂θ)² by plain autograd through the model's own loss, one example at a time."""
    model = ctx.adapters.model.eval()
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    for example in examples:
        batch = ctx.objective.collate([example])
        loss = ctx.objective.loss(model, batch) * ctx.objective.count_terms(batch)
        for key, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            sums[key] += g ** 2
    return sums


def _fisher_case(synthetic_dir, **options):
    ctx = _context("tiny-bert", synthetic_dir)
    config = RunConfig(method="ewc", tasks=["harbor"], ewc_samples=3, **options)
    config.validate()
    return get_method("ewc")(config), ctx


@pytest.mark.parametrize("normalize", ["none", "mean"])
def test_the_fisher_is_the_mean_over_the_seeded_draw_scaled_by_its_mean_entry(synthetic_dir, normalize):
    method, ctx = _fisher_case(synthetic_dir, ewc_normalize=normalize)
    drawn = method.fisher_examples(ctx, 0)
    assert drawn != ctx.tasks[0].train[:3]  # this seed's draw is not the first examples: the test can tell them apart
    fisher = method.fisher(ctx, 0)
    params = {(f.layer, s): t for f in ctx.adapters.factors("shared") for s, t in (("A", f.A), ("B", f.B))}
    expected = {k: total / len(drawn) for k, total in _squared_gradient_sums(ctx, drawn, params).items()}
    if normalize == "mean":  # each task's Fisher over its mean entry, over every layer and side
        mean = torch.cat([t.reshape(-1) for t in expected.values()]).mean()
        expected = {k: t / mean for k, t in expected.items()}
    for (layer, side), value in expected.items():
        torch.testing.assert_close(fisher[layer][side], value, rtol=1e-4, atol=1e-12)


def test_the_fisher_examples_are_a_draw_of_the_seed(synthetic_dir):
    ctx = _context("tiny-bert", synthetic_dir)
    train = ctx.tasks[0].train

    def draw(seed):
        config = RunConfig(method="ewc", tasks=["harbor"], ewc_samples=3, seed=seed)
        config.validate()
        return [train.index(e) for e in get_method("ewc")(config).fisher_examples(ctx, 0)]
    draws = {seed: draw(seed) for seed in range(8)}
    assert all(len(set(d)) == 3 and d == sorted(d) for d in draws.values())  # 3 distinct examples, in file order
    assert len({tuple(d) for d in draws.values()}) > 2 and draw(5) == draws[5]


def test_the_sampled_fisher_draws_each_answer_from_the_models_distribution():
    """`ewc_fisher sampled`: log p(ŷ|x) with ŷ drawn from the model's softmax (never an option it scores -inf),
    not its argmax; gold: log p(y|x)."""
    from nlora.methods.passes import sequence_log_likelihood

    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    out = SimpleNamespace(item_logits=probs.log().unsqueeze(0), item_targets=torch.tensor([1]))
    ctx = SimpleNamespace(device="cpu", objective=SimpleNamespace(collate=lambda examples: {},
                                                                  forward=lambda model, batch: out))
    assert sequence_log_likelihood(ctx, None, None, "gold").item() == pytest.approx(math.log(0.3))
    torch.manual_seed(0)
    draws = 4000
    counts = torch.zeros(4)
    for _ in range(draws):
        value = sequence_log_likelihood(ctx, None, None, "sampled").item()
        counts[(probs.log() - value).abs().argmin()] += 1
    assert counts[3] == 0
    torch.testing.assert_close(counts / draws, probs, atol=0.03, rtol=0)  # ± about 4 standard deviations
