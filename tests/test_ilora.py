"""I-LoRA (nlora.methods.ilora): the moving-average step and the one-sided consistency against hand computations,
the consistency loss of a batch against the model's own hidden states, the reservoir buffer and the replay, and a
run in which the evaluated (stable) adapter differs from the plastic one."""

from types import SimpleNamespace

import pytest
import torch

from nlora import RunConfig
from nlora.adapters import ContinualAdapters
from nlora.methods import get_method
from nlora.methods.ilora import STABLE, ema_step, one_sided_consistency
from nlora.models import default_target_modules, load_backbone
from nlora.objectives import make_objective
from nlora.tasks.data import load_task


def _method(tasks=("a", "b", "c"), **options):
    config = RunConfig(method="i-lora", tasks=list(tasks), **options)
    config.validate()
    return get_method("i-lora")(config)


def test_the_moving_average_keeps_the_decay_of_the_stable_adapter():
    stable, plastic = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    ema_step(stable, plastic, 0.25)
    assert stable.tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]  # [2.5, 5.0]
    ema_step(stable, plastic, 1.0)  # decay 1: the stable adapter never moves
    assert stable.tolist() == [2.5, 5.0]


def test_the_consistency_is_one_sided_and_only_the_plastic_states_get_a_gradient():
    plastic = torch.tensor([[[1.0, 5.0], [0.0, 0.0]], [[2.0, 2.0], [4.0, -1.0]]], requires_grad=True)
    stable = torch.tensor([[[3.0, 2.0], [9.0, 9.0]], [[2.0, 7.0], [1.0, 1.0]]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 1]])  # the first row's second token is padding
    total, count = one_sided_consistency(plastic, stable, mask)
    # row 0: token 0 only: (1-3)² + 0 (5 ≥ 2); row 1: 0 + (2-7)² + 0 + (-1-1)²
    assert total.tolist() == [4.0, 25.0 + 4.0]
    assert count.tolist() == [2.0, 4.0]
    total.sum().backward()
    expected = torch.tensor([[[2 * (1 - 3), 0.0], [0.0, 0.0]], [[0.0, 2 * (2 - 7)], [0.0, 2 * (-1 - 1)]]])
    torch.testing.assert_close(plastic.grad, expected)
    assert stable.grad is None


def _tasks(synthetic_dir, n=6):
    return [load_task(synthetic_dir, name, max_train=n) for name in ("harbor", "orchard", "kitchen")]


def test_the_reservoir_and_the_replay_are_drawn_from_the_seed(synthetic_dir):
    tasks = _tasks(synthetic_dir)
    method = _method(ilora_buffer=4, ilora_replay=1.5)
    assert method.training_examples(tasks, 0) == tasks[0].train  # nothing to replay yet
    method._add_to_buffer(tasks, 0)
    method._add_to_buffer(tasks, 1)
    assert method.seen == 12 and len(method.buffer) == 4
    assert {t for t, _ in method.buffer} <= {0, 1}
    again = _method(ilora_buffer=4, ilora_replay=1.5)
    again._add_to_buffer(tasks, 0)
    again._add_to_buffer(tasks, 1)
    assert again.buffer == method.buffer
    examples = method.training_examples(tasks, 2)
    replayed = examples[len(tasks[2].train):]
    assert examples[: len(tasks[2].train)] == tasks[2].train and len(replayed) == 9  # round(1.5 · 6)
    kept = [tasks[t].train[i] for t, i in method.buffer]
    assert all(e in kept for e in replayed) and {kept.index(e) for e in replayed} == set(range(4))
    assert method._replayed == {id(e) for e in replayed}  # known by identity, distinct from the stored ones
    assert not any(id(e) in method._replayed for e in tasks[0].train + tasks[1].train)
    # a reservoir: after many examples each has about the same chance to be kept
    counts = torch.zeros(3)
    for seed in range(200):
        m = _method(ilora_buffer=3, seed=seed)
        for k in range(3):
            m._add_to_buffer(tasks, k)
        for t, _ in m.buffer:
            counts[t] += 1
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.06


@pytest.mark.parametrize("dropout", [False, True])
def test_the_batch_consistency_is_that_of_the_models_hidden_states(synthetic_dir, dropout):
    """With dropout on (tiny-bert has its own, and the adapters theirs), the stable pass draws the masks of the
    training forward: the reference runs both forwards from the same random state."""
    bb = load_backbone("tiny-bert")
    model = bb.model
    adapters = ContinualAdapters(model, bb.kind, r=2, alpha=4, dropout=0.1 if dropout else 0.0,
                                 target_modules=default_target_modules(bb.model_type))
    adapters.add("shared")
    adapters.model.train(dropout)
    tasks = _tasks(synthetic_dir)
    objective = make_objective(bb.kind, bb.tokenizer, 256, 8)
    method = _method(ilora_lambda=3.0, ilora_replay=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # θ_s after task 0 (what the adapter folder holds), then θ_w in the state
        for f in adapters.factors("shared"):
            f.B.copy_(torch.randn(f.B.shape, generator=g))
    method.plastic = {f.layer: {"A": f.A.detach() + 0.3 * torch.randn(f.A.shape, generator=g),
                                "B": torch.randn(f.B.shape, generator=g)} for f in adapters.factors("shared")}
    method._add_to_buffer(tasks, 0)
    ctx = SimpleNamespace(adapters=adapters, objective=objective, config=method.config, tasks=tasks,
                          device=torch.device("cpu"), accelerator=None)
    method.setup(ctx)
    method.before_task(1, ctx)
    examples = method.training_examples(tasks, 1)
    ctx.examples = [examples[-1], examples[0], examples[-2], examples[1]]  # rows 0 and 2 are replayed
    batch = objective.collate(ctx.examples)
    torch.manual_seed(7)
    out = objective.forward(model, batch)
    value = method.batch_loss(1, batch, out, ctx)

    def states(name):
        torch.manual_seed(7)
        with adapters.using([name]):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True).hidden_states[1:]  # each layer's output
    plastic, stable = states("shared"), states(STABLE)
    mask = batch["attention_mask"].float()
    expected = 0
    for row in (0, 2):
        gaps = [((s[row] - p[row]).clamp_min(0) ** 2).sum(-1) @ mask[row] for p, s in zip(plastic, stable)]
        c = sum(gaps) / (mask[row].sum() * plastic[0].shape[-1] * len(plastic))
        expected = expected + 3.0 * (1 + 0.5) / 0.5 * c  # one loss item (the example) per row
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-8)
    assert value > 0
    shared_B = [f.B for f in adapters.factors("shared")]
    got = torch.autograd.grad(value, shared_B)
    want = torch.autograd.grad(expected, shared_B)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert all(not p.requires_grad for f in adapters.factors(STABLE) for p in (f.A, f.B))

    # after a step, the stable adapter moves towards the plastic one by (1 - decay)
    before = {f.layer: f.B.detach().clone() for f in adapters.factors(STABLE)}
    method.after_step(1, ctx)
    for s, w in zip(adapters.factors(STABLE), adapters.factors("shared")):
        torch.testing.assert_close(s.B, 0.25 * before[s.layer] + 0.75 * w.B.detach())


def test_the_evaluated_stable_adapter_differs_from_the_plastic_one(tmp_path, synthetic_dir):
    from safetensors.torch import load_file

    from nlora.cli import main
    from nlora.method_state import load_state
    from nlora.tracking import read_log

    out = tmp_path / "run"
    assert main(["run", "--method", "i-lora", "--ilora-decay", "0.9", "--ilora-buffer", "4", "--model", "tiny-bert",
                 "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir), "--max-train-samples", "8",
                 "--max-eval-samples", "4", "--batch-size", "4", "--epochs", "1", "--lr", "1e-2", "--log-steps", "1",
                 "--device", "cpu", "--quiet", "--output-dir", str(out)]) == 0
    for folder in ("0-harbor", "1-orchard"):
        stable = load_file(str(out / "adapters" / folder / "adapter_model.safetensors"))
        plastic = load_state(out / "adapters" / folder)["plastic"]
        for key, value in stable.items():
            layer = key.split(".lora_")[0]
            side = "A" if ".lora_A." in key else "B"
            assert not torch.allclose(value, plastic[layer][side]), (folder, key)
    consistency = [line["regularizer_terms"]["i-lora"] for line in read_log(out / "log.jsonl")
                   if line["event"] == "train" and line["phase"] == 1]
    assert len(consistency) == 4 and sum(consistency) > 0  # 8 examples + 8 replayed, batches of 4


def test_identical_adapters_give_no_consistency_on_a_base_with_dropout(synthetic_dir):
    """tiny-t5 has dropout of its own (0.1), like T5: with θ_s = θ_w and dropout on in training, both passes draw
    the same masks and the one-sided term is 0 (a stable pass without dropout made it large)."""
    bb = load_backbone("tiny-t5")
    adapters = ContinualAdapters(bb.model, bb.kind, r=2, alpha=4, dropout=0.1,
                                 target_modules=default_target_modules(bb.model_type))
    adapters.add("shared")
    adapters.model.train()
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in bb.model.modules())
    tasks = _tasks(synthetic_dir)
    objective = make_objective(bb.kind, bb.tokenizer, 256, 8)
    method = _method()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for f in adapters.factors("shared"):
            f.B.copy_(torch.randn(f.B.shape, generator=g))
    method.plastic = {f.layer: {"A": f.A.detach().clone(), "B": f.B.detach().clone()}
                      for f in adapters.factors("shared")}  # θ_w = θ_s
    method._add_to_buffer(tasks, 0)
    ctx = SimpleNamespace(adapters=adapters, objective=objective, config=method.config, tasks=tasks,
                          device=torch.device("cpu"), accelerator=None)
    method.setup(ctx)
    method.before_task(1, ctx)
    examples = method.training_examples(tasks, 1)
    ctx.examples = examples[-4:]  # replayed
    batch = objective.collate(ctx.examples)
    rng = torch.get_rng_state()
    out = objective.forward(adapters.model, batch)
    after_training_forward = torch.get_rng_state()
    value = method.batch_loss(1, batch, out, ctx)
    assert value.item() == 0.0
    assert torch.equal(torch.get_rng_state(), after_training_forward)  # the stable pass leaves the stream alone
    assert not torch.equal(rng, after_training_forward)  # dropout did draw


def test_the_reservoir_keeps_each_example_read_with_equal_chance():
    """Reservoir sampling: after n examples, each is in a buffer of size s with probability s/n. Over 4000 seeds
    (deterministic draws), the frequencies stay within 0.03 (about 4 standard deviations) of it: a buffer of 1 after
    two examples keeps the first with probability 1/2; a buffer of 2 after 3 examples, each of them with 2/3; also
    when the examples come from two tasks."""
    for size, split in ((1, (2,)), (2, (3,)), (2, (1, 2)), (3, (4, 3))):
        tasks = [SimpleNamespace(name=f"t{k}", train=[None] * n) for k, n in enumerate(split)]
        seen = [(k, i) for k, n in enumerate(split) for i in range(n)]
        counts = dict.fromkeys(seen, 0)
        seeds = 4000
        method = _method(tasks=[t.name for t in tasks], ilora_buffer=size)
        for seed in range(seeds):
            method.config.seed, method.buffer, method.seen = seed, [], 0  # a fresh method of that seed
            for k in range(len(tasks)):
                method._add_to_buffer(tasks, k)
            assert len(method.buffer) == size and len({tuple(x) for x in method.buffer}) == size
            for k, i in method.buffer:
                counts[(k, i)] += 1
        expected = size / len(seen)
        for example, count in counts.items():
            assert abs(count / seeds - expected) < 0.03, (size, split, example, count / seeds, expected)
