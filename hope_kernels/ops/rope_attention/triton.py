"""Fused 3D-RoPE block-causal flash attention in Triton, forward and backward.

Layout: one program per (block of BM query rows, batch*head) in the forward and the dq pass, one per (block
of BN key rows, batch*head) in the dk/dv pass. q and k are rotated once, by `rope_rotate_kernel`, into
scratch tensors (B, H, L, 2 * BH) that hold the even columns' rotation in [0, BH) and the odd columns' in
[BH, 2 * BH) (zero padding beyond d / 2):
    y_e = x_e C_e - x_o S_e,   y_o = x_o C_o + x_e S_o,   C, S = cos, sin(pos @ W)
(W (3, d) of reference.rope_freqs encodes the slices and the rope_compat mode; the unrotated remainder has
angle 0). Scores are dot(q_e, k_e^T) + dot(q_o, k_o^T), the same as with interleaved columns. Rotating
inside the attention loops would cost four sin/cos per key element for every query block (O(L^2 d) on the
special-function units, 21 TFLOP/s on an H200 against 118 for SDPA); the scratch costs O(L d) memory.
Because t is non-decreasing, the keys a query block can see form one contiguous range [kv_lo, kv_hi) (and
the queries a key block is seen by, [q_lo, q_hi)); the host computes these ranges with searchsorted, so
tiles hidden by the block-causal mask or the window are never visited. Tiles that every row of a block sees
whole (without a window: the keys up to the block's first timestep) run without the elementwise mask.
Forward: online softmax in base 2 with fp32 accumulators; saves lse (B, H, L) only (O(L) memory).
Backward: the rotation is recomputed; delta = rowsum(o * do) in torch; pass 1 (per key block) recomputes
p = exp2(s - lse) and accumulates dv = p^T do and dk_rot = scale * ds^T q_rot; pass 2 (per query block)
accumulates dq_rot = scale * ds k_rot. The gradients in rotated space are mapped back with the transpose
rotation
    dx_e = g_e C_e + g_o S_o,   dx_o = g_o C_o - g_e S_e
before the store (sin/cos once per output row). No atomics: deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hope_kernels.dispatch import triton_interpret

MAX_D = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30


@triton.jit
def _angles_cs(pos_ptr, w_ptr, rows, L, D, HALF, BH: tl.constexpr):
    """cos/sin of the even and odd columns of token rows: four (R, BH) fp32 tiles."""
    col = tl.arange(0, BH)
    rmask = rows < L
    cmask = col < HALF
    pt = tl.load(pos_ptr + rows * 3, mask=rmask, other=0).to(tl.float32)[:, None]
    ph = tl.load(pos_ptr + rows * 3 + 1, mask=rmask, other=0).to(tl.float32)[:, None]
    pw = tl.load(pos_ptr + rows * 3 + 2, mask=rmask, other=0).to(tl.float32)[:, None]
    # one of the three frequencies of a column is non-zero, so each angle is a single rounded product
    a_e = (
        pt * tl.load(w_ptr + 2 * col, mask=cmask, other=0.0)[None, :]
        + ph * tl.load(w_ptr + D + 2 * col, mask=cmask, other=0.0)[None, :]
        + pw * tl.load(w_ptr + 2 * D + 2 * col, mask=cmask, other=0.0)[None, :]
    )
    a_o = (
        pt * tl.load(w_ptr + 2 * col + 1, mask=cmask, other=0.0)[None, :]
        + ph * tl.load(w_ptr + D + 2 * col + 1, mask=cmask, other=0.0)[None, :]
        + pw * tl.load(w_ptr + 2 * D + 2 * col + 1, mask=cmask, other=0.0)[None, :]
    )
    return tl.cos(a_e), tl.sin(a_e), tl.cos(a_o), tl.sin(a_o)


@triton.jit
def rope_rotate_kernel(x_ptr, out_ptr, pos_ptr, w_ptr, L, D, HALF, BR: tl.constexpr, BH: tl.constexpr):
    """x (B*H, L, D) -> out (B*H, L, 2*BH): rotated even columns in [0, BH), odd in [BH, 2*BH), zero padded."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    col = tl.arange(0, BH)
    rmask = (rows < L)[:, None]
    m = rmask & (col < HALF)[None, :]
    src = x_ptr + bh * L * D + rows[:, None] * D + 2 * col[None, :]
    x_e = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x_o = tl.load(src + 1, mask=m, other=0.0).to(tl.float32)
    c_e, s_e, c_o, s_o = _angles_cs(pos_ptr, w_ptr, rows, L, D, HALF, BH)
    dst = out_ptr + bh * L * 2 * BH + rows[:, None] * (2 * BH) + col[None, :]
    tl.store(dst, (x_e * c_e - x_o * s_e).to(out_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + BH, (x_o * c_o + x_e * s_o).to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _load_pair(xr_ptr, rows, L, DT: tl.constexpr, BH: tl.constexpr):
    """Rotated even and odd halves of token rows from a rope_rotate_kernel scratch: two (R, BH) DT tiles."""
    col = tl.arange(0, BH)
    m = (rows < L)[:, None]
    offs = rows[:, None] * (2 * BH) + col[None, :]
    return (tl.load(xr_ptr + offs, mask=m, other=0.0).to(DT), tl.load(xr_ptr + offs + BH, mask=m, other=0.0).to(DT))


@triton.jit
def _load_rows(x_ptr, rows, L, D, BD: tl.constexpr):
    col = tl.arange(0, BD)
    m = (rows < L)[:, None] & (col < D)[None, :]
    return tl.load(x_ptr + rows[:, None] * D + col[None, :], mask=m, other=0.0)


@triton.jit
def _store_unrotated(x_ptr, g_e, g_o, pos_ptr, w_ptr, rows, L, D, HALF, BH: tl.constexpr):
    """Store the gradient of the unrotated input: transpose rotation of (g_e, g_o), interleaved."""
    c_e, s_e, c_o, s_o = _angles_cs(pos_ptr, w_ptr, rows, L, D, HALF, BH)
    col = tl.arange(0, BH)
    m = (rows < L)[:, None] & (col < HALF)[None, :]
    offs = rows[:, None] * D + 2 * col[None, :]
    tl.store(x_ptr + offs, (g_e * c_e + g_o * s_o).to(x_ptr.dtype.element_ty), mask=m)
    tl.store(x_ptr + offs + 1, (g_o * c_o - g_e * s_e).to(x_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scores(x_e, x_o, y_e, y_o, qk_scale, DOT_PREC: tl.constexpr):
    """Scaled scores x y^T of rotated rows from their even / odd halves: (R, R') fp32, the softmax scale (base 2)
    applied to the fp32 product as SDPA does."""
    return (
        tl.dot(x_o, tl.trans(y_o), tl.dot(x_e, tl.trans(y_e), input_precision=DOT_PREC), input_precision=DOT_PREC)
        * qk_scale
    )


@triton.jit
def _visible(t_i, t_j, rows, cols, L, window):
    return (
        (t_j[None, :] <= t_i[:, None])
        & (t_i[:, None] - t_j[None, :] < window)
        & (rows < L)[:, None]
        & (cols < L)[None, :]
    )


@triton.jit
def _fwd_tiles(
    acc,
    m_i,
    l_i,
    b_qe,
    b_qo,
    t_i,
    rows,
    kr_ptr,
    v_ptr,
    pos_ptr,
    start_lo,
    start_hi,
    L,
    D,
    window,
    qk_scale,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DT: tl.constexpr,
    BN: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
):
    """Online softmax over the key tiles [start_lo, start_hi); MASKED=False for tiles every row sees whole."""
    for start in range(start_lo, start_hi, BN):
        cols = start + tl.arange(0, BN)
        b_ke, b_ko = _load_pair(kr_ptr, cols, L, DT, BH)
        s = _scores(b_qe, b_qo, b_ke, b_ko, qk_scale, DOT_PREC)
        if MASKED:
            t_j = tl.load(pos_ptr + cols * 3, mask=cols < L, other=0)
            s = tl.where(_visible(t_i, t_j, rows, cols, L, window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        b_v = _load_rows(v_ptr, cols, L, D, BD).to(DT)
        acc = tl.dot(p.to(DT), b_v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def rope_attn_fwd_kernel(
    qr_ptr,
    kr_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    pos_ptr,
    kv_lo_ptr,
    kv_mid_ptr,
    kv_hi_ptr,
    L,
    D,
    window,
    qk_scale,
    DOT_PREC: tl.constexpr,
    DT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest key ranges start first
    bh = tl.program_id(1).to(tl.int64)
    off = bh * L * D
    off_r = bh * L * 2 * BH
    rows = pid_m * BM + tl.arange(0, BM)
    b_qe, b_qo = _load_pair(qr_ptr + off_r, rows, L, DT, BH)
    t_i = tl.load(pos_ptr + rows * 3, mask=rows < L, other=0)
    lo = tl.load(kv_lo_ptr + pid_m)
    mid = tl.load(kv_mid_ptr + pid_m)
    hi = tl.load(kv_hi_ptr + pid_m)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    acc, m_i, l_i = _fwd_tiles(
        acc,
        m_i,
        l_i,
        b_qe,
        b_qo,
        t_i,
        rows,
        kr_ptr + off_r,
        v_ptr + off,
        pos_ptr,
        lo,
        mid,
        L,
        D,
        window,
        qk_scale,
        False,
        DOT_PREC,
        DT,
        BN,
        BH,
        BD,
    )
    acc, m_i, l_i = _fwd_tiles(
        acc,
        m_i,
        l_i,
        b_qe,
        b_qo,
        t_i,
        rows,
        kr_ptr + off_r,
        v_ptr + off,
        pos_ptr,
        mid,
        hi,
        L,
        D,
        window,
        qk_scale,
        True,
        DOT_PREC,
        DT,
        BN,
        BH,
        BD,
    )
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    col = tl.arange(0, BD)
    tl.store(
        o_ptr + off + rows[:, None] * D + col[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=(rows < L)[:, None] & (col < D)[None, :],
    )
    tl.store(lse_ptr + bh * L + rows, m_i + tl.log2(l_safe), mask=rows < L)


@triton.jit
def _dkv_tiles(
    dk_e,
    dk_o,
    dv,
    b_ke,
    b_ko,
    b_v,
    t_j,
    cols,
    qr_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    pos_ptr,
    start_lo,
    start_hi,
    L,
    D,
    window,
    qk_scale,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DT: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
):
    """dk, dv of one key block over the query tiles [start_lo, start_hi). Unmasked tiles may run past L: those
    rows load q = do = lse = delta = 0 and add exactly 0."""
    for start in range(start_lo, start_hi, BM):
        rows = start + tl.arange(0, BM)
        b_qe, b_qo = _load_pair(qr_ptr, rows, L, DT, BH)
        b_do = _load_rows(do_ptr, rows, L, D, BD).to(DT)
        lse = tl.load(lse_ptr + rows, mask=rows < L, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=rows < L, other=0.0)
        s_t = _scores(b_ke, b_ko, b_qe, b_qo, qk_scale, DOT_PREC)  # (BN, BM), base 2
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            t_i = tl.load(pos_ptr + rows * 3, mask=rows < L, other=0)
            p_t = tl.where(tl.trans(_visible(t_i, t_j, rows, cols, L, window)), p_t, 0.0)
        dv = tl.dot(p_t.to(DT), b_do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(DT)
        dk_e = tl.dot(ds_t, b_qe, dk_e, input_precision=DOT_PREC)
        dk_o = tl.dot(ds_t, b_qo, dk_o, input_precision=DOT_PREC)
    return dk_e, dk_o, dv


@triton.jit
def rope_attn_bwd_dkv_kernel(
    qr_ptr,
    kr_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    pos_ptr,
    w_ptr,
    q_lo_ptr,
    q_mid_ptr,
    q_hi_ptr,
    L,
    D,
    HALF,
    window,
    qk_scale,
    scale,
    DOT_PREC: tl.constexpr,
    DT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    off = bh * L * D
    off_r = bh * L * 2 * BH
    cols = pid_n * BN + tl.arange(0, BN)
    b_ke, b_ko = _load_pair(kr_ptr + off_r, cols, L, DT, BH)
    b_v = _load_rows(v_ptr + off, cols, L, D, BD).to(DT)
    t_j = tl.load(pos_ptr + cols * 3, mask=cols < L, other=0)
    lo = tl.load(q_lo_ptr + pid_n)
    mid = tl.load(q_mid_ptr + pid_n)
    hi = tl.load(q_hi_ptr + pid_n)
    dk_e = tl.zeros([BN, BH], dtype=tl.float32)
    dk_o = tl.zeros([BN, BH], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    # the partly visible query tiles come first here: [lo, mid) masked, [mid, hi) whole
    dk_e, dk_o, dv = _dkv_tiles(
        dk_e,
        dk_o,
        dv,
        b_ke,
        b_ko,
        b_v,
        t_j,
        cols,
        qr_ptr + off_r,
        do_ptr + off,
        lse_ptr + bh * L,
        delta_ptr + bh * L,
        pos_ptr,
        lo,
        mid,
        L,
        D,
        window,
        qk_scale,
        True,
        DOT_PREC,
        DT,
        BM,
        BH,
        BD,
    )
    dk_e, dk_o, dv = _dkv_tiles(
        dk_e,
        dk_o,
        dv,
        b_ke,
        b_ko,
        b_v,
        t_j,
        cols,
        qr_ptr + off_r,
        do_ptr + off,
        lse_ptr + bh * L,
        delta_ptr + bh * L,
        pos_ptr,
        mid,
        hi,
        L,
        D,
        window,
        qk_scale,
        False,
        DOT_PREC,
        DT,
        BM,
        BH,
        BD,
    )
    _store_unrotated(dk_ptr + off, dk_e * scale, dk_o * scale, pos_ptr, w_ptr, cols, L, D, HALF, BH)
    col = tl.arange(0, BD)
    tl.store(
        dv_ptr + off + cols[:, None] * D + col[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=(cols < L)[:, None] & (col < D)[None, :],
    )


@triton.jit
def _dq_tiles(
    dq_e,
    dq_o,
    b_qe,
    b_qo,
    b_do,
    lse,
    delta,
    t_i,
    rows,
    kr_ptr,
    v_ptr,
    pos_ptr,
    start_lo,
    start_hi,
    L,
    D,
    window,
    qk_scale,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DT: tl.constexpr,
    BN: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
):
    for start in range(start_lo, start_hi, BN):
        cols = start + tl.arange(0, BN)
        b_ke, b_ko = _load_pair(kr_ptr, cols, L, DT, BH)
        b_v = _load_rows(v_ptr, cols, L, D, BD).to(DT)
        s = _scores(b_qe, b_qo, b_ke, b_ko, qk_scale, DOT_PREC)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            t_j = tl.load(pos_ptr + cols * 3, mask=cols < L, other=0)
            p = tl.where(_visible(t_i, t_j, rows, cols, L, window), p, 0.0)
        dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(DT)
        dq_e = tl.dot(ds, b_ke, dq_e, input_precision=DOT_PREC)
        dq_o = tl.dot(ds, b_ko, dq_o, input_precision=DOT_PREC)
    return dq_e, dq_o


@triton.jit
def rope_attn_bwd_dq_kernel(
    qr_ptr,
    kr_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    pos_ptr,
    w_ptr,
    kv_lo_ptr,
    kv_mid_ptr,
    kv_hi_ptr,
    L,
    D,
    HALF,
    window,
    qk_scale,
    scale,
    DOT_PREC: tl.constexpr,
    DT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest key ranges start first
    bh = tl.program_id(1).to(tl.int64)
    off = bh * L * D
    off_r = bh * L * 2 * BH
    rows = pid_m * BM + tl.arange(0, BM)
    b_qe, b_qo = _load_pair(qr_ptr + off_r, rows, L, DT, BH)
    b_do = _load_rows(do_ptr + off, rows, L, D, BD).to(DT)
    lse = tl.load(lse_ptr + bh * L + rows, mask=rows < L, other=0.0)
    delta = tl.load(delta_ptr + bh * L + rows, mask=rows < L, other=0.0)
    t_i = tl.load(pos_ptr + rows * 3, mask=rows < L, other=0)
    lo = tl.load(kv_lo_ptr + pid_m)
    mid = tl.load(kv_mid_ptr + pid_m)
    hi = tl.load(kv_hi_ptr + pid_m)
    dq_e = tl.zeros([BM, BH], dtype=tl.float32)
    dq_o = tl.zeros([BM, BH], dtype=tl.float32)
    dq_e, dq_o = _dq_tiles(
        dq_e,
        dq_o,
        b_qe,
        b_qo,
        b_do,
        lse,
        delta,
        t_i,
        rows,
        kr_ptr + off_r,
        v_ptr + off,
        pos_ptr,
        lo,
        mid,
        L,
        D,
        window,
        qk_scale,
        False,
        DOT_PREC,
        DT,
        BN,
        BH,
        BD,
    )
    dq_e, dq_o = _dq_tiles(
        dq_e,
        dq_o,
        b_qe,
        b_qo,
        b_do,
        lse,
        delta,
        t_i,
        rows,
        kr_ptr + off_r,
        v_ptr + off,
        pos_ptr,
        mid,
        hi,
        L,
        D,
        window,
        qk_scale,
        True,
        DOT_PREC,
        DT,
        BN,
        BH,
        BD,
    )
    _store_unrotated(dq_ptr + off, dq_e * scale, dq_o * scale, pos_ptr, w_ptr, rows, L, D, HALF, BH)


# --------------------------------------------------------------------------------------------- launchers
def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """Allocation of every kernel output (tests swap in a NaN fill to prove each element is written)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _env_config(name: str):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        BM, BN, warps, stages = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"{name} must be four integers 'BM,BN,warps,stages', got {raw!r}") from None
    return BM, BN, warps, stages


def _config(d: int, dtype: torch.dtype, backward: bool = False, L: int = 0):
    """(BM, BN, num_warps, num_stages) of the forward or the backward kernels. Small tiles under the
    interpreter (tests), fixed GPU tiles otherwise. HOPE_ROPE_CONFIG="BM,BN,warps,stages" overrides both
    passes, HOPE_ROPE_BWD_CONFIG the backward (sweeps, compile reports).
    16-bit, d <= 64: measured on an H200 (benchmarks/results/2026-11-27-H200-rope-sweep.md, B=4, H=16): forward
    64x64/4 warps/2 stages 0.51 ms at L = 2064 against 0.70 for 128x64/4/3, which wins at L = 16512 (6.58 ms
    against 7.68); backward 64x64/4/3 1.54 / 22.98 ms against 1.57 / 27.29 for 64x64/4/2. ptxas (sm_90): no
    spills in these; 128x64 backward tiles spill 108-308 B with 4 warps. float32 keeps 32 x 32 tiles (64 x 64
    spilled 4.8-27 KB per thread before q and k were pre-rotated; not measured since)."""
    env = (_env_config("HOPE_ROPE_BWD_CONFIG") if backward else None) or _env_config("HOPE_ROPE_CONFIG")
    if env is not None:
        return env
    if triton_interpret():
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return 32, 32, 4, 2
    if d <= 64:
        if backward:
            return 64, 64, 4, 3
        return (128, 64, 4, 3) if L >= 8192 else (64, 64, 4, 2)
    return 64, 32, 4, 2


def _dims(d: int):
    half = d // 2
    return half, max(16, triton.next_power_of_2(half)), max(16, triton.next_power_of_2(d))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of tl.dot: the input dtype on GPU; fp32 under the interpreter (no bf16 arithmetic there)."""
    if triton_interpret() or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _ranges(t: torch.Tensor, block: int, step: int, window: int, *, keys_of_queries: bool):
    """Per block of `block` rows: the contiguous [lo, hi) range of partner rows that can be visible, walked in
    tiles of `step`, and the split `mid` between masked tiles and tiles that every row of the block sees whole.

    keys_of_queries: for query blocks, the keys they see (t_j <= t_i, t_i - t_j < window); tiles in [lo, mid)
    need no mask. Else for key blocks, the queries that see them; tiles in [mid, hi) need no mask. With a
    window every tile is masked (mid = lo, resp. hi)."""
    L = t.shape[0]
    starts = torch.arange(0, L, block, device=t.device)
    first, last = t[starts], t[(starts + block).clamp(max=L) - 1]
    windowed = window < _NO_WINDOW
    if keys_of_queries:
        hi = torch.searchsorted(t, last, right=True)
        lo = torch.searchsorted(t, first - window + 1) if windowed else torch.zeros_like(hi)
        whole = torch.searchsorted(t, first, right=True)  # keys every query of the block sees
        mid = lo if windowed else lo + torch.div(whole - lo, step, rounding_mode="floor") * step
    else:
        lo = torch.searchsorted(t, first)
        hi = torch.searchsorted(t, last + window - 1, right=True) if windowed else torch.full_like(lo, L)
        whole = torch.searchsorted(t, last)  # queries that see every key of the block
        mid = (
            hi
            if windowed
            else torch.minimum(lo + torch.div(whole - lo + step - 1, step, rounding_mode="floor") * step, hi)
        )
    return tuple(x.to(torch.int32).contiguous() for x in (lo, mid, hi))


_MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second axis, where every kernel here puts B * H


def _prep(q, pos, w, window):
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        raise ValueError(
            f"rope_attention (triton): B * H = {q.shape[0] * q.shape[1]} exceeds {_MAX_GRID_Y} "
            f"(one launch-grid axis per head); split the batch or use backend='cuda' / 'reference'"
        )
    t = pos[:, 0].to(torch.int64).contiguous()
    pos32 = pos.to(torch.int32).contiguous()
    win = _NO_WINDOW if not window else int(window)
    return t, pos32, w.to(device=q.device, dtype=torch.float32).contiguous(), win


def _rotate(x: torch.Tensor, pos32: torch.Tensor, w: torch.Tensor, BH: int) -> torch.Tensor:
    """x (B, H, L, d) -> rotated halves (B, H, L, 2 * BH) in x's dtype (rope_rotate_kernel's layout)."""
    B, H, L, d = x.shape
    out = x.new_empty((B, H, L, 2 * BH))
    BR = 16 if triton_interpret() else max(8, 1024 // BH)  # 32 rows at d = 64: ptxas gave 64 rows 197 registers
    rope_rotate_kernel[(triton.cdiv(L, BR), B * H)](x, out, pos32, w, L, d, d // 2, BR=BR, BH=BH, num_warps=4)
    return out


def rope_attention_fwd_triton(q, k, v, pos, w, window: int, scale: float, config=None):
    """q, k, v (B, H, L, d), pos (L, 3), w (3, d) -> o (B, H, L, d), lse (B, H, L) fp32 in base-2 units.
    config: (BM, BN, num_warps, num_stages) instead of `_config`'s (benchmarks/sweep_gpu.py), both passes."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, L, d = q.shape
    o = _empty_like(q)
    lse = _empty_like(q.new_empty((B, H, L), dtype=torch.float32))
    if q.numel() == 0:
        return o, lse
    t, pos32, w, win = _prep(q, pos, w, window)
    BM, BN, warps, stages = config or _config(d, q.dtype, L=L)
    half, BH, BD = _dims(d)
    qr, kr = _rotate(q, pos32, w, BH), _rotate(k, pos32, w, BH)
    kv = _ranges(t, BM, BN, win, keys_of_queries=True)
    grid = (triton.cdiv(L, BM), B * H)
    rope_attn_fwd_kernel[grid](
        qr,
        kr,
        v,
        o,
        lse,
        pos32,
        *kv,
        L,
        d,
        win,
        scale * _LOG2E,
        DOT_PREC=_dot_precision(q.dtype),
        DT=_dot_dtype(q.dtype),
        BM=BM,
        BN=BN,
        BH=BH,
        BD=BD,
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


def rope_attention_bwd_triton(do, q, k, v, o, lse, pos, w, window: int, scale: float, config=None):
    """Gradients (dq, dk, dv) of rope_attention_fwd_triton, each (B, H, L, d) in the input dtype."""
    q, k, v, o, do = q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous(), do.contiguous().to(q.dtype)
    B, H, L, d = q.shape
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    delta = (o.float() * do.float()).sum(-1).contiguous()
    t, pos32, w, win = _prep(q, pos, w, window)
    BM, BN, warps, stages = config or _config(d, q.dtype, backward=True, L=L)
    half, BH, BD = _dims(d)
    qr, kr = _rotate(q, pos32, w, BH), _rotate(k, pos32, w, BH)
    prec = _dot_precision(q.dtype)
    qs = _ranges(t, BN, BM, win, keys_of_queries=False)
    rope_attn_bwd_dkv_kernel[(triton.cdiv(L, BN), B * H)](
        qr,
        kr,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        pos32,
        w,
        *qs,
        L,
        d,
        half,
        win,
        scale * _LOG2E,
        scale,
        DOT_PREC=prec,
        DT=_dot_dtype(q.dtype),
        BM=BM,
        BN=BN,
        BH=BH,
        BD=BD,
        num_warps=warps,
        num_stages=stages,
    )
    kv = _ranges(t, BM, BN, win, keys_of_queries=True)
    rope_attn_bwd_dq_kernel[(triton.cdiv(L, BM), B * H)](
        qr,
        kr,
        v,
        do,
        lse,
        delta,
        dq,
        pos32,
        w,
        *kv,
        L,
        d,
        half,
        win,
        scale * _LOG2E,
        scale,
        DOT_PREC=prec,
        DT=_dot_dtype(q.dtype),
        BM=BM,
        BN=BN,
        BH=BH,
        BD=BD,
        num_warps=warps,
        num_stages=stages,
    )
    return dq, dk, dv
