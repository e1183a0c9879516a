"""Triton kernels of the chunk-parallel Titans memory (docs/design.md#titans-memory), forward and backward: the LINEAR
memory first (described here), the MLP memory further down (its own header comment; docs/titans.md).

Same algorithm, inputs and outputs as `titans_linear_chunked_fwd` / `titans_linear_chunked_bwd` in
reference.py (derivation: docs/titans.md). One program per (batch, head, block of VALUE_BLOCK value columns)
walks the chunks in order with its columns of the state W, S (dk, BV, fp32) held in registers; inside a
chunk of n <= C tokens the closed form is a handful of masked tl.dot products on (BC, BC), (BC, BK),
(BC, BV) and (BK, BV) tiles:
    E = K W0 - V,  G = theta * E,  o = b * Q W0 + f * Q S0 - (Cm o Q K^T) G
    W1 = b_n W0 + f_n S0 - K^T (c_n * G),  S1 = m_n S0 - K^T (r_n * G)
The segment gate products D[t, j] = prod_{l=j+1..t} a_l are a masked cumulative product along t (no logs,
no division), exactly as the reference: a gate at exactly 0 (alpha = 1 or eta = 0) gives exact zeros. The
chunk-boundary states are stored (B, H, N+1, dk, dv). Backward walks the chunks in reverse, loading the
saved boundary state of each chunk and recomputing its inside; gradients to the gates go through the
log-derivative form of the reference (d alpha = -d(log a) / max(a, tiny)), so at a gate exactly 0 the
gradient equals the reference's (which is not the exact derivative there; the forward is exact).

Dims dk, dv and the chunk are padded to powers of two >= 16 (tl.dot) with masks; loads are upcast to fp32
and products use input_precision="ieee" (no TF32). float64 inputs are refused (tl.dot has no fp64 path on
GPU): use backend="cpu" or "reference" for float64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hope_kernels.ops.titans import mlp_unsupported
from hope_kernels.ops.value_blocks import alloc_partials, sum_partials, value_tile

MAX_D = 128  # dk, dv: the (dk, dv) state tiles live in registers
# ptxas for sm_90 took 340 s to compile the linear backward at chunk 128 (a GPU test stage hung on it,
# 2026-11-26, H200); at chunk 64 it takes 21 s
MAX_CHUNK = 64


@triton.jit
def _chunk_gates(al_ptr, et_ptr, th_ptr, base, t, tmask, rc, BC: tl.constexpr):
    """Gate vectors and matrices of one chunk: a, eta, theta, b, m, f, Db, Dm, Cm (padded tokens: a = eta = 1,
    theta = 0)."""
    a = 1.0 - tl.load(al_ptr + base + t, mask=tmask, other=0.0).to(tl.float32)
    e = tl.load(et_ptr + base + t, mask=tmask, other=1.0).to(tl.float32)
    th = tl.load(th_ptr + base + t, mask=tmask, other=0.0).to(tl.float32)
    lower = rc[:, None] > rc[None, :]  # [t, j]: t > j
    incl = rc[:, None] >= rc[None, :]
    # D[t, j] = prod_{l=j+1..t} x_l: cumulative product down the rows of where(t > j, x_t, 1)
    Db = tl.where(incl, tl.cumprod(tl.where(lower, a[:, None], 1.0), axis=0), 0.0)
    Dm = tl.where(incl, tl.cumprod(tl.where(lower, e[:, None], 1.0), axis=0), 0.0)
    b = tl.cumprod(a, axis=0)
    m = tl.cumprod(e, axis=0)
    f = tl.sum(Db * m[None, :], axis=1)
    Cm = tl.dot(Db, Dm, input_precision="ieee")
    return a, e, th, b, m, f, Db, Dm, Cm


@triton.jit
def _row(X, rc, last):
    """Row `last` of a (BC, *) tile as a vector."""
    return tl.sum(tl.where(rc[:, None] == last, X, 0.0), axis=0)


@triton.jit
def _at(x, rc, last):
    return tl.sum(tl.where(rc == last, x, 0.0), axis=0)


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, pid, n, L, DK, DV, rc, rk, rv, C: tl.constexpr):
    """Token rows of chunk n of program pid: t, tmask, the last valid row, offsets and masks of the (BC, BK)
    and (BC, BV) tiles, and Q, K, V upcast to fp32 (padded rows and columns 0)."""
    t = n * C + rc
    tmask = (rc < C) & (t < L)
    last = tl.minimum(C, L - n * C) - 1
    xk = (pid * L + t)[:, None] * DK + rk[None, :]
    xv = (pid * L + t)[:, None] * DV + rv[None, :]
    kmask2 = tmask[:, None] & (rk < DK)[None, :]
    vmask2 = tmask[:, None] & (rv < DV)[None, :]
    Q = tl.load(q_ptr + xk, mask=kmask2, other=0.0).to(tl.float32)
    K = tl.load(k_ptr + xk, mask=kmask2, other=0.0).to(tl.float32)
    V = tl.load(v_ptr + xv, mask=vmask2, other=0.0).to(tl.float32)
    return t, tmask, last, xk, xv, kmask2, vmask2, Q, K, V


@triton.jit
def titans_linear_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    al_ptr,
    et_ptr,
    th_ptr,
    w0_ptr,
    s0_ptr,
    o_ptr,
    ws_ptr,
    ss_ptr,
    L,
    DK,
    DV,
    NC,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)  # this program's block of value columns
    kmask, vmask = rk < DK, rv < DV
    st_off = rk[:, None] * DV + rv[None, :]
    st_mask = kmask[:, None] & vmask[None, :]
    W = tl.load(w0_ptr + pid * DK * DV + st_off, mask=st_mask, other=0.0).to(tl.float32)
    S = tl.load(s0_ptr + pid * DK * DV + st_off, mask=st_mask, other=0.0).to(tl.float32)
    st_base = pid * (NC + 1) * DK * DV
    tl.store(ws_ptr + st_base + st_off, W, mask=st_mask)
    tl.store(ss_ptr + st_base + st_off, S, mask=st_mask)
    for n in range(NC):
        t, tmask, last, xk, xv, kmask2, vmask2, Q, K, V = _load_chunk(
            q_ptr, k_ptr, v_ptr, pid, n, L, DK, DV, rc, rk, rv, C
        )
        a, e, th, b, m, f, Db, Dm, Cm = _chunk_gates(al_ptr, et_ptr, th_ptr, pid * L, t, tmask, rc, BC)
        G = th[:, None] * (tl.dot(K, W, input_precision="ieee") - V)
        P = Cm * tl.dot(Q, tl.trans(K), input_precision="ieee")
        O = (
            b[:, None] * tl.dot(Q, W, input_precision="ieee")
            + f[:, None] * tl.dot(Q, S, input_precision="ieee")
            - tl.dot(P, G, input_precision="ieee")
        )
        tl.store(o_ptr + xv, O.to(o_ptr.dtype.element_ty), mask=vmask2)
        cC = _row(Cm, rc, last)
        r = _row(Dm, rc, last)
        Kt = tl.trans(K)
        W_new = _at(b, rc, last) * W + _at(f, rc, last) * S - tl.dot(Kt, cC[:, None] * G, input_precision="ieee")
        S = _at(m, rc, last) * S - tl.dot(Kt, r[:, None] * G, input_precision="ieee")
        W = W_new
        off = st_base + (n + 1) * DK * DV + st_off
        tl.store(ws_ptr + off, W, mask=st_mask)
        tl.store(ss_ptr + off, S, mask=st_mask)


def _check(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> None:
    if q.dtype == torch.float64:
        raise TypeError(
            "titans_memory: the triton backend does not take float64 inputs (no fp64 tl.dot on GPU); "
            "use float32/bfloat16/float16, or backend='cpu'/'reference' for float64"
        )
    dk, dv = q.shape[-1], v.shape[-1]
    if dk > MAX_D or dv > MAX_D:
        raise ValueError(f"titans_memory: the triton backend supports dk, dv <= {MAX_D}, got dk={dk}, dv={dv}")
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"titans_memory: the triton backend supports chunk_size <= {MAX_CHUNK}, got {chunk_size}")


def _alloc(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if os.environ.get("HOPE_KERNELS_POISON", "0") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


# Value columns per program of the linear kernels (grid (B*H, cdiv(dv, VALUE_BLOCK))); the launchers'
# `value_block` argument or HOPE_TITANS_VALUE_BLOCK overrides it, 0 = all columns in one program. ptxas for
# sm_90 at dk = dv = 64, C = 16 (benchmarks/compile_sm90.py, with MAXNREG): backward spills 4.5 KB per thread
# with all 64 columns, 2.8 KB with 32, 1.1 KB with 16 (8 warps); forward 0.8 / 1.4 / 0.6 KB.
VALUE_BLOCK = 16
VALUE_BLOCK_ENV = "HOPE_TITANS_VALUE_BLOCK"
# ptxas -O3 gave the linear backward and both MLP kernels 32 registers and 8-28 KB of spills per thread; with
# the register cap stated (.maxnreg 255) it uses 255 and spills 3-4x less (MLP fwd 12.9 -> 3.2 KB, bwd
# 27.6 -> 9.9 KB; linear bwd 8.3 -> 1.1 KB at 16 columns)
MAXNREG = 255


def _blocks(dk: int, dv: int, chunk_size: int, value_block: int | None = None):
    """(BC, BK, BV): chunk, key and value tiles. The linear memory's value columns are independent (E, G, O
    and the state's columns mix keys only), so the value dim is split over programs in blocks of BV: more
    programs, smaller register tiles; dq, dk and the gate gradients are then summed over the blocks."""
    return _p2(chunk_size), _p2(dk), value_tile(dv, value_block, VALUE_BLOCK_ENV, VALUE_BLOCK)


def _linear_fwd_warps(BK: int, BV: int) -> int:
    # ptxas for sm_90 (benchmarks/compile_sm90.py) at dk = dv = 64, C = 16, all 64 value columns: 4 warps fell
    # back to 32 registers with 11.5 KB of spills per thread, 8 warps 255 registers with 0.8 KB; with blocks of
    # 16 columns (BK * BV = 1024) 4 warps spill 0.6 KB.
    return 8 if BK * BV >= 64 * 64 else 4


def titans_linear_fwd_triton(q, k, v, alpha, eta, theta, W0, S0, chunk_size: int, value_block: int | None = None):
    """q, k (B, H, L, dk); v (B, H, L, dv); gates (B, H, L); W0, S0 (B, H, dk, dv) float32.
    Returns o (B, H, L, dv) in q's dtype and the boundary states Ws, Ss (B, H, N+1, dk, dv) float32.
    value_block: value columns per program (grid (B*H, cdiv(dv, value_block))); see `_blocks`."""
    _check(q, v, chunk_size)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    NC = (L + chunk_size - 1) // chunk_size
    q, k, v, alpha, eta, theta, W0, S0 = (x.contiguous() for x in (q, k, v, alpha, eta, theta, W0, S0))
    o = _alloc((B, H, L, dv), q, q.dtype)
    Ws = _alloc((B, H, NC + 1, dk, dv), q, torch.float32)
    Ss = _alloc((B, H, NC + 1, dk, dv), q, torch.float32)
    BC, BK, BV = _blocks(dk, dv, chunk_size, value_block)
    titans_linear_fwd_kernel[(B * H, triton.cdiv(dv, BV))](
        q,
        k,
        v,
        alpha,
        eta,
        theta,
        W0,
        S0,
        o,
        Ws,
        Ss,
        L,
        dk,
        dv,
        NC,
        C=chunk_size,
        BC=BC,
        BK=BK,
        BV=BV,
        num_warps=_linear_fwd_warps(BK, BV),
    )
    return o, Ws, Ss


@triton.jit
def titans_linear_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    al_ptr,
    et_ptr,
    th_ptr,
    ws_ptr,
    ss_ptr,
    do_ptr,
    dwt_ptr,
    dst_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dal_ptr,
    det_ptr,
    dth_ptr,
    dw0_ptr,
    ds0_ptr,
    L,
    DK,
    DV,
    NC,
    BH,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)  # this program's block of value columns
    kmask, vmask = rk < DK, rv < DV
    st_off = rk[:, None] * DV + rv[None, :]
    st_mask = kmask[:, None] & vmask[None, :]
    # dq, dk and the gate gradients are sums over value columns: each block of columns writes its partial sum
    # to its own slab (rows iv * BH * L on), the launcher adds the slabs up
    part = iv.to(tl.int64) * BH * L
    dW = tl.load(dwt_ptr + pid * DK * DV + st_off, mask=st_mask, other=0.0).to(tl.float32)
    dS = tl.load(dst_ptr + pid * DK * DV + st_off, mask=st_mask, other=0.0).to(tl.float32)
    st_base = pid * (NC + 1) * DK * DV
    tiny = 1.1754943508222875e-38
    for i in range(NC):
        n = NC - 1 - i
        t, tmask, last, xk, xv, kmask2, vmask2, Q, K, V = _load_chunk(
            q_ptr, k_ptr, v_ptr, pid, n, L, DK, DV, rc, rk, rv, C
        )
        dO = tl.load(do_ptr + xv, mask=vmask2, other=0.0).to(tl.float32)
        W0 = tl.load(ws_ptr + st_base + n * DK * DV + st_off, mask=st_mask, other=0.0)
        S0 = tl.load(ss_ptr + st_base + n * DK * DV + st_off, mask=st_mask, other=0.0)
        a, e, th, b, m, f, Db, Dm, Cm = _chunk_gates(al_ptr, et_ptr, th_ptr, pid * L, t, tmask, rc, BC)
        cC = _row(Cm, rc, last)
        r = _row(Dm, rc, last)
        E = tl.dot(K, W0, input_precision="ieee") - V
        G = th[:, None] * E
        QK = tl.dot(Q, tl.trans(K), input_precision="ieee")
        P = Cm * QK
        KdW = tl.dot(K, dW, input_precision="ieee")
        KdS = tl.dot(K, dS, input_precision="ieee")
        # values
        dG = -tl.dot(tl.trans(P), dO, input_precision="ieee") - cC[:, None] * KdW - r[:, None] * KdS
        incl = rc[:, None] >= rc[None, :]
        dP = tl.where(incl, -tl.dot(dO, tl.trans(G), input_precision="ieee"), 0.0)
        dQK = dP * Cm
        dE = th[:, None] * dG
        tl.store(dth_ptr + part + pid * L + t, tl.sum(E * dG, axis=1), mask=tmask)
        tl.store(dv_ptr + xv, (-dE).to(dv_ptr.dtype.element_ty), mask=vmask2)
        W0t, S0t = tl.trans(W0), tl.trans(S0)
        dQ = (
            tl.dot(dQK, K, input_precision="ieee")
            + b[:, None] * tl.dot(dO, W0t, input_precision="ieee")
            + f[:, None] * tl.dot(dO, S0t, input_precision="ieee")
        )
        tl.store(dq_ptr + part * DK + xk, dQ.to(dq_ptr.dtype.element_ty), mask=kmask2)
        dK = (
            tl.dot(tl.trans(dQK), Q, input_precision="ieee")
            - cC[:, None] * tl.dot(G, tl.trans(dW), input_precision="ieee")
            - r[:, None] * tl.dot(G, tl.trans(dS), input_precision="ieee")
            + tl.dot(dE, W0t, input_precision="ieee")
        )
        tl.store(dk_ptr + part * DK + xk, dK.to(dk_ptr.dtype.element_ty), mask=kmask2)
        # gate coefficients
        is_last = rc == last
        db = tl.sum(dO * tl.dot(Q, W0, input_precision="ieee"), axis=1)
        db += tl.where(is_last, tl.sum(tl.sum(dW * W0, axis=1), axis=0), 0.0)
        df = tl.sum(dO * tl.dot(Q, S0, input_precision="ieee"), axis=1)
        df += tl.where(is_last, tl.sum(tl.sum(dW * S0, axis=1), axis=0), 0.0)
        dm = tl.where(is_last, tl.sum(tl.sum(dS * S0, axis=1), axis=0), 0.0)
        dCm = dP * QK
        dCm -= tl.where(is_last[:, None], tl.sum(KdW * G, axis=1)[None, :], 0.0)
        dDb = tl.where(incl, tl.dot(dCm, tl.trans(Dm), input_precision="ieee") + df[:, None] * m[None, :], 0.0)
        dDm = tl.where(incl, tl.dot(tl.trans(Db), dCm, input_precision="ieee"), 0.0)
        dDm -= tl.where(is_last[:, None] & incl, tl.sum(KdS * G, axis=1)[None, :], 0.0)
        dm += tl.sum(Db * df[:, None], axis=0)
        Xb = dDb * Db
        Xm = dDm * Dm
        dgb = tl.sum(Xb, axis=1) - tl.sum(Xb, axis=0) + db * b
        dgm = tl.sum(Xm, axis=1) - tl.sum(Xm, axis=0) + dm * m
        # d log a_l = sum_{t >= l} dg_t (padded tokens carry zero gradient)
        dgb = tl.where(tmask, dgb, 0.0)
        dgm = tl.where(tmask, dgm, 0.0)
        dla = tl.sum(tl.where(incl, dgb[:, None], 0.0), axis=0)
        dle = tl.sum(tl.where(incl, dgm[:, None], 0.0), axis=0)
        tl.store(dal_ptr + part + pid * L + t, -dla / tl.maximum(a, tiny), mask=tmask)
        tl.store(det_ptr + part + pid * L + t, dle / tl.maximum(e, tiny), mask=tmask)
        # to the chunk-start state
        Qt, Kt = tl.trans(Q), tl.trans(K)
        dW_new = (
            tl.dot(Qt, b[:, None] * dO, input_precision="ieee")
            + _at(b, rc, last) * dW
            + tl.dot(Kt, dE, input_precision="ieee")
        )
        dS = tl.dot(Qt, f[:, None] * dO, input_precision="ieee") + _at(f, rc, last) * dW + _at(m, rc, last) * dS
        dW = dW_new
    tl.store(dw0_ptr + pid * DK * DV + st_off, dW, mask=st_mask)
    tl.store(ds0_ptr + pid * DK * DV + st_off, dS, mask=st_mask)


def titans_linear_bwd_triton(
    q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST, chunk_size: int, value_block: int | None = None
):
    """Gradients (dq, dk, dv, dalpha, deta, dtheta, dW0, dS0) of `titans_linear_fwd_triton`, same contract as
    `titans_linear_chunked_bwd`: do (B, H, L, dv), dWT, dST (B, H, dk, dv), Ws, Ss from the forward.
    With NV = cdiv(dv, value_block) > 1 blocks of value columns, dq, dk and the gate gradients are summed
    from NV float32 partial slabs."""
    _check(q, v, chunk_size)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    NC = Ws.shape[2] - 1
    q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST = (
        x.contiguous() for x in (q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST)
    )
    Ws, Ss, dWT, dST = (x.float() for x in (Ws, Ss, dWT, dST))
    BC, BK, BV = _blocks(dk, dv, chunk_size, value_block)
    NV = triton.cdiv(dv, BV)
    dv_ = _alloc(v.shape, v, v.dtype)
    summed = (q, k, alpha, eta, theta)
    dq, dk_, dal, det, dth = alloc_partials(summed, NV, torch.float32, _alloc)
    dW0 = _alloc((B, H, dk, dv), q, torch.float32)
    dS0 = _alloc((B, H, dk, dv), q, torch.float32)
    titans_linear_bwd_kernel[(B * H, NV)](
        q,
        k,
        v,
        alpha,
        eta,
        theta,
        Ws,
        Ss,
        do,
        dWT,
        dST,
        dq,
        dk_,
        dv_,
        dal,
        det,
        dth,
        dW0,
        dS0,
        L,
        dk,
        dv,
        NC,
        B * H,
        C=chunk_size,
        BC=BC,
        BK=BK,
        BV=BV,
        num_warps=8 if BK >= 64 else 4,
        maxnreg=MAXNREG,
    )
    dq, dk_, dal, det, dth = sum_partials((dq, dk_, dal, det, dth), summed, NV)
    return dq, dk_, dv_, dal, det, dth, dW0, dS0


# ---------------------------------------------------------------------------------------------------------
# MLP memory, M(x) = x + silu(x W1) W2 (dk == dv = D, hidden width dh): same structure as the linear kernels,
# one program per (batch, head), the four state tiles W1, S1 (D, dh) and W2, S2 (dh, D) in registers. Each
# layer of a chunk is a "dual block" (reference.py, `_dual` / `_dual_bwd`): layer 1 reads Q and writes K,
# layer 2 reads Hq = silu(layer-1 read) and writes Hk = silu(K W1). Algorithm identical to
# `titans_mlp_chunked_fwd` / `titans_mlp_chunked_bwd` (derivation: docs/titans.md).
# ---------------------------------------------------------------------------------------------------------

# Size limits (MLP_MAX_D, MLP_MAX_CHUNK) and `mlp_unsupported` live in __init__.py: the dispatcher reads them
# without importing triton.


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def _silu_grad(z):
    s = tl.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@triton.jit
def _silu_grad2(z):
    s = tl.sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


@triton.jit
def _mlp_chunk(Q, K, V, th, W1, W2, S1, S2, b, f, Cm):
    """Inside of one chunk: hidden rows, errors, theta-scaled inner gradients G1 (BC, BH), G2 (BC, BD), the
    layer-1 read Zq, Hq = silu(Zq) and the output O."""
    Z = _dot(K, W1)
    Hk = _silu(Z)
    E = K + _dot(Hk, W2) - V
    GZ = _dot(E, tl.trans(W2)) * _silu_grad(Z)
    G1 = th[:, None] * GZ
    G2 = th[:, None] * E
    Zq = b[:, None] * _dot(Q, W1) + f[:, None] * _dot(Q, S1) - _dot(Cm * _dot(Q, tl.trans(K)), G1)
    Hq = _silu(Zq)
    O = Q + b[:, None] * _dot(Hq, W2) + f[:, None] * _dot(Hq, S2) - _dot(Cm * _dot(Hq, tl.trans(Hk)), G2)
    return Z, Hk, E, GZ, G1, G2, Zq, Hq, O


@triton.jit
def titans_mlp_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    al_ptr,
    et_ptr,
    th_ptr,
    w1_ptr,
    w2_ptr,
    s1_ptr,
    s2_ptr,
    o_ptr,
    w1s_ptr,
    w2s_ptr,
    s1s_ptr,
    s2s_ptr,
    L,
    D,
    DH,
    NC,
    C: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    BH: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, BD)
    rh = tl.arange(0, BH)
    dmask, hmask = rd < D, rh < DH
    off1 = rd[:, None] * DH + rh[None, :]  # (D, dh) tiles
    off2 = rh[:, None] * D + rd[None, :]  # (dh, D) tiles
    m1 = dmask[:, None] & hmask[None, :]
    m2 = hmask[:, None] & dmask[None, :]
    sb = pid * D * DH
    W1 = tl.load(w1_ptr + sb + off1, mask=m1, other=0.0).to(tl.float32)
    S1 = tl.load(s1_ptr + sb + off1, mask=m1, other=0.0).to(tl.float32)
    W2 = tl.load(w2_ptr + sb + off2, mask=m2, other=0.0).to(tl.float32)
    S2 = tl.load(s2_ptr + sb + off2, mask=m2, other=0.0).to(tl.float32)
    st_base = pid * (NC + 1) * D * DH
    tl.store(w1s_ptr + st_base + off1, W1, mask=m1)
    tl.store(s1s_ptr + st_base + off1, S1, mask=m1)
    tl.store(w2s_ptr + st_base + off2, W2, mask=m2)
    tl.store(s2s_ptr + st_base + off2, S2, mask=m2)
    for n in range(NC):
        t, tmask, last, x, _, xm, _, Q, K, V = _load_chunk(q_ptr, k_ptr, v_ptr, pid, n, L, D, D, rc, rd, rd, C)
        a, e, th, b, m, f, Db, Dm, Cm = _chunk_gates(al_ptr, et_ptr, th_ptr, pid * L, t, tmask, rc, BC)
        Z, Hk, E, GZ, G1, G2, Zq, Hq, O = _mlp_chunk(Q, K, V, th, W1, W2, S1, S2, b, f, Cm)
        tl.store(o_ptr + x, O.to(o_ptr.dtype.element_ty), mask=xm)
        c = _row(Cm, rc, last)
        r = _row(Dm, rc, last)
        bn, fn, mn = _at(b, rc, last), _at(f, rc, last), _at(m, rc, last)
        Kt, Hkt = tl.trans(K), tl.trans(Hk)
        W1n = bn * W1 + fn * S1 - _dot(Kt, c[:, None] * G1)
        S1 = mn * S1 - _dot(Kt, r[:, None] * G1)
        W2n = bn * W2 + fn * S2 - _dot(Hkt, c[:, None] * G2)
        S2 = mn * S2 - _dot(Hkt, r[:, None] * G2)
        W1, W2 = W1n, W2n
        ob = st_base + (n + 1) * D * DH
        tl.store(w1s_ptr + ob + off1, W1, mask=m1)
        tl.store(s1s_ptr + ob + off1, S1, mask=m1)
        tl.store(w2s_ptr + ob + off2, W2, mask=m2)
        tl.store(s2s_ptr + ob + off2, S2, mask=m2)


@triton.jit
def _dual_bwd(X, A, G, P0, Pf, dR, dWn, dSn, b, f, Cm, c, r, bn, fn, incl, is_last):
    """Backward of one dual block R = b o X P0 + f o X Pf - (Cm o X A^T) G with end state
    (b_n P0 + f_n Pf - A^T (c o G), m_n Pf - A^T (r o G)); the m_n Pf term is added by the caller.
    Returns dX, dA, dG, dP0, dPf and the gate pieces db, df, dm_n, dCm, dr (dr: to the last row of Dm)."""
    AdW = _dot(A, dWn)
    AdS = _dot(A, dSn)
    QK = _dot(X, tl.trans(A))
    dG = -_dot(tl.trans(Cm * QK), dR) - c[:, None] * AdW - r[:, None] * AdS
    dP = tl.where(incl, -_dot(dR, tl.trans(G)), 0.0)
    dQK = dP * Cm
    dCm = dP * QK - tl.where(is_last[:, None], tl.sum(AdW * G, axis=1)[None, :], 0.0)
    dr = -tl.sum(AdS * G, axis=1)
    dX = _dot(dQK, A) + b[:, None] * _dot(dR, tl.trans(P0)) + f[:, None] * _dot(dR, tl.trans(Pf))
    dA = _dot(tl.trans(dQK), X) - c[:, None] * _dot(G, tl.trans(dWn)) - r[:, None] * _dot(G, tl.trans(dSn))
    Xt = tl.trans(X)
    dP0 = _dot(Xt, b[:, None] * dR) + bn * dWn
    dPf = _dot(Xt, f[:, None] * dR) + fn * dWn
    db = tl.sum(dR * _dot(X, P0), axis=1) + tl.where(is_last, tl.sum(tl.sum(dWn * P0, axis=1), axis=0), 0.0)
    df = tl.sum(dR * _dot(X, Pf), axis=1) + tl.where(is_last, tl.sum(tl.sum(dWn * Pf, axis=1), axis=0), 0.0)
    dmn = tl.sum(tl.sum(dSn * Pf, axis=1), axis=0)
    return dX, dA, dG, dP0, dPf, db, df, dmn, dCm, dr


@triton.jit
def titans_mlp_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    al_ptr,
    et_ptr,
    th_ptr,
    w1s_ptr,
    w2s_ptr,
    s1s_ptr,
    s2s_ptr,
    do_ptr,
    dw1t_ptr,
    dw2t_ptr,
    ds1t_ptr,
    ds2t_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dal_ptr,
    det_ptr,
    dth_ptr,
    dw1_ptr,
    dw2_ptr,
    ds1_ptr,
    ds2_ptr,
    L,
    D,
    DH,
    NC,
    C: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    BH: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, BD)
    rh = tl.arange(0, BH)
    dmask, hmask = rd < D, rh < DH
    off1 = rd[:, None] * DH + rh[None, :]
    off2 = rh[:, None] * D + rd[None, :]
    m1 = dmask[:, None] & hmask[None, :]
    m2 = hmask[:, None] & dmask[None, :]
    sb = pid * D * DH
    dW1 = tl.load(dw1t_ptr + sb + off1, mask=m1, other=0.0).to(tl.float32)
    dS1 = tl.load(ds1t_ptr + sb + off1, mask=m1, other=0.0).to(tl.float32)
    dW2 = tl.load(dw2t_ptr + sb + off2, mask=m2, other=0.0).to(tl.float32)
    dS2 = tl.load(ds2t_ptr + sb + off2, mask=m2, other=0.0).to(tl.float32)
    st_base = pid * (NC + 1) * D * DH
    incl = rc[:, None] >= rc[None, :]
    tiny = 1.1754943508222875e-38
    for i in range(NC):
        n = NC - 1 - i
        t, tmask, last, x, _, xm, _, Q, K, V = _load_chunk(q_ptr, k_ptr, v_ptr, pid, n, L, D, D, rc, rd, rd, C)
        is_last = rc == last
        dO = tl.load(do_ptr + x, mask=xm, other=0.0).to(tl.float32)
        ob = st_base + n * D * DH
        W1 = tl.load(w1s_ptr + ob + off1, mask=m1, other=0.0)
        S1 = tl.load(s1s_ptr + ob + off1, mask=m1, other=0.0)
        W2 = tl.load(w2s_ptr + ob + off2, mask=m2, other=0.0)
        S2 = tl.load(s2s_ptr + ob + off2, mask=m2, other=0.0)
        a, e, th, b, m, f, Db, Dm, Cm = _chunk_gates(al_ptr, et_ptr, th_ptr, pid * L, t, tmask, rc, BC)
        c = _row(Cm, rc, last)
        r = _row(Dm, rc, last)
        bn, fn, mn = _at(b, rc, last), _at(f, rc, last), _at(m, rc, last)
        Z, Hk, E, GZ, G1, G2, Zq, Hq, O = _mlp_chunk(Q, K, V, th, W1, W2, S1, S2, b, f, Cm)
        # layer 2 (reads Hq, writes Hk), then layer 1 (reads Q, writes K)
        dHq, dHk, dG2, dW2p, dS2p, db2, df2, dmn2, dCm2, dr2 = _dual_bwd(
            Hq, Hk, G2, W2, S2, dO, dW2, dS2, b, f, Cm, c, r, bn, fn, incl, is_last
        )
        dZq = dHq * _silu_grad(Zq)
        dQ, dK, dG1, dW1p, dS1p, db1, df1, dmn1, dCm1, dr1 = _dual_bwd(
            Q, K, G1, W1, S1, dZq, dW1, dS1, b, f, Cm, c, r, bn, fn, incl, is_last
        )
        dQ += dO
        # G1 = theta GZ, G2 = theta E, GZ = (E W2^T) o silu'(Z), E = K + Hk W2 - V, Hk = silu(Z), Z = K W1
        tl.store(dth_ptr + pid * L + t, tl.sum(dG1 * GZ, axis=1) + tl.sum(dG2 * E, axis=1), mask=tmask)
        dGZ = th[:, None] * dG1
        sp = _silu_grad(Z)
        dY = dGZ * sp
        dZ = dGZ * _dot(E, tl.trans(W2)) * _silu_grad2(Z)
        dE = th[:, None] * dG2 + _dot(dY, W2)
        dW2p += _dot(tl.trans(dY), E) + _dot(tl.trans(Hk), dE)
        dHk += _dot(dE, tl.trans(W2))
        dZ += dHk * sp
        dK += dE + _dot(dZ, tl.trans(W1))
        dW1p += _dot(tl.trans(K), dZ)
        tl.store(dq_ptr + x, dQ.to(dq_ptr.dtype.element_ty), mask=xm)
        tl.store(dk_ptr + x, dK.to(dk_ptr.dtype.element_ty), mask=xm)
        tl.store(dv_ptr + x, (-dE).to(dv_ptr.dtype.element_ty), mask=xm)
        # gate coefficients of both layers, then to the gates (log-derivative form, as the linear kernel)
        db = db1 + db2
        df = df1 + df2
        dCm = dCm1 + dCm2
        dr = dr1 + dr2
        dm = tl.where(is_last, dmn1 + dmn2, 0.0) + tl.sum(Db * df[:, None], axis=0)
        dDb = tl.where(incl, _dot(dCm, tl.trans(Dm)) + df[:, None] * m[None, :], 0.0)
        dDm = tl.where(incl, _dot(tl.trans(Db), dCm), 0.0) + tl.where(is_last[:, None] & incl, dr[None, :], 0.0)
        Xb = dDb * Db
        Xm = dDm * Dm
        dgb = tl.where(tmask, tl.sum(Xb, axis=1) - tl.sum(Xb, axis=0) + db * b, 0.0)
        dgm = tl.where(tmask, tl.sum(Xm, axis=1) - tl.sum(Xm, axis=0) + dm * m, 0.0)
        dla = tl.sum(tl.where(incl, dgb[:, None], 0.0), axis=0)
        dle = tl.sum(tl.where(incl, dgm[:, None], 0.0), axis=0)
        tl.store(dal_ptr + pid * L + t, -dla / tl.maximum(a, tiny), mask=tmask)
        tl.store(det_ptr + pid * L + t, dle / tl.maximum(e, tiny), mask=tmask)
        # to the chunk-start state (the momenta also reach the end momenta through S_n = m_n S0 + ...)
        dW1 = dW1p
        dW2 = dW2p
        dS1 = dS1p + mn * dS1
        dS2 = dS2p + mn * dS2
    tl.store(dw1_ptr + pid * D * DH + off1, dW1, mask=m1)
    tl.store(ds1_ptr + pid * D * DH + off1, dS1, mask=m1)
    tl.store(dw2_ptr + pid * D * DH + off2, dW2, mask=m2)
    tl.store(ds2_ptr + pid * D * DH + off2, dS2, mask=m2)


def _check_mlp(q: torch.Tensor, dh: int, chunk_size: int) -> None:
    why = mlp_unsupported(q, dh, chunk_size)
    if why is not None:
        raise why[0](why[1])


def _mlp_launch_args(D: int, dh: int, chunk_size: int):
    BC, BD, BH = _p2(chunk_size), _p2(D), _p2(dh)
    return dict(BC=BC, BD=BD, BH=BH, num_warps=8 if max(BD, BH) * max(BD, BH, BC) >= 64 * 64 else 4, maxnreg=MAXNREG)


def titans_mlp_fwd_triton(q, k, v, alpha, eta, theta, W1, W2, S1, S2, chunk_size: int):
    """q, k, v (B, H, L, D); gates (B, H, L); W1, S1 (B, H, D, dh), W2, S2 (B, H, dh, D) float32.
    Returns o (B, H, L, D) in q's dtype and the boundary states W1s, W2s, S1s, S2s (B, H, N+1, ., .) float32."""
    B, H, L, D = q.shape
    dh = W1.shape[-1]
    _check_mlp(q, dh, chunk_size)
    NC = (L + chunk_size - 1) // chunk_size
    q, k, v, alpha, eta, theta, W1, W2, S1, S2 = (x.contiguous() for x in (q, k, v, alpha, eta, theta, W1, W2, S1, S2))
    o = _alloc((B, H, L, D), q, q.dtype)
    W1s, S1s = (_alloc((B, H, NC + 1, D, dh), q, torch.float32) for _ in range(2))
    W2s, S2s = (_alloc((B, H, NC + 1, dh, D), q, torch.float32) for _ in range(2))
    titans_mlp_fwd_kernel[(B * H,)](
        q,
        k,
        v,
        alpha,
        eta,
        theta,
        W1,
        W2,
        S1,
        S2,
        o,
        W1s,
        W2s,
        S1s,
        S2s,
        L,
        D,
        dh,
        NC,
        C=chunk_size,
        **_mlp_launch_args(D, dh, chunk_size),
    )
    return o, W1s, W2s, S1s, S2s


def titans_mlp_bwd_triton(q, k, v, alpha, eta, theta, W1s, W2s, S1s, S2s, do, dW1T, dW2T, dS1T, dS2T, chunk_size: int):
    """Gradients (dq, dk, dv, dalpha, deta, dtheta, dW1, dW2, dS1, dS2) of `titans_mlp_fwd_triton`, same contract
    as `titans_mlp_chunked_bwd`."""
    B, H, L, D = q.shape
    dh = W1s.shape[-1]
    _check_mlp(q, dh, chunk_size)
    NC = W1s.shape[2] - 1
    q, k, v, alpha, eta, theta, do = (x.contiguous() for x in (q, k, v, alpha, eta, theta, do))
    W1s, W2s, S1s, S2s, dW1T, dW2T, dS1T, dS2T = (
        x.float().contiguous() for x in (W1s, W2s, S1s, S2s, dW1T, dW2T, dS1T, dS2T)
    )
    dq, dk_, dv_ = (_alloc(x.shape, x, x.dtype) for x in (q, k, v))
    dal, det, dth = (_alloc(x.shape, x, x.dtype) for x in (alpha, eta, theta))
    dW1, dS1 = (_alloc((B, H, D, dh), q, torch.float32) for _ in range(2))
    dW2, dS2 = (_alloc((B, H, dh, D), q, torch.float32) for _ in range(2))
    titans_mlp_bwd_kernel[(B * H,)](
        q,
        k,
        v,
        alpha,
        eta,
        theta,
        W1s,
        W2s,
        S1s,
        S2s,
        do,
        dW1T,
        dW2T,
        dS1T,
        dS2T,
        dq,
        dk_,
        dv_,
        dal,
        det,
        dth,
        dW1,
        dW2,
        dS1,
        dS2,
        L,
        D,
        dh,
        NC,
        C=chunk_size,
        **_mlp_launch_args(D, dh, chunk_size),
    )
    return dq, dk_, dv_, dal, det, dth, dW1, dW2, dS1, dS2
