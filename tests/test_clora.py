"""CLoRA (nlora.methods.clora): the penalty and its gradient against dense projection matrices, through the
engine's in-forward regulariser on a real model; the bases orthonormal, capped at the dimension, and the same in
another instance and another process; a run where CLoRA keeps the factors out of the bases and SeqLoRA does not."""

import json

import pytest
import torch
from safetensors.torch import save_file

import fresh_process
from nlora import RunConfig
from nlora.adapters import ContinualAdapters, read_saved_adapter
from nlora.cli import main
from nlora.methods import get_method
from nlora.methods.clora import orthonormal_basis
from nlora.models import default_target_modules, load_backbone
from nlora.train.regularization import LayerFactors, Regularization


def _clora(**options):
    config = RunConfig(method="clora", tasks=["a", "b"], **options)
    config.validate()
    return get_method("clora")(config)


def _dense_penalty(A, B, P_A, P_B):
    """trace(A Π_A Aᵀ) + trace(Bᵀ Π_B B) with the d × d projections Π = P Pᵀ, entry by entry in float64."""
    A, B, P_A, P_B = (t.detach().double() for t in (A, B, P_A, P_B))
    pi_A, pi_B = P_A @ P_A.T, P_B @ P_B.T
    total = 0.0
    for i in range(A.shape[0]):
        total += sum(float(A[i, a] * pi_A[a, b] * A[i, b]) for a in range(A.shape[1]) for b in range(A.shape[1]))
    for j in range(B.shape[1]):
        total += sum(float(B[a, j] * pi_B[a, b] * B[b, j]) for a in range(B.shape[0]) for b in range(B.shape[0]))
    return total


def test_penalty_and_gradient_match_dense_projections():
    method = _clora(clora_lambda=3.0, clora_k=4)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 7, generator=g, requires_grad=True)  # r × d_in
    B = torch.randn(5, 2, generator=g, requires_grad=True)  # d_out × r
    (term,) = method.loss_terms(0)
    value = term.weight * term.per_layer(LayerFactors("enc.q", A, B, 4.0))
    P_A, P_B = method.basis("enc.q", "A", 7, A), method.basis("enc.q", "B", 5, B)
    assert P_A.shape == (7, 4) and P_B.shape == (5, 4)
    assert value.item() == pytest.approx(3.0 / 2 * _dense_penalty(A, B, P_A, P_B), rel=1e-5)
    value.backward()  # d/dA (λ/2)·tr(A Π Aᵀ) = λ·A·Π;  d/dB = λ·Π_B·B
    torch.testing.assert_close(A.grad, 3.0 * A.detach() @ (P_A @ P_A.T))
    torch.testing.assert_close(B.grad, 3.0 * (P_B @ P_B.T) @ B.detach())


@pytest.mark.parametrize("k", [6, 512])
def test_a_basis_that_spans_its_space_is_the_frobenius_norm(k):
    """k ≥ a side's dimension: its basis is square and orthogonal, and the penalty, formed without it, is still the
    dense projection's (k 6: A's side (7) projected, B's (5) complete; k 512: both complete)."""
    method = _clora(clora_lambda=3.0, clora_k=k)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 7, generator=g, requires_grad=True)
    B = torch.randn(5, 2, generator=g, requires_grad=True)
    (term,) = method.loss_terms(0)
    value = term.weight * term.per_layer(LayerFactors("enc.q", A, B, 4.0))
    P_A, P_B = orthonormal_basis(7, k, 42, "enc.q", "A"), orthonormal_basis(5, k, 42, "enc.q", "B")
    assert P_B.shape == (5, 5) and P_A.shape == ((7, 6) if k == 6 else (7, 7))
    assert value.item() == pytest.approx(3.0 / 2 * _dense_penalty(A, B, P_A, P_B), rel=1e-5)
    value.backward()
    torch.testing.assert_close(A.grad, 3.0 * A.detach() @ (P_A @ P_A.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.grad, 3.0 * (P_B @ P_B.T) @ B.detach(), rtol=1e-5, atol=1e-6)


def test_the_engine_penalises_each_layer_against_its_own_bases(tmp_path):
    """On a real model through nlora.train.regularization: the summed term equals the dense sum over the layers of the
    saved adapter, named as the saved file names them."""
    bb = load_backbone("tiny-t5")
    ad = ContinualAdapters(bb.model, bb.kind, r=2, alpha=4, dropout=0.0,
                           target_modules=default_target_modules(bb.model_type))
    ad.add("shared")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for f in ad.factors("shared"):
            f.B.copy_(torch.randn(f.B.shape, generator=g))
    method = _clora(clora_lambda=0.5, clora_k=8)
    with Regularization(ad.model, "shared", method.loss_terms(0)) as reg:
        ids = torch.randint(3, 200, (2, 9))
        loss = reg.anchor(ad.model(input_ids=ids, labels=ids).loss)
        (value,) = reg.collect().values()
        loss.backward()
    ad.save("shared", tmp_path / "shared")
    _, layers = read_saved_adapter(tmp_path / "shared")
    assert len(layers) == len(ad.factors("shared")) > 2
    dense = 0.0
    for layer, (A, B) in layers.items():
        P_A = orthonormal_basis(A.shape[1], 8, 42, layer, "A")
        P_B = orthonormal_basis(B.shape[0], 8, 42, layer, "B")
        dense += _dense_penalty(A, B, P_A, P_B)
    assert value.item() == pytest.approx(0.5 / 2 * dense, rel=1e-4)


def test_bases_are_orthonormal_capped_and_distinct():
    P = orthonormal_basis(64, 16, 42, "layer.0.q", "A")
    assert P.dtype == torch.float32 and P.shape == (64, 16)
    torch.testing.assert_close(P.T @ P, torch.eye(16), atol=1e-6, rtol=0)
    full = orthonormal_basis(6, 512, 42, "layer.0.q", "A")  # k capped at the dimension: a complete basis
    assert full.shape == (6, 6)
    torch.testing.assert_close(full @ full.T, torch.eye(6), atol=1e-6, rtol=0)
    others = [orthonormal_basis(64, 16, 42, "layer.0.q", "B"), orthonormal_basis(64, 16, 42, "layer.1.q", "A"),
              orthonormal_basis(64, 16, 43, "layer.0.q", "A")]
    assert all(not torch.allclose(P, other) for other in others)


LAYERS = [("encoder.block.0.layer.0.SelfAttention.q", 64, "A"), ("decoder.block.1.layer.1.EncDecAttention.v",
                                                                    4096, "B")]


def write_bases(path):
    """The bases of LAYERS (k = 512) from a fresh CLoRA instance, to a safetensors file (run in another
    process)."""
    method = _clora()
    like = torch.zeros(())
    save_file({f"{layer}/{side}": method.basis(layer, side, dim, like) for layer, dim, side in LAYERS}, path)
    return 0


def test_the_same_bases_in_another_instance_and_another_process(tmp_path):
    write_bases(str(tmp_path / "here.safetensors"))
    write_bases(str(tmp_path / "again.safetensors"))
    child = fresh_process.run(write_bases, str(tmp_path / "there.safetensors"), log=tmp_path / "child.log")
    assert child.returncode == 0, child.output
    here = (tmp_path / "here.safetensors").read_bytes()
    assert here == (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "there.safetensors").read_bytes()


def _share_in_bases(run, seed=42, k=16):
    """‖A P_A‖²/‖A‖² and ‖Bᵀ P_B‖²/‖B‖² over all layers of the run's last adapter."""
    last = sorted((run / "adapters").iterdir())[-1]
    _, layers = read_saved_adapter(last)
    inside = {"A": 0.0, "B": 0.0}
    total = {"A": 0.0, "B": 0.0}
    for layer, (A, B) in layers.items():
        P_A = orthonormal_basis(A.shape[1], k, seed, layer, "A")
        P_B = orthonormal_basis(B.shape[0], k, seed, layer, "B")
        inside["A"] += float((A @ P_A).square().sum())
        inside["B"] += float((B.T @ P_B).square().sum())
        total["A"] += float(A.square().sum())
        total["B"] += float(B.square().sum())
    return {side: inside[side] / total[side] for side in inside}


def test_clora_keeps_the_factors_out_of_its_bases_and_seq_lora_does_not(tmp_path, synthetic_dir):
    common = ["--model", "tiny-bert", "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir),
              "--max-train-samples", "16", "--max-eval-samples", "2", "--batch-size", "4", "--epochs", "1",
              "--lr", "1e-2", "--lora-dropout", "0", "--device", "cpu", "--quiet"]
    assert main(["run", "--method", "seq-lora", *common, "--output-dir", str(tmp_path / "seq")]) == 0
    assert main(["run", "--method", "clora", "--clora-k", "16", "--clora-lambda", "10", *common,
                 "--output-dir", str(tmp_path / "clora")]) == 0
    config = json.loads(json.dumps((tmp_path / "clora" / "config.yaml").read_text()))
    assert "clora_k: 16" in config
    seq, clora = _share_in_bases(tmp_path / "seq"), _share_in_bases(tmp_path / "clora")
    # SeqLoRA's factors have about k/d = 1/4 of their energy in a random k-dimensional subspace
    assert 0.1 < seq["A"] < 0.4 and 0.1 < seq["B"] < 0.4
    assert clora["A"] < 0.5 * seq["A"] and clora["B"] < 0.5 * seq["B"]


def test_layout_option():
    assert _clora().adapter_layout == "snapshot"
    assert _clora(clora_base="inc-lora").adapter_layout == "stacked"
