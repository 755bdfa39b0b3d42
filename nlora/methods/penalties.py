"""Regularisers of the continual-learning methods, as pure tensor functions.

LoRA conventions (as in PEFT), for one adapted linear layer: ``A`` is (r, d_in), ``B`` is (d_out, r),
``scaling = lora_alpha / r`` and the task's update is ``ΔW = scaling · B @ A`` (d_out × d_in).

Every function returns a 0-dim tensor on the inputs' device. Sums are taken in float32 at least: for
float16/bfloat16 inputs the result is float32 (gradients keep the parameters' dtype); float32 and float64
inputs give a result of their own dtype.

Sources of the public-code forms (read for reference, not copied):
  * N-LoRA (PKU-YuanGroup/N-LoRA, a fork of cmnfriend/O-LoRA): the L1 term is added in the trainer,
    ``src/uie_trainer_lora.py``, ``UIETrainer.training_step`` (the O-LoRA layout it forks), as
    ``l1_loss += torch.norm(torch.mm(loranew_A, loranew_B), p=1)`` summed over the current task's adapters,
    then ``loss + l1_loss * lamda_1``: the r × r product of the stored factors, with no scaling. The index
    searched here holds only that repository's README, so the line was read in a public derivative of the
    trainer; the repository's issue #2 ("L1约束和论文不太一致", code on r×r, paper on d×d) confirms the form.
  * O-LoRA (cmnfriend/O-LoRA), ``src/uie_trainer_lora.py``, ``UIETrainer.training_step``:
    ``orthogonal_loss += torch.abs(torch.mm(lora_A, loranew_A.T)).sum()``, where ``lora_A`` holds the
    earlier tasks' A matrices concatenated along the rank dimension (``src/peft/tuners/lora.py``), and
    ``l2_loss += torch.norm(param, p=2)`` over the new adapter's A and B.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.autograd.function import once_differentiable

from ..precision import autocast_off

__all__ = [
    "PENALTY_FORMS",
    "default_chunk_rows",
    "delta_l1",
    "delta_l1_naive",
    "reference_l1",
    "factors_l1",
    "lora_l1",
    "olora_orthogonality",
    "l2_squared",
]

PENALTY_FORMS = ("delta", "reference", "factors")

_HALF = (torch.float16, torch.bfloat16)


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype sums (and, for 16-bit inputs, products) are computed in: float32 at least."""
    dt = dtypes[0]
    for other in dtypes[1:]:
        dt = torch.promote_types(dt, other)
    if dt in _HALF or not dt.is_floating_point:
        return torch.float32
    return dt


def _check_factors(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"LoRA factors must be 2-D: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"LoRA ranks differ: A is {tuple(A.shape)} (r x d_in) but B is {tuple(B.shape)} "
                         f"(d_out x r)")


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")


# Rows of ΔW per chunk for chunk_size="auto". CPU: 256, the fastest measured at d_in 2048 and 4096 and within 10%
# of the fastest at d_in 1024 (benchmarks/penalty_chunks.py). Accelerators: 1024, fewer and larger kernels, since
# each launch has a fixed cost (not measured on a GPU).
CPU_CHUNK_ROWS, ACCELERATOR_CHUNK_ROWS = 256, 1024


def default_chunk_rows(device: torch.device) -> int:
    """The rows of ΔW that `delta_l1` forms at once on `device` when chunk_size is "auto"."""
    return CPU_CHUNK_ROWS if device.type == "cpu" else ACCELERATOR_CHUNK_ROWS


# --------------------------------------------------------------------------------------------- ‖ΔW‖₁

def delta_l1_naive(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖scaling · B @ A‖₁ by plain autograd through the full d_out × d_in product (the reference for
    `delta_l1`; autograd keeps the whole product alive until backward)."""
    _check_factors(A, B)
    return (scaling * (B @ A)).abs().sum(dtype=_acc_dtype(A.dtype, B.dtype))


class _ChunkedDeltaL1(torch.autograd.Function):
    """‖s·B·A‖₁ = |s| Σ|BA|, formed ``chunk_size`` rows of ΔW at a time.

    The subgradient is formed in the same chunk loop, while each chunk's product P_c = B_c A is at hand: with the
    sign pattern S_c = sign(P_c) (sign(0) = 0, the subgradient of |·| that autograd uses),
    ∂/∂A = |s| Σ_c B_cᵀ S_c and ∂/∂B_c = |s| S_c Aᵀ. Only these r × d gradients are kept for backward, which
    just scales them by grad_output: no ΔW chunk is formed twice. The value needs no pass of its own:
    Σ|P| = Σ S ⊙ (B A) = Σ B ⊙ (S Aᵀ) = Σ A ⊙ (Bᵀ S). Without a gradient to form (no grad mode, or neither
    factor requires grad) the loop computes the value alone.

    Each chunk is held transposed, P_cᵀ = Aᵀ B_cᵀ (d_in × rows): with one side of width r the BLAS products
    run faster in that layout (with MKL on a CPU the loop takes about a quarter less time at d 2048-4096,
    `benchmarks/penalty_chunks.py`).
    """

    @staticmethod
    def forward(ctx, A, B, scaling, chunk_size, need_a, need_b):
        with autocast_off(A.device):  # the sums stay in float32 inside an autocast forward
            return _ChunkedDeltaL1._forward(ctx, A, B, scaling, chunk_size, need_a, need_b)

    @staticmethod
    def _forward(ctx, A, B, scaling, chunk_size, need_a, need_b):
        cd = _acc_dtype(A.dtype, B.dtype)
        a = A.to(cd)
        a_t = a.T.contiguous()  # d_in × r
        b_t = B.T.to(cd).contiguous()  # r × d_out: each chunk's B_cᵀ is a column slice
        d_in, d_out = A.shape[1], B.shape[0]
        rows = min(chunk_size, d_out)
        # one buffer for every chunk's product: a fresh large allocation per chunk costs page faults on CPU
        buffer = torch.empty(d_in * rows, dtype=cd, device=A.device)
        grad_a_t = torch.zeros_like(a_t) if need_a else None  # (Bᵀ S)ᵀ = Sᵀ B, accumulated over chunks
        grad_b_t = torch.empty_like(b_t) if need_b else None  # (S Aᵀ)ᵀ = A Sᵀ, one column slice per chunk
        total = torch.zeros((), dtype=cd, device=A.device)
        for start in range(0, d_out, rows):
            b_c = b_t[:, start:start + rows]
            product_t = torch.mm(a_t, b_c, out=buffer[:d_in * b_c.shape[1]].view(d_in, b_c.shape[1]))
            if not (need_a or need_b):
                total += torch.linalg.vector_norm(product_t, 1)
                continue
            sign_t = product_t.sign_()
            if need_b:
                grad_b_t[:, start:start + rows] = a @ sign_t
            if need_a:
                grad_a_t.addmm_(sign_t, b_c.T)
        if need_b:
            total = torch.vdot(b_t.flatten(), grad_b_t.flatten())
        elif need_a:
            total = torch.vdot(a_t.flatten(), grad_a_t.flatten())
        scale = abs(float(scaling))
        ctx.save_for_backward(None if grad_a_t is None else grad_a_t.T.contiguous(),
                              None if grad_b_t is None else grad_b_t.T.contiguous())
        ctx.scale, ctx.dtypes = scale, (A.dtype, B.dtype)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_a, grad_b = ctx.saved_tensors
        coef = grad_out * ctx.scale
        out_a = None if grad_a is None else (grad_a * coef.to(grad_a.dtype)).to(ctx.dtypes[0])
        out_b = None if grad_b is None else (grad_b * coef.to(grad_b.dtype)).to(ctx.dtypes[1])
        return out_a, out_b, None, None, None, None


def delta_l1(A: torch.Tensor, B: torch.Tensor, scaling: float,
             chunk_size: int | str | None = "auto") -> torch.Tensor:
    """Exact ‖scaling · B @ A‖₁ (the paper's ‖ΔW_t‖₁) without materialising ΔW: value and subgradient are
    computed together in forward, ``chunk_size`` rows of ΔW at a time, so the extra memory is one
    chunk_size × d_in block and backward costs nothing. ``"auto"``: `default_chunk_rows` of A's device;
    ``None`` falls back to `delta_l1_naive`. Not twice differentiable."""
    _check_factors(A, B)
    if chunk_size is None:
        return delta_l1_naive(A, B, scaling)
    if chunk_size == "auto":
        chunk_size = default_chunk_rows(A.device)
    _check_chunk_size(chunk_size)
    grad = torch.is_grad_enabled()
    return _ChunkedDeltaL1.apply(A, B, scaling, chunk_size, grad and A.requires_grad, grad and B.requires_grad)


def reference_l1(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """What N-LoRA's public code adds: ‖scaling · A @ B‖₁, the r × r product of the stored factors
    (PKU-YuanGroup/N-LoRA, ``src/uie_trainer_lora.py``: ``torch.norm(torch.mm(loranew_A, loranew_B), p=1)``;
    ``torch.norm(p=1)`` of a matrix is the entrywise sum of absolute values).

    The public code does not multiply by scaling, hence the default 1.0 (and `lora_l1` passes none).
    A @ B only exists when d_in == d_out (true for the q/v projections of T5 and LLaMA-7B that the paper
    trains); for a rectangular layer this raises ValueError instead of inventing a form the code never had.
    """
    _check_factors(A, B)
    if A.shape[1] != B.shape[0]:
        raise ValueError(
            f"penalty_form 'reference' (the public code's |A @ B|_1, an r x r product) needs a square layer, "
            f"but A is {tuple(A.shape)} (r x d_in) and B is {tuple(B.shape)} (d_out x r): d_in={A.shape[1]} "
            f"!= d_out={B.shape[0]}. Use penalty_form: delta (the paper's |scaling * B @ A|_1) or factors.")
    return (scaling * (A @ B)).abs().sum(dtype=_acc_dtype(A.dtype, B.dtype))


def factors_l1(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖A‖₁ + ‖B‖₁ (a cheap surrogate: it does not see the scaling)."""
    _check_factors(A, B)
    acc = _acc_dtype(A.dtype, B.dtype)
    return A.abs().sum(dtype=acc) + B.abs().sum(dtype=acc)


def lora_l1(form: str, A: torch.Tensor, B: torch.Tensor, scaling: float,
            chunk_size: int | str | None = "auto") -> torch.Tensor:
    """N-LoRA's L1 term for one layer in the given form: ``delta`` → `delta_l1(A, B, scaling, chunk_size)`,
    ``reference`` → `reference_l1(A, B)` (unscaled, as the public code), ``factors`` → `factors_l1(A, B)`."""
    if form == "delta":
        return delta_l1(A, B, scaling, chunk_size=chunk_size)
    if form == "reference":
        return reference_l1(A, B)
    if form == "factors":
        return factors_l1(A, B)
    raise ValueError(f"unknown penalty form {form!r}; expected one of {', '.join(PENALTY_FORMS)}")


# --------------------------------------------------------------------------------------------- O-LoRA

def olora_orthogonality(A_current: torch.Tensor,
                        A_previous: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """O-LoRA's orthogonality loss for one layer: Σ_s Σ|A_s @ A_tᵀ| over the earlier tasks' A_s (each
    r_s × d_in), i.e. Σ|A_prev @ A_tᵀ| with the earlier A's concatenated along the rank, as
    cmnfriend/O-LoRA ``src/uie_trainer_lora.py`` computes it. ``A_previous``: a list (empty → 0) or
    one concatenated tensor."""
    if A_current.dim() != 2:
        raise ValueError(f"A_current must be 2-D (r x d_in), got {tuple(A_current.shape)}")
    prev = [A_previous] if isinstance(A_previous, torch.Tensor) else list(A_previous)
    acc = _acc_dtype(A_current.dtype, *(p.dtype for p in prev))
    total = torch.zeros((), dtype=acc, device=A_current.device)
    for p in prev:
        if p.dim() != 2 or p.shape[1] != A_current.shape[1]:
            raise ValueError(f"earlier A of shape {tuple(p.shape)} does not match the current A "
                             f"{tuple(A_current.shape)} (both must be r x d_in)")
        total = total + (p.to(acc) @ A_current.to(acc).T).abs().sum()
    return total


def l2_squared(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_θ ‖θ‖² over the given tensors (empty → 0).

    Note: O-LoRA's public trainer adds Σ_θ ‖θ‖₂, the *unsquared* Frobenius norm of each of loranew_A/B
    (``torch.norm(param, p=2)``); this is the squared (weight-decay) form."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    acc = _acc_dtype(*(t.dtype for t in tensors))
    total = torch.zeros((), dtype=acc, device=tensors[0].device)
    for t in tensors:
        total = total + t.to(acc).square().sum()
    return total


def l2_norms(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_θ ‖θ‖₂, the unsquared Frobenius norm of each tensor, summed (empty → 0): O-LoRA's public trainer
    (cmnfriend/O-LoRA ``src/uie_trainer_lora.py``, ``torch.norm(param, p=2)`` over loranew_A and loranew_B)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    acc = _acc_dtype(*(t.dtype for t in tensors))
    # vector_norm's gradient at a zero tensor is 0 (B starts at zero), where sqrt(sum of squares) would give NaN
    return torch.stack([torch.linalg.vector_norm(t.to(acc)) for t in tensors]).sum()
