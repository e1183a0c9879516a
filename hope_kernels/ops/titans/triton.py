"""Triton kernels of the chunk-parallel Titans LINEAR memory (DESIGN 4.3), forward and backward.

Same algorithm, inputs and outputs as `titans_linear_chunked_fwd` / `titans_linear_chunked_bwd` in
reference.py (derivation: docs/titans.md). One program per (batch, head) walks the chunks in order with the
state W, S (dk, dv, fp32) held in registers; inside a chunk of n <= C tokens the closed form is a handful of
masked tl.dot products on (BC, BC), (BC, BK), (BC, BV) and (BK, BV) tiles:
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

MAX_D = 128      # dk, dv: the (dk, dv) state tiles live in registers
MAX_CHUNK = 128


@triton.jit
def _chunk_gates(al_ptr, et_ptr, th_ptr, base, t, tmask, rc, BC: tl.constexpr):
    """Gate vectors and matrices of one chunk: a, eta, theta, b, m, f, Db, Dm, Cm (padded tokens: a = eta = 1,
    theta = 0)."""
    a = 1.0 - tl.load(al_ptr + base + t, mask=tmask, other=0.0).to(tl.float32)
    e = tl.load(et_ptr + base + t, mask=tmask, other=1.0).to(tl.float32)
    th = tl.load(th_ptr + base + t, mask=tmask, other=0.0).to(tl.float32)
    lower = rc[:, None] > rc[None, :]          # [t, j]: t > j
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
def titans_linear_fwd_kernel(q_ptr, k_ptr, v_ptr, al_ptr, et_ptr, th_ptr, w0_ptr, s0_ptr, o_ptr, ws_ptr, ss_ptr,
                             L, DK, DV, NC, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    kmask, vmask = rk < DK, rv < DV
    st_off = rk[:, None] * DV + rv[None, :]
    st_mask = kmask[:, None] & vmask[None, :]
    W = tl.load(w0_ptr + pid * DK * DV + st_off, mask=st_mask, other=0.0).to(tl.float32)
    S = tl.load(s0_ptr + pid * DK * DV + st_off, mask=st_mask, other=0.0).to(tl.float32)
    st_base = pid * (NC + 1) * DK * DV
    tl.store(ws_ptr + st_base + st_off, W, mask=st_mask)
    tl.store(ss_ptr + st_base + st_off, S, mask=st_mask)
    for n in range(NC):
        t = n * C + rc
        tmask = (rc < C) & (t < L)
        last = tl.minimum(C, L - n * C) - 1
        xk = (pid * L + t)[:, None] * DK + rk[None, :]
        xv = (pid * L + t)[:, None] * DV + rv[None, :]
        Q = tl.load(q_ptr + xk, mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        K = tl.load(k_ptr + xk, mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        V = tl.load(v_ptr + xv, mask=tmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        a, e, th, b, m, f, Db, Dm, Cm = _chunk_gates(al_ptr, et_ptr, th_ptr, pid * L, t, tmask, rc, BC)
        G = th[:, None] * (tl.dot(K, W, input_precision="ieee") - V)
        P = Cm * tl.dot(Q, tl.trans(K), input_precision="ieee")
        O = (b[:, None] * tl.dot(Q, W, input_precision="ieee") + f[:, None] * tl.dot(Q, S, input_precision="ieee")
             - tl.dot(P, G, input_precision="ieee"))
        tl.store(o_ptr + xv, O.to(o_ptr.dtype.element_ty), mask=tmask[:, None] & vmask[None, :])
        cC = _row(Cm, rc, last)
        r = _row(Dm, rc, last)
        Kt = tl.trans(K)
        W_new = (_at(b, rc, last) * W + _at(f, rc, last) * S
                 - tl.dot(Kt, cC[:, None] * G, input_precision="ieee"))
        S = _at(m, rc, last) * S - tl.dot(Kt, r[:, None] * G, input_precision="ieee")
        W = W_new
        off = st_base + (n + 1) * DK * DV + st_off
        tl.store(ws_ptr + off, W, mask=st_mask)
        tl.store(ss_ptr + off, S, mask=st_mask)


def _check(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> None:
    if q.dtype == torch.float64:
        raise TypeError("titans_memory: the triton backend does not take float64 inputs (no fp64 tl.dot on GPU); "
                        "use float32/bfloat16/float16, or backend='cpu'/'reference' for float64")
    dk, dv = q.shape[-1], v.shape[-1]
    if dk > MAX_D or dv > MAX_D:
        raise ValueError(f"titans_memory: the triton backend supports dk, dv <= {MAX_D}, got dk={dk}, dv={dv}")
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"titans_memory: the triton backend supports chunk_size <= {MAX_CHUNK}, got {chunk_size}")


def _alloc(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if os.environ.get("HOPE_KERNELS_POISON", "0") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _blocks(dk: int, dv: int, chunk_size: int):
    p2 = lambda x: max(16, triton.next_power_of_2(x))
    return p2(chunk_size), p2(dk), p2(dv)


def titans_linear_fwd_triton(q, k, v, alpha, eta, theta, W0, S0, chunk_size: int):
    """q, k (B, H, L, dk); v (B, H, L, dv); gates (B, H, L); W0, S0 (B, H, dk, dv) float32.
    Returns o (B, H, L, dv) in q's dtype and the boundary states Ws, Ss (B, H, N+1, dk, dv) float32."""
    _check(q, v, chunk_size)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    NC = (L + chunk_size - 1) // chunk_size
    q, k, v, alpha, eta, theta, W0, S0 = (x.contiguous() for x in (q, k, v, alpha, eta, theta, W0, S0))
    o = _alloc((B, H, L, dv), q, q.dtype)
    Ws = _alloc((B, H, NC + 1, dk, dv), q, torch.float32)
    Ss = _alloc((B, H, NC + 1, dk, dv), q, torch.float32)
    BC, BK, BV = _blocks(dk, dv, chunk_size)
    titans_linear_fwd_kernel[(B * H,)](q, k, v, alpha, eta, theta, W0, S0, o, Ws, Ss, L, dk, dv, NC,
                                       C=chunk_size, BC=BC, BK=BK, BV=BV, num_warps=4)
    return o, Ws, Ss


@triton.jit
def titans_linear_bwd_kernel(q_ptr, k_ptr, v_ptr, al_ptr, et_ptr, th_ptr, ws_ptr, ss_ptr, do_ptr, dwt_ptr, dst_ptr,
                             dq_ptr, dk_ptr, dv_ptr, dal_ptr, det_ptr, dth_ptr, dw0_ptr, ds0_ptr,
                             L, DK, DV, NC, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    kmask, vmask = rk < DK, rv < DV
    st_off = rk[:, None] * DV + rv[None, :]
    st_mask = kmask[:, None] & vmask[None, :]
    dW = tl.load(dwt_ptr + pid * DK * DV + st_off, mask=st_mask, other=0.0).to(tl.float32)
    dS = tl.load(dst_ptr + pid * DK * DV + st_off, mask=st_mask, other=0.0).to(tl.float32)
    st_base = pid * (NC + 1) * DK * DV
    tiny = 1.1754943508222875e-38
    for i in range(NC):
        n = NC - 1 - i
        t = n * C + rc
        tmask = (rc < C) & (t < L)
        last = tl.minimum(C, L - n * C) - 1
        kmask2 = tmask[:, None] & kmask[None, :]
        vmask2 = tmask[:, None] & vmask[None, :]
        xk = (pid * L + t)[:, None] * DK + rk[None, :]
        xv = (pid * L + t)[:, None] * DV + rv[None, :]
        Q = tl.load(q_ptr + xk, mask=kmask2, other=0.0).to(tl.float32)
        K = tl.load(k_ptr + xk, mask=kmask2, other=0.0).to(tl.float32)
        V = tl.load(v_ptr + xv, mask=vmask2, other=0.0).to(tl.float32)
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
        dG = (-tl.dot(tl.trans(P), dO, input_precision="ieee") - cC[:, None] * KdW - r[:, None] * KdS)
        incl = rc[:, None] >= rc[None, :]
        dP = tl.where(incl, -tl.dot(dO, tl.trans(G), input_precision="ieee"), 0.0)
        dQK = dP * Cm
        dE = th[:, None] * dG
        tl.store(dth_ptr + pid * L + t, tl.sum(E * dG, axis=1), mask=tmask)
        tl.store(dv_ptr + xv, (-dE).to(dv_ptr.dtype.element_ty), mask=vmask2)
        W0t, S0t = tl.trans(W0), tl.trans(S0)
        dQ = (tl.dot(dQK, K, input_precision="ieee") + b[:, None] * tl.dot(dO, W0t, input_precision="ieee")
              + f[:, None] * tl.dot(dO, S0t, input_precision="ieee"))
        tl.store(dq_ptr + xk, dQ.to(dq_ptr.dtype.element_ty), mask=kmask2)
        dK = (tl.dot(tl.trans(dQK), Q, input_precision="ieee")
              - cC[:, None] * tl.dot(G, tl.trans(dW), input_precision="ieee")
              - r[:, None] * tl.dot(G, tl.trans(dS), input_precision="ieee")
              + tl.dot(dE, W0t, input_precision="ieee"))
        tl.store(dk_ptr + xk, dK.to(dk_ptr.dtype.element_ty), mask=kmask2)
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
        tl.store(dal_ptr + pid * L + t, -dla / tl.maximum(a, tiny), mask=tmask)
        tl.store(det_ptr + pid * L + t, dle / tl.maximum(e, tiny), mask=tmask)
        # to the chunk-start state
        Qt, Kt = tl.trans(Q), tl.trans(K)
        dW_new = (tl.dot(Qt, b[:, None] * dO, input_precision="ieee") + _at(b, rc, last) * dW
                  + tl.dot(Kt, dE, input_precision="ieee"))
        dS = (tl.dot(Qt, f[:, None] * dO, input_precision="ieee") + _at(f, rc, last) * dW
              + _at(m, rc, last) * dS)
        dW = dW_new
    tl.store(dw0_ptr + pid * DK * DV + st_off, dW, mask=st_mask)
    tl.store(ds0_ptr + pid * DK * DV + st_off, dS, mask=st_mask)


def titans_linear_bwd_triton(q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST, chunk_size: int):
    """Gradients (dq, dk, dv, dalpha, deta, dtheta, dW0, dS0) of `titans_linear_fwd_triton`, same contract as
    `titans_linear_chunked_bwd`: do (B, H, L, dv), dWT, dST (B, H, dk, dv), Ws, Ss from the forward."""
    _check(q, v, chunk_size)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    NC = Ws.shape[2] - 1
    q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST = (
        x.contiguous() for x in (q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST))
    Ws, Ss, dWT, dST = (x.float() for x in (Ws, Ss, dWT, dST))
    dq, dk_, dv_ = (_alloc(x.shape, x, x.dtype) for x in (q, k, v))
    dal, det, dth = (_alloc(x.shape, x, x.dtype) for x in (alpha, eta, theta))
    dW0 = _alloc((B, H, dk, dv), q, torch.float32)
    dS0 = _alloc((B, H, dk, dv), q, torch.float32)
    BC, BK, BV = _blocks(dk, dv, chunk_size)
    titans_linear_bwd_kernel[(B * H,)](q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST, dq, dk_, dv_, dal, det, dth,
                                       dW0, dS0, L, dk, dv, NC, C=chunk_size, BC=BC, BK=BK, BV=BV, num_warps=4)
    return dq, dk_, dv_, dal, det, dth, dW0, dS0
