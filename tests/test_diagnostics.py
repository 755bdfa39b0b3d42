"""Parameter diagnostics on constructed adapters whose answers are known, and on a tiny real run."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from nlora.analysis.diagnostics import (LowRankUpdate, compute_diagnostics, diagnose_run, load_or_diagnose, subspace_overlap,
                               support_statistics)
from nlora.cli import main

LAYERS = ("encoder.layer.0.attention.q", "encoder.layer.1.attention.q")


def write_adapter(folder, factors: dict, alpha=16, **config):
    """A PEFT-format adapter: `factors` maps layer name -> (A, B)."""
    folder.mkdir(parents=True)
    state = {}
    for layer, (A, B) in factors.items():
        state[f"base_model.model.{layer}.lora_A.weight"] = A.float().contiguous()
        state[f"base_model.model.{layer}.lora_B.weight"] = B.float().contiguous()
    save_file(state, str(folder / "adapter_model.safetensors"))
    r = next(iter(factors.values()))[0].shape[0]
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "peft_type": "LORA",
                                                             **config}))


def write_run(root, adapters: list[dict], layout="stacked", tasks=None, **config):
    """A run directory holding only metrics.json and the given adapters (one per phase, in order)."""
    tasks = tasks or [f"t{k}" for k in range(len(adapters))]
    root.mkdir(parents=True, exist_ok=True)
    for k, factors in enumerate(adapters):
        write_adapter(root / "adapters" / f"{k}-{tasks[k]}", factors, **config)
    phases = list(range(len(tasks)))
    (root / "metrics.json").write_text(json.dumps({
        "method": "test", "model": "none", "tasks": tasks, "adapter_layout": layout, "phases": phases,
        "phases_completed": phases, "accuracy_matrix": [[None] * len(tasks) for _ in tasks]}))
    return root


def rows_factor(rows, d_out=6, d_in=5, r=2, seed=0):
    """(A, B) with ΔW dense and bounded away from 0 on `rows`, exactly 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(r, d_in, generator=g) + 0.5
    B = torch.zeros(d_out, r)
    B[list(rows)] = torch.rand(len(rows), r, generator=g) + 0.5
    return A, B


def pair(d, s, t):
    return next(p for p in d["pairs"] if p["tasks"] == [s, t])


def test_disjoint_supports_never_collide(tmp_path):
    run = write_run(tmp_path, [{LAYERS[0]: rows_factor(range(0, 3))}, {LAYERS[0]: rows_factor(range(3, 6), seed=5)}])
    d = compute_diagnostics(run)
    p = pair(d, "t0", "t1")
    assert p["collision_rate"] == 0 and p["collision_jaccard"] == 0
    assert p["delta_cosine"] == pytest.approx(0, abs=1e-9)  # non-collision implies orthogonal updates
    assert [t["sparsity"] for t in d["per_task"]] == [0.5, 0.5]
    assert d["summary"]["mean_collision_rate"] == 0


def test_identical_updates_collide_everywhere(tmp_path):
    factors = {LAYERS[0]: rows_factor(range(6)), LAYERS[1]: rows_factor(range(6), seed=1)}
    d = compute_diagnostics(write_run(tmp_path, [factors, factors]))
    p = pair(d, "t0", "t1")
    assert p["collision_rate"] == 1 and p["collision_jaccard"] == 1
    assert p["delta_cosine"] == pytest.approx(1) and p["subspace_overlap"] == pytest.approx(1)
    assert d["summary"]["mean_sparsity"] == 0


def test_collision_counts_by_hand(tmp_path):
    """6×5 layer: ΔW_0 non-zero on rows 0-2 (15 entries), ΔW_1 on rows 2-5 (20): both on row 2, 5 of 30
    positions; either on 30 → rate 1/6, Jaccard 1/6; a second layer with disjoint rows adds 0 of 30."""
    run = write_run(tmp_path, [{LAYERS[0]: rows_factor(range(0, 3)), LAYERS[1]: rows_factor([0], seed=2)},
                               {LAYERS[0]: rows_factor(range(2, 6), seed=1), LAYERS[1]: rows_factor([5], seed=3)}])
    d = compute_diagnostics(run)
    by_layer = {layer["layer"]: layer for layer in d["layers"]}
    first = by_layer[LAYERS[0]]["pairs"][0]
    assert first["collision_rate"] == pytest.approx(5 / 30) and first["collision_jaccard"] == pytest.approx(5 / 30)
    assert by_layer[LAYERS[1]]["pairs"][0]["collision_rate"] == 0
    p = pair(d, "t0", "t1")
    assert p["collision_rate"] == pytest.approx(5 / 60)  # pooled over the layers' positions
    assert p["collision_jaccard"] == pytest.approx(5 / (30 + 10))
    assert d["per_task"][0]["sparsity"] == pytest.approx(1 - (15 + 5) / 60)
    assert by_layer[LAYERS[0]]["shape"] == [6, 5]


def test_orthogonal_A_give_zero_overlap(tmp_path):
    eye = torch.eye(6)
    B = torch.rand(4, 2) + 0.5
    run = write_run(tmp_path, [{LAYERS[0]: (eye[:2], B)}, {LAYERS[0]: (eye[2:4], B)}, {LAYERS[0]: (eye[1:3], B)}])
    d = compute_diagnostics(run)
    p01, p02 = pair(d, "t0", "t1"), pair(d, "t0", "t2")
    assert p01["olora_overlap"] == 0 and p01["olora_l1"] == 0 and p01["subspace_overlap"] == pytest.approx(0)
    # A_0 = rows e0,e1 and A_2 = rows e1,e2 share e1: A_0 A_2ᵀ = [[0,0],[1,0]]; principal cosines 1 and 0
    assert p02["olora_overlap"] == pytest.approx(1) and p02["olora_l1"] == pytest.approx(1)
    assert p02["subspace_overlap"] == pytest.approx(0.5)
    assert d["summary"]["mean_olora_overlap"] == pytest.approx(2 / 3)  # pairs (0,1), (0,2), (1,2): 0, 1, 1


def test_threshold_is_relative_and_stated(tmp_path):
    A = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    B = torch.tensor([[1.0], [0.05], [0.001], [0.0]])  # ΔW rows scaled by these, with scaling alpha/r = 2
    run = write_run(tmp_path, [{LAYERS[0]: (A, B)}], alpha=2)
    d = compute_diagnostics(run, rel_eps=0.01)
    eps = d["epsilon"]
    assert (eps["mode"], eps["scale"], eps["value"]) == ("relative", "max", 0.01)
    assert "|x| > 0.01 · max|ΔW_t|" in eps["rule"]
    layer = d["layers"][0]["tasks"][0]
    assert layer["epsilon"] == pytest.approx(0.02)  # 0.01 · max|ΔW| = 0.01 · 2
    assert layer["sparsity"] == 0.5 and layer["l1_norm"] == pytest.approx(2 * 4 * 1.051)
    assert compute_diagnostics(run, rel_eps=0.1)["per_task"][0]["sparsity"] == 0.75
    assert compute_diagnostics(run, rel_eps=0)["per_task"][0]["sparsity"] == 0.25
    rms = compute_diagnostics(run, rel_eps=1, eps_scale="rms")
    assert rms["epsilon"]["scale"] == "rms" and rms["per_task"][0]["sparsity"] == 0.75  # RMS ≈ 1.0


@pytest.mark.parametrize("d_out,d_in,r", [(7, 5, 3), (4, 9, 6), (3, 3, 8)])
def test_nuclear_and_frobenius_from_factors_match_dense(d_out, d_in, r):
    torch.manual_seed(d_out)
    u = LowRankUpdate.from_lora(torch.randn(r, d_in), torch.randn(d_out, r), 0.7)
    v = LowRankUpdate.from_lora(torch.randn(r, d_in), torch.randn(d_out, r), 1.3)
    for update in (u, u.minus(v)):
        dense = update.dense(dtype=torch.float64)
        sigma, basis = update.svd()
        assert float(sigma.sum()) == pytest.approx(float(torch.linalg.matrix_norm(dense, "nuc")), rel=1e-9)
        assert update.frobenius() == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-9)
        assert basis.shape[1] == torch.linalg.matrix_rank(dense)
        assert torch.allclose(dense @ basis @ basis.T, dense, atol=1e-9)  # the basis spans the row space
    assert u.gram(v) == pytest.approx(float((u.dense(dtype=torch.float64) * v.dense(dtype=torch.float64)).sum()))
    assert u.minus(u).frobenius() == pytest.approx(0, abs=1e-9)


def test_row_blocks_give_the_same_counts():
    torch.manual_seed(0)
    updates = [LowRankUpdate.from_lora(torch.randn(2, 11), torch.randn(13, 2), 1.0) for _ in range(3)]
    whole = support_statistics(updates, 0.2)
    rowwise = support_statistics(updates, 0.2, max_elements=1)  # one row of ΔW per task at a time
    assert (rowwise["both"], rowwise["below"], rowwise["epsilon"]) == (whole["both"], whole["below"], whole["epsilon"])
    assert rowwise["l1"] == pytest.approx(whole["l1"])
    dense = [u.dense() for u in updates]
    masks = [x.abs() > 0.2 * x.abs().max() for x in dense]
    assert whole["both"][0][2] == int((masks[0] & masks[2]).sum())
    assert whole["below"] == [int((~m).sum()) for m in masks]


def test_subspace_overlap_counts_principal_angles():
    eye = torch.eye(4, dtype=torch.float64)
    rotated = torch.stack([eye[0] + eye[2], eye[1]], dim=1) / torch.tensor([math.sqrt(2), 1.0])
    assert subspace_overlap(eye[:, :2], rotated) == (pytest.approx(1.5), 2)  # cos² = 1/2 and 1
    assert subspace_overlap(eye[:, :2], eye[:, :0]) == (0.0, 0)


def test_snapshot_updates_are_differences_of_consecutive_snapshots(tmp_path):
    """One adapter trained through the phases: phase 1 changes only rows 3-5, so the task updates (the changes)
    do not collide although the saved snapshots do."""
    A0, B0 = rows_factor(range(3))
    A1, B1 = rows_factor(range(3, 6), seed=4)
    A = torch.cat([A0, A1])
    first = torch.cat([B0, torch.zeros_like(B1)], dim=1)
    second = torch.cat([B0, B1], dim=1)
    run = write_run(tmp_path, [{LAYERS[0]: (A, first)}, {LAYERS[0]: (A, second)}], layout="snapshot")
    d = compute_diagnostics(run)
    assert d["adapter_layout"] == "snapshot" and "previous phase" in d["update"]
    p = pair(d, "t0", "t1")
    assert p["collision_rate"] == 0 and p["olora_overlap"] is None
    assert d["summary"]["mean_olora_overlap"] is None and d["summary"]["mean_collision_rate"] == 0
    scaling = 16 / 4
    expected = float(torch.linalg.matrix_norm(scaling * B1 @ A1, "nuc"))
    assert d["per_task"][1]["nuclear_norm"] == pytest.approx(expected, rel=1e-6)


def test_one_update_has_no_pairs(tmp_path):
    d = compute_diagnostics(write_run(tmp_path, [{LAYERS[0]: rows_factor(range(6))}], layout="snapshot"))
    s = d["summary"]
    assert d["pairs"] == [] and s["n_pairs"] == 0
    for key in ("mean_collision_rate", "mean_olora_overlap", "mean_subspace_overlap", "mean_delta_cosine"):
        assert s[key] is None
    assert s["mean_sparsity"] == 0 and s["mean_nuclear_norm"] > 0


def test_scaling_follows_the_adapter_config(tmp_path):
    A, B = rows_factor(range(6), r=4)
    plain = compute_diagnostics(write_run(tmp_path / "a", [{LAYERS[0]: (A, B)}], alpha=8))
    rslora = compute_diagnostics(write_run(tmp_path / "b", [{LAYERS[0]: (A, B)}], alpha=8, use_rslora=True))
    pattern = compute_diagnostics(write_run(tmp_path / "c", [{LAYERS[0]: (A, B)}], alpha=8,
                                            alpha_pattern={"attention.q": 16}))
    base = plain["per_task"][0]["nuclear_norm"]
    assert rslora["per_task"][0]["nuclear_norm"] == pytest.approx(base * (8 / 2) / (8 / 4))
    assert pattern["per_task"][0]["nuclear_norm"] == pytest.approx(base * 2)


def test_bad_run_directories_give_clear_errors(tmp_path):
    from nlora.errors import NloraError

    with pytest.raises(NloraError, match="no metrics.json"):
        compute_diagnostics(tmp_path)
    run = write_run(tmp_path / "run", [{LAYERS[0]: rows_factor(range(6))}])
    with pytest.raises(NloraError, match="rel_eps"):
        compute_diagnostics(run, rel_eps=-1)
    with pytest.raises(NloraError, match="eps_scale"):
        compute_diagnostics(run, eps_scale="median")
    (run / "adapters" / "0-t0" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(NloraError, match="unreadable"):
        compute_diagnostics(run)


def test_cached_diagnostics_are_reused_until_stale(tmp_path):
    run = write_run(tmp_path, [{LAYERS[0]: rows_factor(range(3))}, {LAYERS[0]: rows_factor(range(3, 6))}])
    written = diagnose_run(run)
    assert json.loads((run / "diagnostics.json").read_text()) == written
    assert not list(run.glob(".*.tmp"))
    marker = dict(written, marker=True)
    (run / "diagnostics.json").write_text(json.dumps(marker))
    assert load_or_diagnose(run)["marker"] is True                 # current: reused
    assert "marker" not in load_or_diagnose(run, rel_eps=0.5)      # another threshold: recomputed
    assert load_or_diagnose(run)["epsilon"]["value"] == 0.5        # ... and saved


def test_a_complete_run_writes_diagnostics_and_cli_recomputes_them(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny-bert", "--method", "n-lora", "--tasks", "harbor,orchard", "--data-dir",
                 str(synthetic_dir), "--output-dir", str(out), "--max-train-samples", "4", "--max-eval-samples",
                 "2", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--quiet"]) == 0
    d = json.loads((out / "diagnostics.json").read_text())
    assert d["tasks"] == ["harbor", "orchard"] and d["phases"] == [0, 1] and d["adapter_layout"] == "stacked"
    assert len(d["layers"]) == 4 and all(len(layer["pairs"]) == 1 for layer in d["layers"])  # 2 × query, value
    for key in ("mean_collision_rate", "mean_olora_overlap", "mean_subspace_overlap", "mean_sparsity",
                "mean_nuclear_norm"):
        assert isinstance(d["summary"][key], float), key
    assert 0 <= d["summary"]["mean_collision_rate"] <= 1 and 0 <= d["summary"]["mean_subspace_overlap"] <= 1
    capsys.readouterr()
    assert main(["diagnose", str(out), "--rel-eps", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "collision rate" in printed and str((out / "diagnostics.json").resolve()) in printed
    again = json.loads((out / "diagnostics.json").read_text())
    assert again["epsilon"]["value"] == 0.2 and again["summary"]["mean_sparsity"] > d["summary"]["mean_sparsity"]
    assert main(["diagnose", str(tmp_path / "missing")]) == 2


def test_pooled_diagnostics_across_layers_match_dense_brute_force(tmp_path):
    """Three layers of different shapes; in one, task 1's update is exactly task 0's negated (anti-parallel).
    Every pooled number is recomputed here from the dense ΔW of each layer: delta_cosine Σ_l|⟨ΔW_0,ΔW_1⟩_l| /
    (‖ΔW_0‖‖ΔW_1‖) over the whole model (the anti-parallel layer counts like a parallel one), olora_overlap
    the Frobenius norm of the block-diagonal A_0 A_1ᵀ, olora_l1, nuclear and L1 norms summed over layers."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a.q": (6, 5), "b.q": (4, 7), "c.q": (5, 5)}
    t0 = {name: (torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g))
          for name, (d_out, d_in) in shapes.items()}
    t1 = {name: (torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g))
          for name, (d_out, d_in) in shapes.items()}
    t1["b.q"] = (t0["b.q"][0], -t0["b.q"][1])
    d = compute_diagnostics(write_run(tmp_path, [t0, t1], alpha=4))  # scaling 2
    dense = [{name: 2.0 * (B @ A).double() for name, (A, B) in t.items()} for t in (t0, t1)]
    fro = [math.sqrt(sum(float(w.square().sum()) for w in task.values())) for task in dense]
    inner = sum(abs(float((dense[0][n] * dense[1][n]).sum())) for n in shapes)
    p = pair(d, "t0", "t1")
    assert p["delta_cosine"] == pytest.approx(inner / (fro[0] * fro[1]), rel=1e-5)
    by_layer = {layer["layer"]: layer for layer in d["layers"]}
    assert by_layer["b.q"]["pairs"][0]["delta_cosine"] == pytest.approx(1.0, rel=1e-5)
    overlaps = [(t0[n][0].double() @ t1[n][0].double().T) for n in shapes]
    assert p["olora_overlap"] == pytest.approx(math.sqrt(sum(float(o.square().sum()) for o in overlaps)), rel=1e-5)
    assert p["olora_l1"] == pytest.approx(sum(float(o.abs().sum()) for o in overlaps), rel=1e-5)
    for k, task in enumerate(d["per_task"]):
        assert task["l1_norm"] == pytest.approx(sum(float(w.abs().sum()) for w in dense[k].values()), rel=1e-5)
        nuclear = sum(float(torch.linalg.svdvals(w).sum()) for w in dense[k].values())
        assert task["nuclear_norm"] == pytest.approx(nuclear, rel=1e-5)
        assert task["frobenius_norm"] == pytest.approx(fro[k], rel=1e-5)
    assert d["summary"]["mean_l1_norm"] == pytest.approx(sum(t["l1_norm"] for t in d["per_task"]) / 2)
