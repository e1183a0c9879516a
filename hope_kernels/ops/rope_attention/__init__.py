"""3D-RoPE block-causal attention (DESIGN 4.2). Stand-in public function over the eager reference."""
from __future__ import annotations

import torch

from hope_kernels.ops.checks import check_tensor
from hope_kernels.ops.rope_attention.reference import rope_attention_reference

__all__ = ["rope_attention", "rope_attention_reference"]


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, *, window=None,
                   rope_compat=None, scale=None, backend: str = "auto") -> torch.Tensor:
    """q, k, v (B, H, L, d); pos int (L, 3) = (t, h, w). Returns (B, H, L, d)."""
    for n, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(n, x, ndim=4, shape_doc="(B, H, L, d)")
    if pos.dim() != 2 or pos.shape != (q.shape[2], 3):
        raise ValueError(f"pos must be (L, 3) = ({q.shape[2]}, 3), got {tuple(pos.shape)}")
    return rope_attention_reference(q, k, v, pos, window=window, rope_compat=rope_compat, scale=scale)
