"""MIGU (nlora.train.migu, option grad_mask migu): the row mask against a brute-force quantile, the masked gradients of a
small model against magnitudes computed by hand over two micro-batches, and a run in which, from the second task
on, exactly the top rows of each factor move."""

import math
from collections import OrderedDict

import pytest
import torch

from nlora.adapters import ContinualAdapters
from nlora.train.migu import MiguMask, row_mask


def _brute_mask(a: torch.Tensor, q: float) -> torch.Tensor:
    s = sorted(a.tolist())
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    tau = s[lo] + (pos - lo) * (s[hi] - s[lo])
    return torch.tensor([x >= tau for x in a.tolist()])


@pytest.mark.parametrize("q", [0.0, 0.3, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("n", [1, 2, 8, 37])
def test_the_row_mask_is_the_top_of_the_quantile(q, n):
    g = torch.Generator().manual_seed(n)
    a = torch.rand(n, generator=g)
    mask = row_mask(a, q)
    assert torch.equal(mask, _brute_mask(a, q))
    if n == 8 and q == 0.7:  # 0.7 · 7 = 4.9: the three largest of eight
        assert mask.sum() == 3 and set(a.argsort()[-3:].tolist()) == set(mask.nonzero().flatten().tolist())
    ties = torch.tensor([0.0] * n)  # B = 0 at a new adapter's start: every row updates
    assert row_mask(ties, q).all()


def test_gradients_are_masked_by_the_steps_output_magnitudes():
    torch.manual_seed(0)
    d = 10
    model = torch.nn.Sequential(OrderedDict(q=torch.nn.Linear(d, d), act=torch.nn.Tanh(), v=torch.nn.Linear(d, d)))
    adapters = ContinualAdapters(model, "encoder", r=4, alpha=4, dropout=0.0, target_modules=["q", "v"])
    adapters.add("task0")
    with torch.no_grad():
        for f in adapters.factors("task0"):
            f.B.normal_()
    mask = MiguMask(adapters, q=0.5)
    inputs = [torch.randn(3, 5, d), torch.randn(2, 7, d)]  # two micro-batches of one step
    with torch.no_grad():
        model(torch.randn(4, d))  # a pass without gradient (a teacher's) does not count
    for x in inputs:
        model(x).pow(2).sum().backward()
    layers = dict(adapters.lora_layers())
    factors = {f.layer: f for f in adapters.factors("task0")}
    grads = {f.layer: (f.A.grad.clone(), f.B.grad.clone()) for f in factors.values()}

    # brute force: each layer's inputs, then |A x| and |B A x| summed over every token of both micro-batches
    seen = {name: [] for name in layers}
    hooks = [layers[name].register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].detach()))
             for name in layers]
    with torch.no_grad():
        for x in inputs:
            model(x)
    for h in hooks:
        h.remove()
    mask.apply(world=1)
    for name, f in factors.items():
        xs = torch.cat([x.reshape(-1, d) for x in seen[name]])
        hidden = xs @ f.A.detach().T
        a_rows = hidden.abs().sum(0)
        b_rows = (hidden @ f.B.detach().T).abs().sum(0)
        grad_A, grad_B = grads[name]
        torch.testing.assert_close(f.A.grad, grad_A * _brute_mask(a_rows, 0.5)[:, None])
        torch.testing.assert_close(f.B.grad, grad_B * _brute_mask(b_rows, 0.5)[:, None])
        assert (f.B.grad != 0).any(-1).sum() == 5  # 0.5 · 9 = 4.5: the 5 largest of 10 update
    assert all((s == 0).all() for s in mask.sums.values())  # the next step starts afresh
    mask.close()


def _changed_rows(before, after):
    return {key: int((before[key] != after[key]).any(-1).sum()) for key in before}


def test_from_the_second_task_only_the_top_rows_of_each_factor_move(tmp_path, synthetic_dir):
    from safetensors.torch import load_file

    from nlora.cli import main

    # the second task takes one optimizer step (a batch of all 8 examples), so a row moves exactly where its
    # gradient is kept; the first takes three, after which no two rows of B are equal (after one Adam step from
    # B = 0 each entry is ±lr, and rows repeat: equal magnitudes, tied at the quantile)
    common = ["run", "--method", "seq-lora", "--model", "tiny-bert", "--tasks", "harbor,orchard", "--data-dir",
              str(synthetic_dir), "--max-train-samples", "8", "--max-eval-samples", "2", "--batch-size", "8",
              "--epochs-per-task", "3,1", "--lr", "1e-2", "--lora-r", "8", "--device", "cpu", "--quiet"]
    assert main([*common, "--grad-mask", "migu", "--output-dir", str(tmp_path / "migu")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "plain")]) == 0

    def saved(run, folder):
        return load_file(str(tmp_path / run / "adapters" / folder / "adapter_model.safetensors"))

    # the first task is not masked: the same adapter as without the option
    first = saved("migu", "0-harbor")
    assert all(torch.equal(first[k], v) for k, v in saved("plain", "0-harbor").items())
    masked = _changed_rows(first, saved("migu", "1-orchard"))
    plain = _changed_rows(saved("plain", "0-harbor"), saved("plain", "1-orchard"))
    for key, rows in masked.items():
        n = first[key].shape[0]  # rows: r for A, d_out for B
        expected = n - math.floor(0.7 * (n - 1)) - 1  # above the 0.7-quantile (distinct magnitudes)
        assert rows == expected, (key, rows, expected)
        assert plain[key] == n
