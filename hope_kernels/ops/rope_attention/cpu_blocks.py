"""CPU block-causal attention of rotated q, k, v: the cpu backend of rope_attention after the rotation.

    o = block_attention(q, k, v, pos, window, scale)   # q, k, v (B, H, L, d), pos (L, 3) int -> o (B, H, L, d)

One custom op, `hope_kernels::block_attention_cpu`, with its backward op and autograd, around the C++ kernels of
csrc/block_attention_cpu.cpp: the queries of one timestep attend exactly the keys they may see (no mask, no
masked score computed), and the forward saves o and the row log-sum-exp only. o and the gradients are (B, H, L, d)
views of (B, L, H, d) memory, so merging the heads afterwards is a view. window: 0 for none.
"""

from __future__ import annotations

import torch


def _heads_view(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    B, H, L, d = x.shape
    return x.new_empty((B, L, H, d), dtype=dtype).transpose(1, 2)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32  # the kernels' math dtype


@torch.library.custom_op("hope_kernels::block_attention_cpu", mutates_args=())
def _block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.hope_kernels.block_attention_fwd(q, k, v, pos, window, scale)


@_block_attention.register_fake
def _(q, k, v, pos, window, scale):
    return _heads_view(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.custom_op("hope_kernels::block_attention_cpu_backward", mutates_args=())
def _block_attention_backward(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    pos: torch.Tensor,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.hope_kernels.block_attention_bwd(grad_o, q, k, v, o, lse, pos, window, scale)


@_block_attention_backward.register_fake
def _(grad_o, q, k, v, o, lse, pos, window, scale):
    return _heads_view(q), _heads_view(q), _heads_view(q)


def _setup(ctx, inputs, output):
    q, k, v, pos, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, pos)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, pos = ctx.saved_tensors
    dq, dk, dv = _block_attention_backward(grad_o, q, k, v, o, lse, pos, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


_block_attention.register_autograd(_backward, setup_context=_setup)


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """Block-causal attention of rotated q, k, v (B, H, L, d) on the CPU -> o (B, H, L, d); pos (L, 3) with a
    non-decreasing t = pos[:, 0] (checked by the caller); window 0: all past timesteps."""
    return _block_attention(q, k, v, pos, window, scale)[0]
