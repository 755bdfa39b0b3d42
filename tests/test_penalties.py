"""nlora.methods.penalties against brute-force float64 references (explicit loops, or plain autograd in float64)."""

from __future__ import annotations

import pytest
import torch

from nlora.methods.penalties import (
    PENALTY_FORMS,
    delta_l1,
    default_chunk_rows,
    delta_l1_naive,
    factors_l1,
    l2_norms,
    l2_squared,
    lora_l1,
    olora_orthogonality,
    reference_l1,
)

F64 = torch.float64


def _factors(d_out, d_in, r, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=F64)
    B = torch.randn(d_out, r, generator=g, dtype=F64)
    return A.to(dtype), B.to(dtype)


def _loop_delta_l1(A, B, s):
    """Σ_ij |s Σ_k B_ik A_kj| with Python loops in float64."""
    A, B = A.double().tolist(), B.double().tolist()
    return sum(abs(s * sum(B[i][k] * A[k][j] for k in range(len(A))))
               for i in range(len(B)) for j in range(len(A[0])))


def _loop_delta_grads(A, B, s):
    """∂/∂A_kj = Σ_i |s| B_ik sign(BA)_ij, ∂/∂B_ik = Σ_j |s| sign(BA)_ij A_kj, with loops in float64."""
    A, B = A.double(), B.double()
    r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
    sgn = [[(lambda v: (v > 0) - (v < 0))(sum(B[i, k].item() * A[k, j].item() for k in range(r)))
            for j in range(d_in)] for i in range(d_out)]
    gA = torch.tensor([[abs(s) * sum(B[i, k].item() * sgn[i][j] for i in range(d_out)) for j in range(d_in)]
                       for k in range(r)], dtype=F64)
    gB = torch.tensor([[abs(s) * sum(sgn[i][j] * A[k, j].item() for j in range(d_in)) for k in range(r)]
                       for i in range(d_out)], dtype=F64)
    return gA, gB


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    return value, torch.autograd.grad(value, leaves)


# ------------------------------------------------------------------------------------------ hand cases

def test_delta_by_hand():
    # A = [[1, -2]] (r=1, d_in=2), B = [[3], [-1]] (d_out=2), s = 0.5:
    # BA = [[3, -6], [-1, 2]], Σ|BA| = 12, value 0.5 * 12 = 6.
    # sign(BA) = [[1, -1], [-1, 1]]; dA = 0.5 * Bᵀ sign = 0.5 * [3+1, -3-1] = [[2, -2]];
    # dB = 0.5 * sign Aᵀ = 0.5 * [[1+2], [-1-2]] = [[1.5], [-1.5]].
    A = torch.tensor([[1.0, -2.0]])
    B = torch.tensor([[3.0], [-1.0]])
    for chunk in (1, 2, 1024, "auto", None):
        value, (gA, gB) = _grads(lambda a, b: delta_l1(a, b, 0.5, chunk_size=chunk), A, B)
        assert value.item() == pytest.approx(6.0)
        torch.testing.assert_close(gA, torch.tensor([[2.0, -2.0]]))
        torch.testing.assert_close(gB, torch.tensor([[1.5], [-1.5]]))


def test_reference_delta_factors_differ_by_hand():
    # A = [[1, -2], [3, 4]] (r=2, d_in=2), B = [[1, 1], [0, 1]] (d_out=2, r=2)
    # reference: A @ B = [[1, -1], [3, 7]]        → Σ|.| = 12
    # delta:     B @ A = [[4, 2], [3, 4]], s = 2  → 2 * 13 = 26
    # factors:   |A| = 10, |B| = 3                → 13
    A = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    B = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert reference_l1(A, B).item() == pytest.approx(12.0)
    assert reference_l1(A, B, scaling=2.0).item() == pytest.approx(24.0)
    assert delta_l1(A, B, 2.0).item() == pytest.approx(26.0)
    assert delta_l1(A, B, 2.0, chunk_size=1).item() == pytest.approx(26.0)
    assert factors_l1(A, B).item() == pytest.approx(13.0)
    assert lora_l1("reference", A, B, 2.0).item() == pytest.approx(12.0)  # public code: no scaling
    assert lora_l1("delta", A, B, 2.0).item() == pytest.approx(26.0)
    assert lora_l1("factors", A, B, 2.0).item() == pytest.approx(13.0)
    # gradient of the reference form: d/dA = sign(AB) Bᵀ, d/dB = Aᵀ sign(AB); sign(AB) = [[1, -1], [1, 1]]
    # sign Bᵀ = [[1-1, 0-1], [1+1, 0+1]] = [[0, -1], [2, 1]]
    # Aᵀ sign = [[1+3, -1+3], [-2+4, 2+4]] = [[4, 2], [2, 6]]
    _, (gA, gB) = _grads(reference_l1, A, B)
    torch.testing.assert_close(gA, torch.tensor([[0.0, -1.0], [2.0, 1.0]]))
    torch.testing.assert_close(gB, torch.tensor([[4.0, 2.0], [2.0, 6.0]]))


def test_olora_by_hand():
    # A_t = [[1, 0, -1]]; A_1 = [[2, 1, 1]] → A_1 A_tᵀ = [[2 - 1]] = [[1]]          → 1
    # A_2 = [[0, -3, 1], [1, 1, 1]]      → A_2 A_tᵀ = [[0 - 1], [1 - 1]] = [[-1], [0]] → 1;  total 2
    At = torch.tensor([[1.0, 0.0, -1.0]])
    A1 = torch.tensor([[2.0, 1.0, 1.0]])
    A2 = torch.tensor([[0.0, -3.0, 1.0], [1.0, 1.0, 1.0]])
    assert olora_orthogonality(At, [A1, A2]).item() == pytest.approx(2.0)
    assert olora_orthogonality(At, torch.cat([A1, A2])).item() == pytest.approx(2.0)
    assert olora_orthogonality(At, [A1]).item() == pytest.approx(1.0)
    # d/dA_t = Σ_s sign(A_s A_tᵀ)ᵀ A_s = 1 * [2, 1, 1] + (-1) * [0, -3, 1] + 0 * [1, 1, 1] = [2, 4, 0]
    _, (g,) = _grads(lambda a: olora_orthogonality(a, [A1, A2]), At)
    torch.testing.assert_close(g, torch.tensor([[2.0, 4.0, 0.0]]))


def test_l2_squared_by_hand():
    # 1 + 4 + 9 + 16 = 30, plus (-2)^2 = 4 → 34; gradient 2θ
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([-2.0])
    value, (ga, gb) = _grads(lambda x, y: l2_squared([x, y]), a, b)
    assert value.item() == pytest.approx(34.0)
    torch.testing.assert_close(ga, 2 * a)
    torch.testing.assert_close(gb, 2 * b)
    assert l2_squared(t for t in (a, b)).item() == pytest.approx(34.0)  # any iterable
    assert l2_squared([]).item() == 0.0


# ------------------------------------------------------------------------------------- delta vs loops

SHAPES = [(5, 7, 3), (7, 5, 3), (6, 6, 1), (1, 4, 2), (9, 4, 8), (10, 3, 2)]  # (d_out, d_in, r)
CHUNKS = [1, 3, 7, 64, None]


@pytest.mark.parametrize("d_out,d_in,r", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_delta_matches_loops(d_out, d_in, r, chunk):
    A, B = _factors(d_out, d_in, r, seed=d_out * 100 + d_in * 10 + r)
    assert (B.double() @ A.double()).abs().min() > 1e-4  # signs agree between float32 and float64
    s = 1.7
    value, (gA, gB) = _grads(lambda a, b: delta_l1(a, b, s, chunk_size=chunk), A, B)
    assert value.dtype == torch.float32 and value.shape == ()
    assert value.item() == pytest.approx(_loop_delta_l1(A, B, s), rel=1e-5)
    ref_gA, ref_gB = _loop_delta_grads(A, B, s)
    torch.testing.assert_close(gA.double(), ref_gA, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gB.double(), ref_gB, rtol=1e-5, atol=1e-5)


def test_delta_auto_chunk_is_the_device_default():
    # "auto" takes default_chunk_rows of the factors' device: on CPU the same loop as an explicit 256, bit for bit
    assert default_chunk_rows(torch.device("cpu")) == 256
    assert default_chunk_rows(torch.device("meta")) == 1024  # any accelerator: the larger chunk
    A, B = _factors(600, 40, 4, seed=5)  # 600 rows: 3 chunks of 256, the last one partial
    v, (gA, gB) = _grads(lambda a, b: delta_l1(a, b, 1.5), A, B)
    w, (hA, hB) = _grads(lambda a, b: delta_l1(a, b, 1.5, chunk_size=256), A, B)
    assert torch.equal(v, w) and torch.equal(gA, hA) and torch.equal(gB, hB)
    u, (kA, kB) = _grads(lambda a, b: delta_l1_naive(a, b, 1.5), A.double(), B.double())
    assert v.item() == pytest.approx(u.item(), rel=1e-6)
    torch.testing.assert_close(gA.double(), kA, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gB.double(), kB, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 11, 12, 13, 1000])
def test_delta_chunked_equals_naive_float64(chunk):
    # 12 rows: chunks that divide d_out (1, 2, 3, 12), that do not (7, 11), and that exceed it (13, 1000)
    A, B = _factors(12, 9, 4, seed=chunk, dtype=F64)
    v, (gA, gB) = _grads(lambda a, b: delta_l1(a, b, 2.0, chunk_size=chunk), A, B)
    w, (hA, hB) = _grads(lambda a, b: delta_l1_naive(a, b, 2.0), A, B)
    assert v.dtype == F64
    torch.testing.assert_close(v, w, rtol=1e-12, atol=0)
    torch.testing.assert_close(gA, hA, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gB, hB, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("need_a,need_b", [(True, False), (False, True), (False, False)])
def test_delta_partial_requires_grad(need_a, need_b):
    A, B = _factors(8, 5, 3, seed=3, dtype=F64)
    A.requires_grad_(need_a)
    B.requires_grad_(need_b)
    value = delta_l1(A, B, 0.5, chunk_size=3)
    assert value.requires_grad == (need_a or need_b)
    ref_gA, ref_gB = _loop_delta_grads(A.detach(), B.detach(), 0.5)
    if need_a or need_b:
        value.backward()
    assert (A.grad is not None) == need_a and (B.grad is not None) == need_b
    if need_a:
        torch.testing.assert_close(A.grad, ref_gA)
    if need_b:
        torch.testing.assert_close(B.grad, ref_gB)
    assert value.item() == pytest.approx(_loop_delta_l1(A.detach(), B.detach(), 0.5))


def test_delta_at_lora_init_and_negative_scaling():
    # PEFT initialises B = 0: ΔW = 0, value 0, subgradient sign(0) = 0 as in autograd's |x|.
    A, _ = _factors(6, 4, 2, seed=5, dtype=F64)
    B0 = torch.zeros(6, 2, dtype=F64)
    v, (gA, gB) = _grads(lambda a, b: delta_l1(a, b, 2.0, chunk_size=4), A, B0)
    w, (hA, hB) = _grads(lambda a, b: delta_l1_naive(a, b, 2.0), A, B0)
    assert v.item() == 0.0 and w.item() == 0.0
    assert gA.abs().sum() == 0 and gB.abs().sum() == 0
    torch.testing.assert_close((gA, gB), (hA, hB))
    # ‖s·BA‖₁ = |s|·‖BA‖₁ for s < 0
    A, B = _factors(6, 4, 2, seed=6, dtype=F64)
    v, (gA, gB) = _grads(lambda a, b: delta_l1(a, b, -0.75, chunk_size=4), A, B)
    w, (hA, hB) = _grads(lambda a, b: delta_l1_naive(a, b, -0.75), A, B)
    torch.testing.assert_close(v, w)
    torch.testing.assert_close((gA, gB), (hA, hB))
    assert v.item() == pytest.approx(_loop_delta_l1(A, B, -0.75))


def test_delta_grad_output_is_applied():
    A, B = _factors(7, 5, 2, seed=8, dtype=F64)
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    (3.0 * delta_l1(a, b, 1.0, chunk_size=2)).backward()
    ref_gA, ref_gB = _loop_delta_grads(A, B, 1.0)
    torch.testing.assert_close(a.grad, 3.0 * ref_gA)
    torch.testing.assert_close(b.grad, 3.0 * ref_gB)


def _smooth_factors(d_out, d_in, seed):
    """r = 2 factors whose product has no entry near 0: a dominant rank-1 part with entries of magnitude in
    [1, 2] and random signs, plus a small second component (|·| < 0.05 · 0.05 · ... per entry)."""
    g = torch.Generator().manual_seed(seed)

    def big(*shape):
        signs = torch.randint(0, 2, shape, generator=g, dtype=F64) * 2 - 1
        return signs * (1 + torch.rand(*shape, generator=g, dtype=F64))

    A = torch.stack([big(d_in), 0.05 * torch.rand(d_in, generator=g, dtype=F64)])
    B = torch.stack([big(d_out), 0.05 * torch.rand(d_out, generator=g, dtype=F64)], dim=1)
    assert (B @ A).abs().min() > 0.9
    return A.requires_grad_(), B.requires_grad_()


@pytest.mark.parametrize("d_out,d_in,chunk", [(6, 6, 1), (7, 4, 3), (4, 9, 7), (5, 3, 100)])
def test_delta_gradcheck(d_out, d_in, chunk):
    A, B = _smooth_factors(d_out, d_in, seed=d_out + d_in)
    assert torch.autograd.gradcheck(lambda a, b: delta_l1(a, b, 1.25, chunk_size=chunk), (A, B))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_delta_half_precision_accumulates_in_float32(dtype):
    # 300 x 200 entries of order 1: a 16-bit running sum would be off by far more than 1e-5 relative
    A, B = _factors(300, 200, 8, seed=11, dtype=dtype)
    exact = (B.double() @ A.double()).abs().sum().item() * 2.0
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    value = delta_l1(a, b, 2.0, chunk_size=64)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(exact, rel=1e-5)
    value.backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    _, (hA, hB) = _grads(lambda x, y: delta_l1_naive(x, y, 2.0), A.double(), B.double())
    torch.testing.assert_close(a.grad.double(), hA, rtol=2e-2, atol=0.5)
    torch.testing.assert_close(b.grad.double(), hB, rtol=2e-2, atol=0.5)


def test_delta_keeps_only_the_factors_for_backward():
    """The chunked form saves nothing of size d_out × d_in for backward; the naive form saves ΔW."""
    A, B = _factors(64, 48, 4, seed=12)
    A.requires_grad_()
    B.requires_grad_()

    def saved_numel(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sizes

    chunked = saved_numel(lambda: delta_l1(A, B, 2.0, chunk_size=16))
    naive = saved_numel(lambda: delta_l1_naive(A, B, 2.0))
    assert max(chunked) <= max(A.numel(), B.numel())
    assert max(naive) >= 64 * 48


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_delta_on_cuda():
    A, B = _factors(40, 30, 4, seed=13, dtype=F64)
    v, (gA, gB) = _grads(lambda a, b: delta_l1(a, b, 2.0, chunk_size=7), A.cuda(), B.cuda())
    w, (hA, hB) = _grads(lambda a, b: delta_l1_naive(a, b, 2.0), A, B)
    assert v.device.type == "cuda" and gA.device.type == "cuda"
    torch.testing.assert_close(v.cpu(), w)
    torch.testing.assert_close((gA.cpu(), gB.cpu()), (hA, hB))


def test_delta_rejects_bad_arguments():
    A, B = _factors(4, 3, 2, seed=1)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            delta_l1(A, B, 1.0, chunk_size=bad)
    with pytest.raises(ValueError, match="ranks differ"):
        delta_l1(A, torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        delta_l1(A[0], B, 1.0)


# ------------------------------------------------------------------------------ reference and factors

def _loop_matrix_l1(M):
    return sum(abs(x) for row in M.double().tolist() for x in row)


@pytest.mark.parametrize("d,r", [(5, 3), (4, 1), (3, 6)])
def test_reference_matches_brute_force(d, r):
    A, B = _factors(d, d, r, seed=d * r, dtype=F64)
    value, (gA, gB) = _grads(lambda a, b: reference_l1(a, b, scaling=0.5), A, B)
    prod = [[sum(A[i, k].item() * B[k, j].item() for k in range(d)) for j in range(r)] for i in range(r)]
    assert value.item() == pytest.approx(0.5 * sum(abs(x) for row in prod for x in row))
    sgn = torch.tensor(prod, dtype=F64).sign()
    torch.testing.assert_close(gA, 0.5 * sgn @ B.T)
    torch.testing.assert_close(gB, 0.5 * A.T @ sgn)
    assert reference_l1(A, B).item() == pytest.approx(2 * value.item())  # default scaling 1.0


def test_reference_rejects_rectangular_layers():
    A, B = _factors(6, 4, 2, seed=2)  # d_out=6, d_in=4
    with pytest.raises(ValueError) as err:
        reference_l1(A, B)
    msg = str(err.value)
    assert "(2, 4)" in msg and "(6, 2)" in msg and "penalty_form: delta" in msg
    with pytest.raises(ValueError, match="penalty_form: delta"):
        lora_l1("reference", A, B, 2.0)


@pytest.mark.parametrize("d_out,d_in,r", [(5, 7, 3), (6, 2, 1)])
def test_factors_matches_brute_force(d_out, d_in, r):
    A, B = _factors(d_out, d_in, r, seed=d_out + r, dtype=F64)
    value, (gA, gB) = _grads(factors_l1, A, B)
    assert value.item() == pytest.approx(_loop_matrix_l1(A) + _loop_matrix_l1(B))
    torch.testing.assert_close(gA, A.sign())
    torch.testing.assert_close(gB, B.sign())
    half = factors_l1(A.bfloat16(), B.bfloat16())
    assert half.dtype == torch.float32


# ------------------------------------------------------------------------------------------- dispatch

def test_lora_l1_dispatch_and_errors():
    A, B = _factors(9, 9, 2, seed=4, dtype=F64)
    assert PENALTY_FORMS == ("delta", "reference", "factors")
    torch.testing.assert_close(lora_l1("delta", A, B, 3.0, chunk_size=2), delta_l1_naive(A, B, 3.0))
    torch.testing.assert_close(lora_l1("delta", A, B, 3.0, chunk_size=None), delta_l1_naive(A, B, 3.0))
    torch.testing.assert_close(lora_l1("reference", A, B, 3.0), reference_l1(A, B))
    torch.testing.assert_close(lora_l1("factors", A, B, 3.0), factors_l1(A, B))
    with pytest.raises(ValueError) as err:
        lora_l1("l1", A, B, 1.0)
    assert "'l1'" in str(err.value) and all(form in str(err.value) for form in PENALTY_FORMS)


def test_penalty_forms_match_the_n_lora_option():
    from nlora.methods.n_lora import NLoRAOptions
    from nlora.options import option_fields

    choices = next(f.metadata["choices"] for f in option_fields(NLoRAOptions) if f.name == "penalty_form")
    assert tuple(choices) == PENALTY_FORMS


# ---------------------------------------------------------------------------------------------- O-LoRA

@pytest.mark.parametrize("ranks", [[3], [2, 4, 1], [1, 1]])
def test_olora_matches_brute_force(ranks):
    d_in, r = 6, 3
    g = torch.Generator().manual_seed(sum(ranks))
    At = torch.randn(r, d_in, generator=g, dtype=F64)
    prev = [torch.randn(rs, d_in, generator=g, dtype=F64) for rs in ranks]
    value, (g_t, *g_prev) = _grads(lambda a, *p: olora_orthogonality(a, list(p)), At, *prev)
    expect = sum(abs(sum(P[i, k].item() * At[j, k].item() for k in range(d_in)))
                 for P in prev for i in range(P.shape[0]) for j in range(r))
    assert value.item() == pytest.approx(expect)
    torch.testing.assert_close(olora_orthogonality(At, torch.cat(prev)), value.detach())
    expect_gt = sum((P @ At.T).sign().T @ P for P in prev)
    torch.testing.assert_close(g_t, expect_gt)
    for P, gp in zip(prev, g_prev):
        torch.testing.assert_close(gp, (P @ At.T).sign() @ At)


def test_olora_without_earlier_tasks_is_zero():
    At = torch.randn(2, 5, dtype=torch.bfloat16)
    for empty in ([], torch.zeros(0, 5, dtype=torch.bfloat16)):
        value = olora_orthogonality(At, empty)
        assert value.shape == () and value.item() == 0.0 and value.device == At.device
        assert value.dtype == torch.float32


def test_olora_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="does not match"):
        olora_orthogonality(torch.randn(2, 5), [torch.randn(2, 4)])


def test_l2_squared_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    value, grads = _grads(lambda *t: l2_squared(t), *ts)
    assert value.item() == pytest.approx(sum(x * x for t in ts for x in t.flatten().tolist()))
    for t, gt in zip(ts, grads):
        torch.testing.assert_close(gt, 2 * t)
    assert l2_squared([t.bfloat16() for t in ts]).dtype == torch.float32


def test_all_results_are_scalars_on_the_input_device():
    """On the meta device (no data, no GPU needed), so a result or gradient created on the CPU would show."""
    A = torch.empty(2, 4, device="meta", requires_grad=True)
    B = torch.empty(4, 2, device="meta", requires_grad=True)
    outs = [delta_l1(A, B, 1.0), delta_l1(A, B, 1.0, chunk_size=1), delta_l1_naive(A, B, 1.0), reference_l1(A, B),
            factors_l1(A, B), olora_orthogonality(A, [A]), olora_orthogonality(A, []), l2_squared([A, B])]
    outs += [lora_l1(f, A, B, 1.0) for f in PENALTY_FORMS]
    for i, out in enumerate(outs):
        assert out.shape == () and out.device.type == "meta", i
    grads = torch.autograd.grad(delta_l1(A, B, 1.0, chunk_size=1), [A, B])
    assert all(g.device.type == "meta" for g in grads)


def test_l2_norms_by_hand():
    # O-LoRA's public L2: Σ ‖θ‖₂ unsquared: sqrt(30) + 2; gradient θ / ‖θ‖, and 0 at a zero tensor (B at start)
    a, b, z = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([-2.0]), torch.zeros(2, 3)
    value, (ga, gb, gz) = _grads(lambda x, y, w: l2_norms([x, y, w]), a, b, z)
    assert value.item() == pytest.approx(30 ** 0.5 + 2.0)
    torch.testing.assert_close(ga, a / 30 ** 0.5)
    torch.testing.assert_close(gb, torch.tensor([-1.0]))
    torch.testing.assert_close(gz, torch.zeros(2, 3))
    assert l2_norms([]).item() == 0.0
