"""Triton kernels of the chunked delta-gradient-descent memory (docs/design.md#dgd-memory, derivation in docs/dgd.md).

One program per (batch, head, block of VALUE_BLOCK value columns) walks over the chunks with its columns of
the state M (dk, BV) held in registers (each value column of M follows the rule on its own; dq, dk and the
gate gradients, sums over columns, are summed over the blocks). A chunk of C tokens is processed as
sub-chunks of S <= C tokens (16 or 32, `_sub_chunk_len`; padded to BLOCK_C >= 16 rows, head dims padded to
>= 16, masked), so any chunk size runs here, HOPE's chunk of one timestep (65 or 258 tokens) included.
Per sub-chunk with start state M_s and the chunk-start reference state M_ref (the same matrix when S = C):
the Gram matrices K K^T and Q K^T and the decay mask D are tl.dot / elementwise tiles, T = (I + A)^{-1} is
built by forward substitution on the (BLOCK_C, BLOCK_C) tile (the UT transform; inside the walk, or, with
tsolve="precompute", for all sub-chunks at once by dgd_tsolve_kernel before it: A needs no state), then
    X = T (diag(c) K M_s + K M_ref - V),   O = diag(c) Q M_s - P X,   M_s <- gamma_S M_s - (diag(eta g) K)^T X.
Forward saves the chunk-start states (B, H, N, dk, dv). Backward runs one program per (batch, head, block)
over the chunks in reverse with dM in registers: it reloads the chunk-start state, recomputes the sub-chunk
start states into a scratch buffer (when a chunk has several), then walks the sub-chunks in reverse,
recomputing every local quantity and writing all gradients; dM_ref collects K^T dR over the chunk's
sub-chunks and joins dM at the chunk start.
Loads are upcast to float32 (float64 for float64 inputs) at once; products accumulate in that dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hope_kernels.ops.checks import env_choice
from hope_kernels.ops.dgd import TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM
from hope_kernels.ops.value_blocks import alloc_partials, sum_partials, value_tile

# Register budget, read from ptxas' report for sm_90 (benchmarks/compile_sm90.py; 8 warps): with head dims of
# 64 and all value columns in one program, sub-chunks of 16 compiled to 255 registers and at most 1.6 KB of
# spills, while sub-chunks of 32 or 64 made ptxas fall back to 32 registers and 8-76 KB of spills; head dims
# of 128 did that at any sub-chunk size (so they go to the CUDA kernel). With blocks of 16 value columns
# (VALUE_BLOCK below) the spills are at most 348 B.


def _sub_chunk_len(C: int, bk: int, bv: int) -> int:
    """Tokens per sub-chunk S <= C: the (S, S) triangular tiles share the registers with the state tiles."""
    return min(C, 32 if max(bk, bv) <= 32 else 16)


@triton.jit
def _sub_chunk_gates(a_ptr, e_ptr, row, valid, r, ACC: tl.constexpr):
    """Gates of one sub-chunk: alpha, eta (padded tokens: alpha 1, eta 0, a no-op), the decay mask D and
    c = gamma_{t-1}, g = gamma_S / gamma_t, gamma_S, all from log alpha (every exponent <= 0)."""
    b_a = tl.load(a_ptr + row, mask=valid, other=1.0).to(ACC)
    b_e = tl.load(e_ptr + row, mask=valid, other=0.0).to(ACC)
    la = tl.log(b_a)
    lg = tl.cumsum(la, 0)
    lgp = lg - la
    lg_last = tl.sum(la, 0)
    strict = r[:, None] > r[None, :]
    D = tl.exp(tl.where(strict, lgp[:, None] - lg[None, :], float("-inf")))
    return b_a, b_e, D, tl.exp(lgp), tl.exp(lg_last - lg), tl.exp(lg_last)


@triton.jit
def _unit_lower_inverse(A, r, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """T = (I + A)^{-1} for strictly lower triangular A (BLOCK_C, BLOCK_C): forward substitution over rows."""
    T = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(ACC)
    for i in range(1, BLOCK_C):
        a_i = tl.sum(tl.where(r[:, None] == i, A, 0.0), 0)
        t_i = tl.where(r == i, 1.0, 0.0).to(ACC) - tl.sum(a_i[:, None] * T, 0)
        T = tl.where(r[:, None] == i, t_i[None, :], T)
    return T


@triton.jit
def _t_offsets(bh, n, s, NS, S, C, L, r):
    """Offsets and mask of sub-chunk (n, s)'s T in the packed buffer: (B*H, N*NS, S, S), row-major."""
    NSUB = tl.cdiv(L, C) * NS
    base = (bh.to(tl.int64) * NSUB + n * NS + s) * S * S
    return base + r[:, None] * S + r[None, :], (r[:, None] < S) & (r[None, :] < S)


@triton.jit
def _load_t(t_ptr, bh, n, s, NS, S, C, L, r, ACC: tl.constexpr):
    # rows and columns past S load as 0 where the solve has identity rows: both give the same X, O and
    # gradients, since R, dX and the padded columns of T are 0 there
    offs, mask = _t_offsets(bh, n, s, NS, S, C, L, r)
    return tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _sub_chunk_prologue(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    e_ptr,
    t_ptr,
    bh,
    n,
    s,
    NS,
    S,
    C,
    L,
    dk,
    dv,
    cv,
    T_PRE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Loads sub-chunk s of chunk n (tokens [n C + s S, + min(S, C - s S)), value columns cv) and computes its
    state-independent quantities. T_PRE: T comes from dgd_tsolve_kernel's buffer at t_ptr, else it is solved
    here."""
    start = n * C + s * S
    count = tl.minimum(S, C - s * S)
    r = tl.arange(0, BLOCK_C)
    tok = start + r
    valid = (r < count) & (tok < L)
    ck = tl.arange(0, BK)
    row = bh.to(tl.int64) * L + tok
    mk = valid[:, None] & (ck[None, :] < dk)
    mv = valid[:, None] & (cv[None, :] < dv)
    b_q = tl.load(q_ptr + row[:, None] * dk + ck[None, :], mask=mk, other=0.0).to(ACC)
    b_k = tl.load(k_ptr + row[:, None] * dk + ck[None, :], mask=mk, other=0.0).to(ACC)
    b_v = tl.load(v_ptr + row[:, None] * dv + cv[None, :], mask=mv, other=0.0).to(ACC)
    b_a, b_e, D, c, g, gC = _sub_chunk_gates(a_ptr, e_ptr, row, valid, r, ACC)
    KK = tl.dot(b_k, tl.trans(b_k), input_precision=PREC, out_dtype=ACC)
    QK = tl.dot(b_q, tl.trans(b_k), input_precision=PREC, out_dtype=ACC)
    A = D * KK * b_e[None, :]
    P = D * QK * b_e[None, :]
    if T_PRE:
        T = _load_t(t_ptr, bh, n, s, NS, S, C, L, r, ACC)
    else:
        T = _unit_lower_inverse(A, r, ACC, BLOCK_C)
    return (b_q, b_k, b_v, b_a, b_e, valid, mk, mv, row, c, g, gC, D, KK, QK, A, P, T)


@triton.jit
def dgd_tsolve_kernel(
    k_ptr,
    a_ptr,
    e_ptr,
    t_ptr,
    L,
    C,
    S,
    NS,
    dk,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """T = (I + A)^{-1} of every sub-chunk at once, one program per (batch, head, chunk, sub-chunk): A depends
    on k, alpha and eta only, so the triangular solves leave the serial walk over chunks (T_PRE=True)."""
    NSUB = tl.cdiv(L, C) * NS
    pid = tl.program_id(0)
    bh = pid // NSUB
    n = (pid % NSUB) // NS
    s = pid % NS
    r = tl.arange(0, BLOCK_C)
    tok = n * C + s * S + r
    valid = (r < tl.minimum(S, C - s * S)) & (tok < L)
    ck = tl.arange(0, BK)
    row = bh.to(tl.int64) * L + tok
    b_k = tl.load(k_ptr + row[:, None] * dk + ck[None, :], mask=valid[:, None] & (ck[None, :] < dk), other=0.0).to(ACC)
    b_a, b_e, D, c, g, gC = _sub_chunk_gates(a_ptr, e_ptr, row, valid, r, ACC)
    A = D * tl.dot(b_k, tl.trans(b_k), input_precision=PREC, out_dtype=ACC) * b_e[None, :]
    offs, mask = _t_offsets(bh, n, s, NS, S, C, L, r)
    tl.store(t_ptr + offs, _unit_lower_inverse(A, r, ACC, BLOCK_C), mask=mask)


@triton.jit
def _sub_chunk_solve(b_k, b_v, b_M, b_Mref, c, T, ONE_SUB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """(K M_s, K M_ref, X) of one sub-chunk; with one sub-chunk per chunk M_s is M_ref and K M_ref = K M_s."""
    KM = tl.dot(b_k, b_M, input_precision=PREC, out_dtype=ACC)
    if ONE_SUB:
        KMref = KM
    else:
        KMref = tl.dot(b_k, b_Mref, input_precision=PREC, out_dtype=ACC)
    X = tl.dot(T, c[:, None] * KM + KMref - b_v, input_precision=PREC, out_dtype=ACC)
    return KM, KMref, X


@triton.jit
def dgd_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    e_ptr,
    t_ptr,
    m0_ptr,
    o_ptr,
    mT_ptr,
    states_ptr,
    L,
    C,
    N,
    S,
    NS,
    dk,
    dv,
    HAS_INIT: tl.constexpr,
    ONE_SUB: tl.constexpr,
    T_PRE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    ck = tl.arange(0, BK)
    cv = tl.program_id(1) * BV + tl.arange(0, BV)  # this program's block of value columns
    m_mask = (ck[:, None] < dk) & (cv[None, :] < dv)
    m_offs = ck[:, None] * dv + cv[None, :]
    if HAS_INIT:
        b_M = tl.load(m0_ptr + bh.to(tl.int64) * dk * dv + m_offs, mask=m_mask, other=0.0).to(ACC)
    else:
        b_M = tl.zeros((BK, BV), dtype=ACC)
    for n in range(0, N):
        tl.store(states_ptr + (bh.to(tl.int64) * N + n) * dk * dv + m_offs, b_M, mask=m_mask)
        b_Mref = b_M
        for s in range(0, NS):
            (b_q, b_k, b_v, b_a, b_e, valid, mk, mv, row, c, g, gC, D, KK, QK, A, P, T) = _sub_chunk_prologue(
                q_ptr,
                k_ptr,
                v_ptr,
                a_ptr,
                e_ptr,
                t_ptr,
                bh,
                n,
                s,
                NS,
                S,
                C,
                L,
                dk,
                dv,
                cv,
                T_PRE,
                ACC,
                BLOCK_C,
                BK,
                PREC,
            )
            KM, KMref, X = _sub_chunk_solve(b_k, b_v, b_M, b_Mref, c, T, ONE_SUB, ACC, PREC)
            QM = tl.dot(b_q, b_M, input_precision=PREC, out_dtype=ACC)
            b_o = c[:, None] * QM - tl.dot(P, X, input_precision=PREC, out_dtype=ACC)
            tl.store(o_ptr + row[:, None] * dv + cv[None, :], b_o, mask=mv)
            W = b_k * (b_e * g)[:, None]
            b_M = gC * b_M - tl.dot(tl.trans(W), X, input_precision=PREC, out_dtype=ACC)
    tl.store(mT_ptr + bh.to(tl.int64) * dk * dv + m_offs, b_M, mask=m_mask)


@triton.jit
def dgd_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    e_ptr,
    t_ptr,
    states_ptr,
    do_ptr,
    dmT_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    da_ptr,
    de_ptr,
    dm0_ptr,
    sub_ptr,
    L,
    C,
    N,
    S,
    NS,
    dk,
    dv,
    BH,
    ONE_SUB: tl.constexpr,
    T_PRE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    r = tl.arange(0, BLOCK_C)
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)  # this program's block of value columns
    m_mask = (ck[:, None] < dk) & (cv[None, :] < dv)
    m_offs = ck[:, None] * dv + cv[None, :]
    strict = r[:, None] > r[None, :]
    sub_base = sub_ptr + bh.to(tl.int64) * NS * dk * dv  # the blocks of a head write disjoint columns
    # dq, dk and the gate gradients are sums over value columns: each block of columns writes its partial sum
    # to its own slab (rows iv * BH * L on), the launcher adds the slabs up
    part = iv.to(tl.int64) * BH * L
    b_dM = tl.load(dmT_ptr + bh.to(tl.int64) * dk * dv + m_offs, mask=m_mask, other=0.0).to(ACC)
    for step in range(0, N):
        n = N - 1 - step
        b_Mref = tl.load(states_ptr + (bh.to(tl.int64) * N + n) * dk * dv + m_offs, mask=m_mask, other=0.0).to(ACC)
        if not ONE_SUB:
            # the sub-chunk start states of this chunk, recomputed forward into this program's scratch rows
            b_M = b_Mref
            for s in range(0, NS):
                tl.store(sub_base + s * dk * dv + m_offs, b_M, mask=m_mask)
                (b_q, b_k, b_v, b_a, b_e, valid, mk, mv, row, c, g, gC, D, KK, QK, A, P, T) = _sub_chunk_prologue(
                    q_ptr,
                    k_ptr,
                    v_ptr,
                    a_ptr,
                    e_ptr,
                    t_ptr,
                    bh,
                    n,
                    s,
                    NS,
                    S,
                    C,
                    L,
                    dk,
                    dv,
                    cv,
                    T_PRE,
                    ACC,
                    BLOCK_C,
                    BK,
                    PREC,
                )
                KM, KMref, X = _sub_chunk_solve(b_k, b_v, b_M, b_Mref, c, T, ONE_SUB, ACC, PREC)
                W = b_k * (b_e * g)[:, None]
                b_M = gC * b_M - tl.dot(tl.trans(W), X, input_precision=PREC, out_dtype=ACC)
            tl.debug_barrier()  # the scratch rows were written by other threads of this program
        b_dMref = tl.zeros((BK, BV), dtype=ACC)
        for sstep in range(0, NS):
            s = NS - 1 - sstep
            if ONE_SUB:
                b_M = b_Mref
            else:
                b_M = tl.load(sub_base + s * dk * dv + m_offs, mask=m_mask, other=0.0)
            (b_q, b_k, b_v, b_a, b_e, valid, mk, mv, row, c, g, gC, D, KK, QK, A, P, T) = _sub_chunk_prologue(
                q_ptr,
                k_ptr,
                v_ptr,
                a_ptr,
                e_ptr,
                t_ptr,
                bh,
                n,
                s,
                NS,
                S,
                C,
                L,
                dk,
                dv,
                cv,
                T_PRE,
                ACC,
                BLOCK_C,
                BK,
                PREC,
            )
            b_do = tl.load(do_ptr + row[:, None] * dv + cv[None, :], mask=mv, other=0.0).to(ACC)
            KM, KMref, X = _sub_chunk_solve(b_k, b_v, b_M, b_Mref, c, T, ONE_SUB, ACC, PREC)
            QM = tl.dot(b_q, b_M, input_precision=PREC, out_dtype=ACC)
            W = b_k * (b_e * g)[:, None]
            dX = -tl.dot(W, b_dM, input_precision=PREC, out_dtype=ACC) - tl.dot(
                tl.trans(P), b_do, input_precision=PREC, out_dtype=ACC
            )
            dR = tl.dot(tl.trans(T), dX, input_precision=PREC, out_dtype=ACC)
            XT = tl.trans(X)
            dA = tl.where(strict, -tl.dot(dR, XT, input_precision=PREC, out_dtype=ACC), 0.0)
            dP = tl.where(strict, -tl.dot(b_do, XT, input_precision=PREC, out_dtype=ACC), 0.0)
            dW = -tl.dot(X, tl.trans(b_dM), input_precision=PREC, out_dtype=ACC)
            GA = dA * D * b_e[None, :]
            GP = dP * D * b_e[None, :]
            MT = tl.trans(b_M)
            # R = diag(c) K M_s + K M_ref - V; with one sub-chunk M_s is M_ref, so K carries (1 + c)
            if ONE_SUB:
                kc = 1.0 + c
            else:
                kc = c
            dk_state = kc[:, None] * tl.dot(dR, MT, input_precision=PREC, out_dtype=ACC)
            if not ONE_SUB:
                dk_state += tl.dot(dR, tl.trans(b_Mref), input_precision=PREC, out_dtype=ACC)
            b_dk = (
                dk_state
                + (b_e * g)[:, None] * dW
                + tl.dot(GA + tl.trans(GA), b_k, input_precision=PREC, out_dtype=ACC)
                + tl.dot(tl.trans(GP), b_q, input_precision=PREC, out_dtype=ACC)
            )
            b_dq = c[:, None] * tl.dot(b_do, MT, input_precision=PREC, out_dtype=ACC) + tl.dot(
                GP, b_k, input_precision=PREC, out_dtype=ACC
            )
            dc = tl.sum(QM * b_do, 1) + tl.sum(KM * dR, 1)
            wdot = tl.sum(dW * b_k, 1)
            b_de = g * wdot + tl.sum(dA * D * KK, 0) + tl.sum(dP * D * QK, 0)
            dgg = b_e * wdot * g
            dgC = tl.sum(tl.sum(b_M * b_dM, 1), 0)
            dDD = dA * A + dP * P
            dlgp = tl.sum(dDD, 1) + dc * c
            dlg = -tl.sum(dDD, 0) - dgg + tl.where(r == BLOCK_C - 1, tl.sum(dgg, 0) + dgC * gC, 0.0)
            # dla_j = sum_{t >= j} dlg_t + sum_{t > j} dlgp_t  (t along rows, j along columns)
            dla = tl.sum(
                tl.where(r[:, None] >= r[None, :], dlg[:, None], 0.0) + tl.where(strict, dlgp[:, None], 0.0), 0
            )
            tl.store(dq_ptr + (part + row)[:, None] * dk + ck[None, :], b_dq, mask=mk)
            tl.store(dk_ptr + (part + row)[:, None] * dk + ck[None, :], b_dk, mask=mk)
            tl.store(dv_ptr + row[:, None] * dv + cv[None, :], -dR, mask=mv)
            tl.store(da_ptr + part + row, dla / b_a, mask=valid)
            tl.store(de_ptr + part + row, b_de, mask=valid)
            # dM of this sub-chunk's start state; with several sub-chunks the K M_ref term goes to dM_ref
            b_dM = (
                gC * b_dM
                + tl.dot(tl.trans(b_q * c[:, None]), b_do, input_precision=PREC, out_dtype=ACC)
                + tl.dot(tl.trans(b_k * kc[:, None]), dR, input_precision=PREC, out_dtype=ACC)
            )
            if not ONE_SUB:
                b_dMref += tl.dot(tl.trans(b_k), dR, input_precision=PREC, out_dtype=ACC)
        b_dM += b_dMref
    tl.store(dm0_ptr + bh.to(tl.int64) * dk * dv + m_offs, b_dM, mask=m_mask)


# Value columns per program (grid (B*H, cdiv(dv, VALUE_BLOCK))): the rule acts on each value column of M
# separately, so the columns split over programs; the launchers' `value_block` argument or
# HOPE_DGD_VALUE_BLOCK overrides it, 0 = all columns in one program. ptxas for sm_90 at dk = dv = 64, 8 warps:
# backward spills 104 B per thread with blocks of 16 columns, 532 B with 32, 684 B with all 64 (C = 16);
# 348 B against 1612 B at C = 258 (sub-chunks). 4 warps spill more (0.4-1.8 KB).
VALUE_BLOCK = 16
VALUE_BLOCK_ENV = "HOPE_DGD_VALUE_BLOCK"
# Where each sub-chunk's T = (I + A)^{-1} is solved: "inline", inside the serial walk over chunks by every
# program of a head (one per value block; the backward solves again), or "precompute", once per sub-chunk by
# dgd_tsolve_kernel, all sub-chunks in parallel, before the walk (the forward and the backward each launch it;
# the buffer holds S floats per token and head). The launchers' `tsolve` argument or HOPE_DGD_TSOLVE picks.
TSOLVE_ENV = "HOPE_DGD_TSOLVE"
TSOLVE_MODES = ("inline", "precompute")
TSOLVE_WARPS = 1  # (16, 16) tiles: one warp keeps the substitution's row reductions in shuffles


def _tsolve_mode(tsolve: str | None) -> str:
    return env_choice("dgd_memory (triton)", "tsolve", tsolve, TSOLVE_ENV, TSOLVE_MODES)


def _config(q: torch.Tensor, v: torch.Tensor, C: int, value_block: int | None = None, tsolve: str | None = None):
    """Kernel meta-parameters, the sub-chunk length S for chunk size C, and the number of value blocks NV."""
    dk, dv = q.shape[3], v.shape[3]
    if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(
            f"dgd_memory: the triton backend supports dk, dv <= {MAX_HEAD_DIM}, got dk={dk}, dv={dv}; "
            f"use backend='cpu', 'cuda' or 'reference'"
        )
    acc_tl, acc = (tl.float64, torch.float64) if q.dtype == torch.float64 else (tl.float32, torch.float32)
    prec = "tf32" if q.dtype in (torch.bfloat16, torch.float16) else "ieee"
    bk, bv = max(16, triton.next_power_of_2(dk)), value_tile(dv, value_block, VALUE_BLOCK_ENV, VALUE_BLOCK)
    S = _sub_chunk_len(C, bk, bv)
    block_c = max(16, triton.next_power_of_2(S))
    num_warps = 4 if bk * bv <= 16 * 16 else 8  # 4 warps spilled more at dk = 64 (dv 64 or blocks of 16)
    t_pre = _tsolve_mode(tsolve) == "precompute"
    cfg = dict(ONE_SUB=S == C, T_PRE=t_pre, ACC=acc_tl, BLOCK_C=block_c, BK=bk, BV=bv, PREC=prec, num_warps=num_warps)
    if t_pre:
        # the software pipeliner multi-buffers the T loads that feed tl.dot: ptxas (sm_90, C = 16, dk = dv = 64)
        # then put the backward at 32 registers and 4.4 KB of spills; one stage: 255 registers, 144 B
        cfg["num_stages"] = 1
    return cfg, acc, S, triton.cdiv(C, S), triton.cdiv(dv, bv)


def _solve_t(k, alpha, eta, cfg, acc, C: int, S: int, NS: int) -> torch.Tensor:
    """Every sub-chunk's T (B*H, N*NS, S, S) when cfg["T_PRE"], else an unused placeholder (k itself)."""
    if not cfg["T_PRE"]:
        return k
    B, H, L, dk = k.shape
    nsub = triton.cdiv(L, C) * NS
    t = torch.empty(B * H, nsub, S, S, device=k.device, dtype=acc)
    dgd_tsolve_kernel[(B * H * nsub,)](
        k,
        alpha,
        eta,
        t,
        L,
        C,
        S,
        NS,
        dk,
        ACC=cfg["ACC"],
        BLOCK_C=cfg["BLOCK_C"],
        BK=cfg["BK"],
        PREC=cfg["PREC"],
        num_warps=TSOLVE_WARPS,
    )
    return t


def dgd_fwd_triton(
    q, k, v, alpha, eta, initial_state, C: int, value_block: int | None = None, tsolve: str | None = None
):
    """Returns (o (B, H, L, dv) in q's dtype, final state (B, H, dk, dv), chunk-start states (B, H, N, dk, dv)).
    value_block: value columns per program (VALUE_BLOCK); tsolve: "inline" or "precompute" (TSOLVE_MODES)."""
    cfg, acc, S, NS, NV = _config(q, v, C, value_block, tsolve)
    q, k, v, alpha, eta = (x.contiguous() for x in (q, k, v, alpha, eta))
    B, H, L, dk = q.shape
    dv = v.shape[3]
    N = triton.cdiv(L, C)
    o = torch.empty(B, H, L, dv, device=q.device, dtype=q.dtype)
    M_T = torch.empty(B, H, dk, dv, device=q.device, dtype=acc)
    states = torch.empty(B, H, N, dk, dv, device=q.device, dtype=acc)
    m0 = initial_state.to(acc).contiguous() if initial_state is not None else M_T
    t = _solve_t(k, alpha, eta, cfg, acc, C, S, NS)
    dgd_fwd_kernel[(B * H, NV)](
        q, k, v, alpha, eta, t, m0, o, M_T, states, L, C, N, S, NS, dk, dv, HAS_INIT=initial_state is not None, **cfg
    )
    return o, M_T, states


def dgd_bwd_triton(
    q, k, v, alpha, eta, states, do, dM, C: int, value_block: int | None = None, tsolve: str | None = None
):
    """Returns (dq, dk, dv, dalpha, deta, dM0) from the chunk-start states saved by the forward. With NV > 1
    blocks of value columns, dq, dk and the gate gradients are summed from NV partial slabs."""
    cfg, acc, S, NS, NV = _config(q, v, C, value_block, tsolve)
    q, k, v, alpha, eta, do = (x.contiguous() for x in (q, k, v, alpha, eta, do))
    states = states.to(acc).contiguous()
    dM = dM.to(acc).contiguous()
    B, H, L, dk = q.shape
    dv = v.shape[3]
    N = triton.cdiv(L, C)
    dv_ = torch.empty_like(v)
    summed = (q, k, alpha, eta)
    dq, dk_, dalpha, deta = alloc_partials(summed, NV, acc, lambda shape, x, dt: x.new_empty(shape, dtype=dt))
    dM0 = torch.empty(B, H, dk, dv, device=q.device, dtype=acc)
    # sub-chunk start states of the chunk being differentiated, one slab per (batch, head), each value block
    # writing its own columns (unused with one sub-chunk)
    scratch = dM0 if cfg["ONE_SUB"] else torch.empty(B * H, NS, dk, dv, device=q.device, dtype=acc)
    t = _solve_t(k, alpha, eta, cfg, acc, C, S, NS)
    dgd_bwd_kernel[(B * H, NV)](
        q,
        k,
        v,
        alpha,
        eta,
        t,
        states,
        do,
        dM,
        dq,
        dk_,
        dv_,
        dalpha,
        deta,
        dM0,
        scratch,
        L,
        C,
        N,
        S,
        NS,
        dk,
        dv,
        B * H,
        **cfg,
    )
    dq, dk_, dalpha, deta = sum_partials((dq, dk_, dalpha, deta), summed, NV)
    return dq, dk_, dv_, dalpha, deta, dM0
