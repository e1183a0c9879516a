"""Eager reference of 3D RoPE and block-causal attention (docs/design.md#rope-attention). Ground truth and benchmark
baseline.

Positions pos (L, 3) = (t, h, w), integers, t non-decreasing. head_dim d (even, >= 6) is split into three
slices (t | h | w) of n = 2 * floor(d / 6) columns each; the last d - 3n columns are not rotated.

    true rotation (rope_compat=None), pair j = (x[2j], x[2j+1]) of slice s, omega_j = 10000^(-2j / n):
        y[2j]   = x[2j] cos(a_j) - x[2j+1] sin(a_j)
        y[2j+1] = x[2j] sin(a_j) + x[2j+1] cos(a_j),          a_j = pos[:, s] * omega_j
    rope_compat="vjepa2" (the official V-JEPA 2 code, `repeat` instead of `repeat_interleave`): column c of
    the slice (c = 0..n-1) uses a_c = pos[:, s] * omega_{c mod n/2}, so the two members of a pair turn by
    different angles (not a rotation):
        y[c] = x[c] cos(a_c) - x[c+1] sin(a_c)   (c even),     y[c] = x[c] cos(a_c) + x[c-1] sin(a_c)   (c odd)

Both modes are y = x * C + swap(x) * S with per-column tables C = cos(A), S = sin(A), A = pos @ W, where
W (3, d) holds omega of column c in the row of its slice (0 elsewhere, and 0 for the unrotated columns),
and swap(x)[2j] = -x[2j+1], swap(x)[2j+1] = x[2j]. The gradient is g * C - swap(g * S) (the transpose;
for the true rotation it is the inverse rotation).

Attention: o = softmax(scale * rope(q) rope(k)^T + M) v with M[i, j] = 0 iff t_j <= t_i and, when window
is given, t_i - t_j < window (window = number of timesteps visible, the current one included, as in V-JEPA
2's local_window_time), else -inf. scale = 1 / sqrt(d) by default. Tables are float32 (float64 for
float64 inputs); the rotated q, k are cast back to the input dtype before SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hope_kernels.ops.checks import accum_dtype

ROPE_COMPAT = (None, "vjepa2")
THETA = 10000.0


def slice_len(d: int) -> int:
    """Columns per rotated slice: 2 * floor(d / 6)."""
    return 2 * (d // 6)


def rope_freqs(d: int, rope_compat: str | None, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """W (3, d): W[s, c] = omega of column c if c lies in slice s (t, h, w), else 0."""
    n = slice_len(d)
    half = n // 2
    omega = THETA ** (-torch.arange(half, dtype=torch.float64) / half)  # 10000^(-2j/n), j = 0..n/2-1
    c = torch.arange(n)
    per_col = omega[c // 2] if rope_compat is None else omega[c % half]
    W = torch.zeros(3, d, dtype=torch.float64)
    for s in range(3):
        W[s, s * n : (s + 1) * n] = per_col
    return W.to(device=device, dtype=dtype)


def rope_tables(pos: torch.Tensor, d: int, rope_compat: str | None, dtype: torch.dtype):
    """cos, sin tables (L, d) in the accumulation dtype of `dtype`."""
    acc = accum_dtype(dtype)
    W = rope_freqs(d, rope_compat, device=pos.device, dtype=acc)
    angle = (pos.to(acc)[:, :, None] * W[None]).sum(1)  # one non-zero term per column
    return angle.cos(), angle.sin()


def _swap(x: torch.Tensor) -> torch.Tensor:
    """swap(x)[2j] = -x[2j+1], swap(x)[2j+1] = x[2j]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope3d_reference(x: torch.Tensor, pos: torch.Tensor, rope_compat: str | None = None) -> torch.Tensor:
    """x (..., L, d), pos (L, 3) int -> rotated x (..., L, d), same dtype."""
    cos, sin = rope_tables(pos, x.shape[-1], rope_compat, x.dtype)
    xa = x.to(cos.dtype)
    return (xa * cos + _swap(xa) * sin).to(x.dtype)


def block_causal_mask(t: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """t (L,) -> bool (L, L), True where query i may attend key j: t_j <= t_i (and t_i - t_j < window)."""
    t = t.to(torch.int64)  # an unsigned t would wrap below 0 and let queries see later timesteps
    diff = t[:, None] - t[None, :]
    keep = diff >= 0
    if window is not None:
        keep = keep & (diff < window)
    return keep


def rope_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    window: int | None = None,
    rope_compat: str | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q, k, v (B, H, L, d), pos (L, 3) -> o (B, H, L, d): rope on q and k, then SDPA with the bool mask."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qr = rope3d_reference(q, pos, rope_compat)
    kr = rope3d_reference(k, pos, rope_compat)
    mask = block_causal_mask(pos[:, 0], window)
    return F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, scale=scale)
