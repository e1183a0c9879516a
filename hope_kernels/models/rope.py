"""Token layout shared by both predictors: per timestep `[a_t, (s_t), N patch tokens]` (docs/design.md#predictors).

Positions are (t, h, w) rows for `rope_attention`: patches use their grid cell, action/state tokens use their
timestep with h = w = 0 (their h/w RoPE slices rotate by angle 0).
"""

from __future__ import annotations

import torch


def token_positions(T: int, H: int, W: int, n_cond: int, device=None) -> torch.Tensor:
    """(T * (n_cond + H*W), 3) int64 positions in token order."""
    hh, ww = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    patch = torch.stack([torch.zeros(H * W, dtype=torch.long), hh.flatten(), ww.flatten()], dim=1)
    cond = torch.zeros(n_cond, 3, dtype=torch.long)
    step = torch.cat([cond, patch], dim=0)  # (n_cond + N, 3)
    pos = step.repeat(T, 1)
    pos[:, 0] = torch.arange(T).repeat_interleave(n_cond + H * W)
    return pos.to(device)


def interleave_tokens(cond: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """cond: list of (B, T, C) tokens, x (B, T, N, C) -> (B, T * (len(cond) + N), C) in layout order."""
    B, T, N, C = x.shape
    parts = [c[:, :, None] for c in cond] + [x]
    return torch.cat(parts, dim=2).reshape(B, T * (len(cond) + N), C)


def drop_cond_tokens(y: torch.Tensor, T: int, n_cond: int) -> torch.Tensor:
    """(B, T * (n_cond + N), C) -> patch tokens (B, T, N, C)."""
    B, L, C = y.shape
    return y.reshape(B, T, L // T, C)[:, :, n_cond:]
