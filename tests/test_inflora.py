"""InfLoRA (nlora.methods.inflora): the designed A against a brute-force SVD of the projected covariance and
orthogonal to the stored subspace (ΔW·x = 0 there), the DualGPM growth against a brute-force loop, the covariance
of every adapted layer's inputs against a per-example pass with no padding (cross-attention v reading the encoder's
output), and a run where InfLoRA's later adapter moves the first task's inputs much less than IncLoRA's does."""

from types import SimpleNamespace

import pytest
import torch

from lora_reference import add_adapters, read_adapter
from nlora import RunConfig
from nlora.adapters import ContinualAdapters
from nlora.cli import main
from nlora.method_state import load_state
from nlora.methods import get_method
from nlora.methods.inflora import (A_SCALE, design_A, grow_basis, input_covariances, shared_input_groups,
                                   threshold_after)
from nlora.models import default_target_modules, load_backbone
from nlora.objectives import make_objective
from nlora.tasks.data import load_task


def _psd(d: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """A covariance with a clear spectral gap between successive directions."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q @ torch.diag(decay ** torch.arange(d, dtype=torch.float64) * 10) @ Q.T


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def _projector(V: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the span of V's columns (orthonormal)."""
    return V @ V.T


# ------------------------------------------------------------------------------------------ the designed A

def test_designed_A_spans_the_top_singular_vectors_of_the_projected_covariance():
    d, k, r = 12, 4, 3
    C, M = _psd(d, 0), _orthonormal(d, k, 1)
    A = design_A(C.float(), M.float(), r).double()
    # brute force: the top-r left singular vectors of (I - M Mᵀ) C
    U, S, _ = torch.linalg.svd((torch.eye(d, dtype=torch.float64) - M @ M.T) @ C)
    assert S[r - 1] > 1.2 * S[r]  # a gap, so the top-r subspace is well defined
    torch.testing.assert_close(_projector(A.T / A_SCALE), _projector(U[:, :r]), atol=1e-5, rtol=0)
    torch.testing.assert_close(A @ A.T, A_SCALE ** 2 * torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (A @ M).abs().max() < 1e-6  # orthogonal to the stored subspace
    # the unprojected design (what a planted bug would do) is not orthogonal to it
    assert (U[:, :r].T @ M).abs().max() < 1e-9
    assert (torch.linalg.svd(C)[0][:, :r].T @ M).abs().max() > 0.1


def test_the_update_leaves_inputs_in_the_subspace_unmoved():
    d, k, r, d_out = 16, 6, 4, 10
    C, M = _psd(d, 2), _orthonormal(d, k, 3)
    A = design_A(C.float(), M.float(), r).double()
    g = torch.Generator().manual_seed(4)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)  # whatever B learns
    x_in = M @ torch.randn(k, 50, generator=g, dtype=torch.float64)
    x_any = torch.randn(d, 50, generator=g, dtype=torch.float64)
    delta = 4.0 * B @ A
    assert (delta @ x_in).norm() < 1e-6 * x_in.norm()
    assert (delta @ x_any).norm() > 0.1 * x_any.norm()


def test_A_stays_outside_the_subspace_where_the_task_lies_inside_it():
    """A task whose inputs lie in span(M) leaves (I - M Mᵀ) C = 0, whose singular vectors are arbitrary: the rows
    of A must still be orthogonal to M (the reference's full SVD of the projected matrix gives no such guarantee)."""
    d, k, r = 10, 7, 3
    M = _orthonormal(d, k, 5)
    C = M @ torch.diag(torch.arange(1, k + 1, dtype=torch.float64)) @ M.T
    A = design_A(C.float(), M.float(), r).double()
    assert (A @ M).abs().max() < 1e-6
    torch.testing.assert_close(A @ A.T, A_SCALE ** 2 * torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)


def test_fewer_free_directions_than_the_rank_leave_rows_zero():
    d, r = 8, 4
    M = _orthonormal(d, d - 2, 6)
    A = design_A(_psd(d, 7).float(), M.float(), r).double()
    assert (A @ M).abs().max() < 1e-6
    assert A[:2].norm(dim=1).allclose(torch.full((2,), A_SCALE, dtype=torch.float64), atol=1e-6)
    assert A[2:].abs().max() == 0


# ------------------------------------------------------------------------------------------ the subspace

def _gpm_loop(U: torch.Tensor, S: torch.Tensor, M: torch.Tensor, total: torch.Tensor, threshold: float
              ) -> torch.Tensor:
    """The reference's loop: add the projected directions, largest first, while the captured share < threshold."""
    captured = (total - (S ** 2).sum()) / total
    r = 0
    for s in S:
        if captured >= threshold:
            break
        captured += s ** 2 / total
        r += 1
    return torch.cat([M, U[:, :r]], dim=1)[:, :M.shape[0]]


def _brute_force_growth(X: torch.Tensor, M: torch.Tensor | None, threshold: float, energy: str) -> torch.Tensor:
    """DualGPM with full SVDs (float64): as the reference code, on the covariance C = X Xᵀ (energy covariance), or
    as GPM, on the activations X themselves (energy input)."""
    M = torch.zeros(X.shape[0], 0, dtype=torch.float64) if M is None else M
    R = X @ X.T if energy == "covariance" else X
    U, S, _ = torch.linalg.svd(R - M @ (M.T @ R), full_matrices=False)
    return _gpm_loop(U, S, M, (torch.linalg.svd(R)[1] ** 2).sum(), threshold)


@pytest.mark.parametrize("energy", ["covariance", "input"])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.995])
@pytest.mark.parametrize("k", [0, 3])
def test_subspace_growth_matches_a_brute_force_svd(threshold, k, energy):
    d, n = 14, 40
    g = torch.Generator().manual_seed(8)
    X = torch.diag(0.8 ** torch.arange(d, dtype=torch.float64)) @ torch.randn(d, n, generator=g,
                                                                             dtype=torch.float64)
    M = _orthonormal(d, k, 9) if k else None
    grown = grow_basis((X @ X.T).float(), None if M is None else M.float(), threshold, energy).double()
    expected = _brute_force_growth(X, M, threshold, energy)
    assert grown.shape == expected.shape
    assert grown.shape[1] > k  # it grew
    torch.testing.assert_close(_projector(grown), _projector(expected), atol=1e-4, rtol=0)
    torch.testing.assert_close(grown.T @ grown, torch.eye(grown.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
    if M is not None:
        torch.testing.assert_close(grown[:, :k], M, atol=1e-6, rtol=0)  # the old directions are kept as they were


def test_the_input_energy_keeps_more_directions_than_the_covariance_energy():
    C = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0]))  # input energies 4, 2, 1, 1 of 8; squared 16, 4, 1, 1 of 22
    assert grow_basis(C, None, 0.9, "covariance").shape[1] == 2  # 16/22 < 0.9 <= 20/22
    assert grow_basis(C, None, 0.9, "input").shape[1] == 4  # 7/8 < 0.9 <= 8/8


def test_first_task_keeps_the_smallest_subspace_that_holds_the_threshold():
    C = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))  # energies 9, 4, 1, 0 of 14
    for threshold, k in ((9 / 14, 1), (9.5 / 14, 2), (13 / 14, 2), (13.5 / 14, 3), (1.0, 3)):
        assert grow_basis(C, None, threshold).shape[1] == k, threshold
    # a subspace already holding the threshold does not grow
    M = torch.eye(4)[:, :2]
    assert grow_basis(C, M, 13 / 14).shape[1] == 2
    assert grow_basis(C, M, 0.95).shape[1] == 3


def test_threshold_schedule_takes_the_runs_task_count(monkeypatch):
    assert threshold_after(0, 4, 0.9, "linear") == pytest.approx(0.9)
    assert threshold_after(3, 4, 0.9, "linear") == pytest.approx(0.975)
    assert threshold_after(3, 4, 0.9, "constant") == pytest.approx(0.9)
    config = RunConfig(method="inflora", tasks=["a", "b", "c", "d", "e"], method_options={"inflora_threshold": 0.8})
    config.validate()
    method = get_method("inflora")(config)
    seen = []
    monkeypatch.setattr("nlora.methods.inflora.grow_basis", lambda C, M, t, e: seen.append(t) or M)
    monkeypatch.setattr(method, "covariances", lambda ctx, k: ({}, {"layer": torch.eye(2)}))
    ctx = SimpleNamespace(tasks=[None] * 5)
    for k in range(5):
        method.after_task(k, ctx)
    assert seen == pytest.approx([0.8 + 0.2 * k / 5 for k in range(4)])  # none after the last task


def test_train_factors_A_is_refused():
    from nlora.errors import NloraError

    config = RunConfig(method="inflora", tasks=["a"], train_factors="A")
    with pytest.raises(NloraError, match="'train_factors'"):
        config.validate()
        from nlora.methods import resolve
        resolve(config)


# ------------------------------------------------------------------------------------------ the covariance pass

def _context(model_name, synthetic_dir, n=7):
    bb = load_backbone(model_name)
    adapters = ContinualAdapters(bb.model, bb.kind, r=2, alpha=4, dropout=0.0,
                                 target_modules=default_target_modules(bb.model_type))
    adapters.add("task0")
    objective = make_objective(bb.kind, bb.tokenizer, 256, 8)
    task = load_task(synthetic_dir, "harbor", max_train=n)
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    return SimpleNamespace(adapters=adapters, objective=objective, accelerator=accelerator,
                           device=torch.device("cpu"), tasks=[task], config=RunConfig(tasks=["harbor"],
                                                                                     eval_batch_size=3))


def _per_example_covariances(ctx, examples) -> dict[str, torch.Tensor]:
    """Σ x xᵀ of every adapted layer's whole input, one example per forward (one sequence per forward for the
    encoder's prompt and option texts): no padding anywhere."""
    layers = dict(ctx.adapters.lora_layers())
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    def add(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name].add_(x.T @ x)  # returns nothing: a pre-hook's return value would replace the input
        return hook

    handles = [m.register_forward_pre_hook(add(n)) for n, m in layers.items()]
    model = ctx.adapters.model.eval()
    try:
        with torch.no_grad():
            for example in examples:
                batch = ctx.objective.collate([example])
                if ctx.objective.kind != "encoder":
                    ctx.objective.forward(model, batch)
                    continue
                # the encoder objective embeds the prompt and each option text: each alone here, unpadded
                for ids, mask in ((batch["input_ids"], batch["attention_mask"]),
                                  (batch["option_input_ids"], batch["option_attention_mask"])):
                    for row, real in zip(ids, mask):
                        model(input_ids=row[real.bool()][None], attention_mask=real[real.bool()][None])
    finally:
        for h in handles:
            h.remove()
    return sums


@pytest.mark.parametrize("model_name", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_covariances_match_a_per_example_pass(synthetic_dir, model_name):
    ctx = _context(model_name, synthetic_dir)
    examples = ctx.tasks[0].train
    layers = dict(ctx.adapters.lora_layers())
    groups = shared_input_groups(ctx, layers, examples[0])
    covs = input_covariances(ctx, examples, layers, groups)  # batches of 3: padding on both sides
    expected = _per_example_covariances(ctx, examples)
    for name, owner in groups.items():
        torch.testing.assert_close(covs[owner].double(), expected[name], rtol=1e-4, atol=1e-3)


def test_cross_attention_v_reads_the_encoder_output(synthetic_dir):
    ctx = _context("tiny-t5", synthetic_dir)
    examples = ctx.tasks[0].train
    layers = dict(ctx.adapters.lora_layers())
    groups = shared_input_groups(ctx, layers, examples[0])
    cross_v = [n for n in layers if n.endswith("EncDecAttention.v")]
    assert len(cross_v) == 2 and len({groups[n] for n in cross_v}) == 1  # one input: the encoder's output
    for name in layers:  # q and v of a self-attention share one input; a cross-attention's q has its own
        if name.endswith("SelfAttention.v"):
            assert groups[name] == groups[name[:-1] + "q"]
        if name.endswith("EncDecAttention.q"):
            assert groups[name] not in {groups[n] for n in cross_v}
    covs = input_covariances(ctx, examples, layers, groups)
    encoded = torch.zeros(64, 64, dtype=torch.float64)
    model = ctx.adapters.model.eval()
    with torch.no_grad():
        for example in examples:
            batch = ctx.objective.collate([example])
            e = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            h = e.last_hidden_state.reshape(-1, 64).double()
            encoded += h.T @ h
    torch.testing.assert_close(covs[groups[cross_v[0]]].double(), encoded, rtol=1e-4, atol=1e-3)
    decoder_q = next(n for n in layers if n.endswith("EncDecAttention.q"))
    assert not torch.allclose(covs[groups[decoder_q]].double(), encoded, rtol=0.1)  # the reference's input


# ------------------------------------------------------------------------------------------ runs

COMMON = ["--model", "tiny-t5", "--tasks", "harbor,orchard", "--max-train-samples", "16", "--max-eval-samples", "4",
          "--batch-size", "4", "--epochs", "1", "--lr", "1e-2", "--max-target-length", "4", "--lora-dropout", "0",
          "--device", "cpu", "--quiet", "--eval-plan", "final"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_dir):
    root = tmp_path_factory.mktemp("inflora")
    for method in ("inflora", "inc-lora"):
        extra = ["--inflora-samples", "16"] if method == "inflora" else []
        assert main(["run", "--method", method, *extra, *COMMON, "--data-dir", str(synthetic_dir),
                     "--output-dir", str(root / method)]) == 0
    return root


def test_a_run_trains_B_only_with_A_outside_the_first_tasks_subspace(runs):
    run = runs / "inflora"
    bases = load_state(run / "adapters" / "0-harbor")["bases"]
    assert bases and all(0 < M.shape[1] < M.shape[0] for M in bases.values())
    second = read_adapter(run / "adapters" / "1-orchard")
    config_layers = {name.removeprefix("base_model.model."): M for name, M in bases.items()}
    checked = 0
    for layer, (A, B, _) in second.items():
        A = A.double()
        torch.testing.assert_close(A @ A.T, A_SCALE ** 2 * torch.eye(A.shape[0], dtype=torch.float64),
                                   atol=1e-5, rtol=0)  # the designed A, untouched by training
        if layer in config_layers:
            assert (A @ config_layers[layer].double()).abs().max() < 1e-5
            checked += 1
        assert B.abs().sum() > 0
    assert checked >= 1


def _first_task_inputs(run) -> dict[str, torch.Tensor]:
    """Each adapted layer's inputs on the first task's training examples, in the model after the first task
    (rebuilt from its saved adapter alone), one example per forward."""
    from nlora.config import load_config
    from nlora.runner import load_tasks

    config = load_config(run / "config.yaml", saved_run=True)
    bb = load_backbone("tiny-t5")
    model = add_adapters(bb.model, [run / "adapters" / "0-harbor"]).eval()
    objective = make_objective(bb.kind, bb.tokenizer, config.max_source_length, config.max_target_length)
    modules = dict(model.named_modules())
    layers = read_adapter(run / "adapters" / "0-harbor")
    inputs = {n: [] for n in layers}
    def keep(name):
        def hook(module, args):
            inputs[name].append(args[0].reshape(-1, args[0].shape[-1]))
        return hook

    handles = [modules[n].register_forward_pre_hook(keep(n)) for n in layers]
    with torch.no_grad():
        for example in load_tasks(config)[0].train:
            objective.forward(model, objective.collate([example]))
    for h in handles:
        h.remove()
    return {n: torch.cat(xs).double() for n, xs in inputs.items()}


def _interference(run) -> float:
    """How much the second adapter moves the first task's inputs, relative to how much it could:
    Σ_layers ‖ΔW₁ X₀ᵀ‖_F / Σ_layers ‖ΔW₁‖₂ ‖X₀‖_F (1: X₀ lies along ΔW₁'s strongest direction; 0: untouched)."""
    X = _first_task_inputs(run)
    moved = possible = 0.0
    for layer, (A, B, s) in read_adapter(run / "adapters" / "1-orchard").items():
        delta = s * B.double() @ A.double()
        moved += float((X[layer] @ delta.T).norm())
        possible += float(torch.linalg.matrix_norm(delta, 2) * X[layer].norm())
    return moved / possible


def test_later_adapters_move_earlier_inputs_much_less_than_inc_lora(runs):
    inflora, inc = _interference(runs / "inflora"), _interference(runs / "inc-lora")
    assert inflora < 0.5 * inc, (inflora, inc)  # 0.13 against 0.37 when written


def test_the_part_of_earlier_inputs_inside_the_subspace_is_not_moved_at_all(runs):
    run = runs / "inflora"
    X = _first_task_inputs(run)
    bases = load_state(run / "adapters" / "0-harbor")["bases"]
    checked = 0
    for layer, (A, B, s) in read_adapter(run / "adapters" / "1-orchard").items():
        M = bases.get("base_model.model." + layer)
        if M is None:  # a layer sharing its input (and basis) with another
            continue
        inside = X[layer] @ M.double() @ M.double().T
        assert inside.norm() > 0.9 * X[layer].norm()  # most of the first task's inputs lie in the subspace
        delta = s * B.double() @ A.double()
        assert (inside @ delta.T).norm() < 1e-6 * torch.linalg.matrix_norm(delta, 2) * inside.norm()
        checked += 1
    assert checked >= 5
