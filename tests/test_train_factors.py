"""Training one factor only (option train_factors; LoRA-FA, RAC-LoRA's asymmetric step): the frozen factor stays
exactly at its random initialisation through a run, the trained one learns, and a run trained this way folds as
any other (folded and unfolded runs predict the same). With train_factors A, B is drawn and A starts at zero:
next to PEFT's B = 0, A alone would get no gradient at all."""

import json

import torch
from transformers import set_seed

from nlora.adapters import ContinualAdapters, read_saved_adapter
from nlora.cli import main
from nlora.models import default_target_modules, load_backbone

RUN = ["--model", "tiny-bert", "--tasks", "harbor,orchard", "--max-train-samples", "8", "--max-eval-samples", "4",
       "--batch-size", "4", "--epochs", "1", "--lr", "1e-2", "--lora-dropout", "0", "--device", "cpu", "--quiet"]


def _adapters(dropout=0.0, r=8, alpha=32):
    bb = load_backbone("tiny-bert")
    return bb, ContinualAdapters(bb.model, bb.kind, r=r, alpha=alpha, dropout=dropout,
                                 target_modules=default_target_modules(bb.model_type))


def _gradients(ad, name):
    ad.model.zero_grad()
    ids = torch.randint(3, 200, (2, 9))
    ad.model(input_ids=ids).last_hidden_state.square().mean().backward()
    return [(f.A.grad, f.B.grad) for f in ad.factors(name)]


def test_training_A_alone_needs_B_drawn_and_A_at_zero():
    _, ad = _adapters(r=4)
    ad.add("plain")  # PEFT's initialisation: A drawn, B = 0
    ad.activate(["plain"], trainable="plain", factors="A")
    assert all(a.abs().sum() == 0 for a, b in _gradients(ad, "plain"))  # A next to B = 0: nothing to learn
    ad.add("swapped", factors="A")
    ad.activate(["swapped"], trainable="swapped", factors="A")
    for f in ad.factors("swapped"):
        assert f.A.requires_grad and not f.B.requires_grad
        assert f.A.abs().sum() == 0  # ΔW = 0 at the start, as with PEFT's own initialisation
        bound = 1 / f.B.shape[0] ** 0.5  # drawn as PEFT draws A, for the transposed layer: U(±1/√d_out)
        assert 0.5 * bound < f.B.abs().max() <= bound
    assert all(a.abs().sum() > 0 and b is None for a, b in _gradients(ad, "swapped"))


def _initial_factors(config, n):
    """Each phase's adapter as the run creates it (seed + phase, then the adapter added), before any training."""
    bb, ad = _adapters(r=config["lora_r"], alpha=config["lora_alpha"])
    out = []
    for k in range(n):
        set_seed(config["seed"] + k)
        name = ad.add(f"task{k}", factors=config["train_factors"])
        out.append({f.layer: (f.A.detach().clone(), f.B.detach().clone()) for f in ad.factors(name)})
    return out


def _saved(run):
    return [read_saved_adapter(folder)[1] for folder in sorted((run / "adapters").iterdir())]


def _config(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def _assert_A_kept(run, method):
    initial = _initial_factors(_config(run), 2)
    saved = _saved(run)
    for k, layers in enumerate(saved):
        start = initial[k if method == "inc-lora" else 0]  # seq-lora: one adapter, created in phase 0
        for layer, (A, B) in layers.items():
            assert torch.equal(A, start[layer][0]), (k, layer)
            assert B.abs().sum() > 0
    if method == "seq-lora":  # the shared B learned on, across the tasks
        assert any(not torch.equal(saved[0][layer][1], saved[1][layer][1]) for layer in saved[0])


def test_train_factors_B_keeps_the_shared_A_at_its_initialisation(tmp_path, synthetic_dir):
    run = tmp_path / "run"
    assert main(["run", "--method", "seq-lora", "--train-factors", "B", *RUN, "--data-dir", str(synthetic_dir),
                 "--output-dir", str(run)]) == 0
    _assert_A_kept(run, "seq-lora")


def test_train_factors_A_keeps_the_drawn_B(tmp_path, synthetic_dir):
    run = tmp_path / "run"
    assert main(["run", "--method", "inc-lora", "--train-factors", "A", *RUN, "--data-dir", str(synthetic_dir),
                 "--output-dir", str(run)]) == 0
    initial = _initial_factors(_config(run), 2)
    for k, layers in enumerate(_saved(run)):
        for layer, (A, B) in layers.items():
            assert torch.equal(B, initial[k][layer][1]) and B.abs().sum() > 0, (k, layer)
            assert A.abs().sum() > 0


def test_train_factors_B_keeps_each_A_at_its_initialisation_and_folds_as_any_other(tmp_path, synthetic_dir):
    """Each task's A as created, folded (one frozen path, merged into the float32 base) or not; folded and
    unfolded, the same predictions, the adapters within float rounding."""
    runs = {}
    for fold in ("--fold-adapters", "--no-fold-adapters"):
        runs[fold] = tmp_path / fold.strip("-")
        assert main(["run", "--method", "inc-lora", "--train-factors", "B", fold, *RUN, "--data-dir",
                     str(synthetic_dir), "--output-dir", str(runs[fold])]) == 0
    folded, unfolded = runs["--fold-adapters"], runs["--no-fold-adapters"]
    _assert_A_kept(folded, "inc-lora")
    _assert_A_kept(unfolded, "inc-lora")
    assert json.loads((folded / "metrics.json").read_text())["fold_form"] == "merge"
    predictions = sorted(p.relative_to(folded) for p in (folded / "predictions").rglob("*.jsonl"))
    assert len(predictions) == 3
    for path in predictions:
        assert (folded / path).read_text() == (unfolded / path).read_text(), path
    for a, b in zip(_saved(folded), _saved(unfolded)):
        for layer in a:
            assert torch.equal(a[layer][0], b[layer][0])  # A: never trained, bit for bit
            torch.testing.assert_close(a[layer][1], b[layer][1], rtol=1e-4, atol=1e-5)
