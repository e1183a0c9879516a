"""Triton kernels of the fused L1 loss.

Each program owns ROWS rows (b, t, n) of length D held in registers as one (ROWS, BLOCK_D) tile: the
target's layer-norm statistics (mean, then centred variance), the difference and its reduction are computed
from that single load, so pred and target are read once (16-byte vector loads when D is a multiple of 16,
which Triton specialises on). Forward writes each row's sum already divided by B*N*D, laid out (T, B*N), so
per_step is one contiguous torch sum (deterministic, no atomics); or, with reduce="last_program", the last
program of the same launch adds them (deterministic too: a fixed order, whichever program is last). Backward
writes coef[t] * sign(pred - target_n). Nothing is saved between the two: backward recomputes the row
statistics from the target it must read anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hope_kernels.ops.checks import env_choice

MAX_D = 16384  # one row must fit one register tile
REDUCE_ENV = "HOPE_L1_FWD_REDUCE"
REDUCE_MODES = ("torch_sum", "last_program")


@triton.jit
def _normalized_diff(
    p_ptr, t_ptr, row, rows, D, eps, NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr
):
    col = tl.arange(0, BLOCK_D)
    mask = (row[:, None] < rows) & (col[None, :] < D)
    offs = row[:, None].to(tl.int64) * D + col[None, :]
    b_t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)  # upcast at load: bf16 math is unsafe
    b_p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NORMALIZE:
        mean = tl.sum(b_t, axis=1) / D
        b_c = tl.where(mask, b_t - mean[:, None], 0.0)
        var = tl.sum(b_c * b_c, axis=1) / D
        b_t = b_c / tl.sqrt(var + eps)[:, None]
    return b_p - b_t, mask, offs


@triton.jit
def _store_row_sums(
    p_ptr,
    t_ptr,
    row_sum_ptr,
    rows,
    T,
    N,
    D,
    count,
    eps,
    NORMALIZE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b_d, mask, _ = _normalized_diff(p_ptr, t_ptr, row, rows, D, eps, NORMALIZE, ACC, BLOCK_D)
    b_abs = tl.where(mask, tl.abs(b_d), 0.0)
    # row = (b T + t) N + n is stored at t (B N) + b N + n
    b_idx = row // (T * N)
    t_idx = (row // N) % T
    out = t_idx * (rows // T) + b_idx * N + row % N
    # count = B N D passed as an int: a float argument would be fp32 on the GPU, too coarse for float64
    tl.store(row_sum_ptr + out, tl.sum(b_abs, axis=1) / count, mask=row < rows)


@triton.jit
def l1_fwd_rows_kernel(
    p_ptr,
    t_ptr,
    row_sum_ptr,
    rows,
    T,
    N,
    D,
    count,
    eps,
    NORMALIZE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _store_row_sums(p_ptr, t_ptr, row_sum_ptr, rows, T, N, D, count, eps, NORMALIZE, ACC, ROWS, BLOCK_D)


@triton.jit
def l1_fwd_last_program_kernel(
    p_ptr,
    t_ptr,
    row_sum_ptr,
    per_step_ptr,
    done_ptr,
    rows,
    T,
    N,
    D,
    count,
    eps,
    NORMALIZE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One launch: the rows' sums as l1_fwd_rows_kernel, then the program that finishes last (a counter at
    done_ptr, zero on entry) adds each t's B*N sums in a fixed order, so per_step does not depend on which."""
    _store_row_sums(p_ptr, t_ptr, row_sum_ptr, rows, T, N, D, count, eps, NORMALIZE, ACC, ROWS, BLOCK_D)
    tl.debug_barrier()  # every thread's row-sum store precedes the counter's release
    done = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        BN = rows // T
        for t in range(0, T):
            acc = tl.zeros((BLOCK_R,), ACC)
            for k in range(0, BN, BLOCK_R):
                idx = k + tl.arange(0, BLOCK_R)
                # .cg: read from L2, where the other programs' stores are
                acc += tl.load(row_sum_ptr + t * BN + idx, mask=idx < BN, other=0.0, cache_modifier=".cg")
            tl.store(per_step_ptr + t, tl.sum(acc, axis=0))


@triton.jit
def l1_bwd_rows_kernel(
    p_ptr,
    t_ptr,
    coef_ptr,
    g_ptr,
    rows,
    T,
    N,
    D,
    eps,
    NORMALIZE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b_d, mask, offs = _normalized_diff(p_ptr, t_ptr, row, rows, D, eps, NORMALIZE, ACC, BLOCK_D)
    b_c = tl.load(coef_ptr + (row // N) % T, mask=row < rows, other=0.0).to(ACC)[:, None]
    # sign(0) = sign(NaN) = 0, exactly as autograd of abs (torch.sign(nan) is 0)
    b_g = tl.where(b_d > 0, b_c, tl.where(b_d < 0, -b_c, 0.0))
    tl.store(g_ptr + offs, b_g.to(g_ptr.dtype.element_ty), mask=mask)


def _launch_shape(D: int, launch: tuple[int, int] | None = None):
    """(BLOCK_D, rows per program, warps); `launch` = (rows, warps) overrides the last two (benchmarks/
    sweep_gpu.py)."""
    if D > MAX_D:
        raise ValueError(
            f"l1_rollout_loss: the triton backend supports D <= {MAX_D}, got D={D}; use backend='cuda' or 'reference'"
        )
    block_d = triton.next_power_of_2(max(D, 1))
    if launch is not None:
        return block_d, int(launch[0]), int(launch[1])
    rows = max(1, min(16, 2048 // block_d))
    num_warps = 4 if rows * block_d <= 4096 else 8
    return block_d, rows, num_warps


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _reduce_mode(reduce: str | None) -> str:
    return env_choice("l1_rollout_loss (triton)", "reduce", reduce, REDUCE_ENV, REDUCE_MODES)


def l1_per_step_triton(
    pred: torch.Tensor,
    target: torch.Tensor,
    normalize_target: bool,
    eps: float,
    launch: tuple[int, int] | None = None,
    reduce: str | None = None,
) -> torch.Tensor:
    """(B, T, N, D) x2 -> per_step (T,) in the accumulation dtype. launch: (rows per program, warps).
    reduce (else $HOPE_L1_FWD_REDUCE, else "torch_sum"): how the (T, B*N) row sums become per_step,
    "torch_sum" (a second kernel) or "last_program" (inside the one launch, after a 4-byte memset)."""
    pred, target = pred.contiguous(), target.contiguous()
    B, T, N, D = pred.shape
    rows = B * T * N
    acc_tl, acc_torch = _acc(pred.dtype)
    if rows == 0:
        return torch.zeros(T, device=pred.device, dtype=acc_torch)
    row_sums = torch.empty(T, B * N, device=pred.device, dtype=acc_torch)
    block_d, rows_per_prog, num_warps = _launch_shape(D, launch)
    grid = (triton.cdiv(rows, rows_per_prog),)
    args = (pred, target, row_sums)
    meta = dict(NORMALIZE=normalize_target, ACC=acc_tl, ROWS=rows_per_prog, BLOCK_D=block_d, num_warps=num_warps)
    if _reduce_mode(reduce) == "torch_sum":
        l1_fwd_rows_kernel[grid](*args, rows, T, N, D, B * N * D, eps, **meta)
        return row_sums.sum(dim=1)
    per_step = torch.empty(T, device=pred.device, dtype=acc_torch)
    done = torch.zeros(1, device=pred.device, dtype=torch.int32)
    block_r = min(1024, triton.next_power_of_2(B * N))
    l1_fwd_last_program_kernel[grid](*args, per_step, done, rows, T, N, D, B * N * D, eps, BLOCK_R=block_r, **meta)
    return per_step


def l1_per_step_backward_triton(
    pred: torch.Tensor,
    target: torch.Tensor,
    coef: torch.Tensor,
    normalize_target: bool,
    eps: float,
    launch: tuple[int, int] | None = None,
) -> torch.Tensor:
    """grad_pred (B, T, N, D) = coef[t] * sign(pred - target_n). launch: (rows per program, warps)."""
    pred, target = pred.contiguous(), target.contiguous()
    B, T, N, D = pred.shape
    rows = B * T * N
    acc_tl, acc_torch = _acc(pred.dtype)
    grad = torch.empty_like(pred)
    if rows == 0:
        return grad
    coef = coef.to(device=pred.device, dtype=acc_torch).contiguous()
    block_d, rows_per_prog, num_warps = _launch_shape(D, launch)
    grid = (triton.cdiv(rows, rows_per_prog),)
    l1_bwd_rows_kernel[grid](
        pred,
        target,
        coef,
        grad,
        rows,
        T,
        N,
        D,
        eps,
        NORMALIZE=normalize_target,
        ACC=acc_tl,
        ROWS=rows_per_prog,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return grad
