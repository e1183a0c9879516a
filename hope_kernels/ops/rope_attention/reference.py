"""Eager reference of 3D-RoPE block-causal attention (DESIGN 4.2). Stand-in until the kernel branch lands.

    o = softmax(mask(rope(q, pos) rope(k, pos)^T * scale)) v          q, k, v (B, H, L, d), pos (L, 3) = (t, h, w)

head_dim d is split into slices (t | h | w) of size 2*floor(d/6) each; the remainder stays unrotated. In a
slice of length n, pair (x[2j], x[2j+1]) is rotated by angle p * 10000^(-2j/n). rope_compat="vjepa2" uses
the official V-JEPA 2 formula instead (cos/sin tiled with repeat, pairs interleaved), which is not a rotation.
Mask: token i sees token j iff t_i - window <= t_j <= t_i (window=None: all past timesteps).
"""
from __future__ import annotations

import torch


def rope_rotate(x: torch.Tensor, p: torch.Tensor, compat: str | None = None) -> torch.Tensor:
    """Rotate the last dim (even length n) of x (..., L, n) by positions p (L,)."""
    n = x.shape[-1]
    j = torch.arange(n // 2, device=x.device, dtype=torch.float64)
    omega = 10000.0 ** (-2.0 * j / n)
    ang = p.to(torch.float64)[:, None] * omega[None, :]                  # (L, n/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    if compat == "vjepa2":
        cos, sin = cos.repeat(1, 2), sin.repeat(1, 2)                    # (L, n): [c0..c_{n/2-1}, c0..]
        y = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return x * cos + y * sin
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


def rope_3d(x: torch.Tensor, pos: torch.Tensor, compat: str | None = None) -> torch.Tensor:
    """x (B, H, L, d), pos (L, 3): rotate the t, h, w slices; the remainder of d stays as is."""
    d = x.shape[-1]
    s = 2 * (d // 6)
    if s == 0:
        return x
    parts = [rope_rotate(x[..., i * s:(i + 1) * s], pos[:, i], compat) for i in range(3)]
    return torch.cat(parts + [x[..., 3 * s:]], dim=-1)


def block_causal_mask(frames: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(L, L) bool, True where query i may attend key j."""
    ti, tj = frames[:, None], frames[None, :]
    m = tj <= ti
    if window is not None:
        m = m & (tj >= ti - window)
    return m


def rope_attention_reference(q, k, v, pos, *, window=None, rope_compat=None, scale=None):
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    qr, kr = rope_3d(q, pos, rope_compat), rope_3d(k, pos, rope_compat)
    s = (qr @ kr.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~block_causal_mask(pos[:, 0], window), float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ v)
