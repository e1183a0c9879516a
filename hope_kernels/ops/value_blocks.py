"""Blocks of value columns for the Triton memory kernels (dgd_memory, titans_memory's linear memory).

Both rules act on each value column of the state on its own, so their kernels split the value dim over
programs, grid (B*H, NV). The gradients that are sums over value columns (dq, dk, the gate gradients) are
written by each block to its own float32 slab, (NV, *shape), and the launcher adds the slabs up.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import triton

from hope_kernels.ops.checks import env_int


def value_tile(dv: int, value_block: int | None, env: str, default: int) -> int:
    """BV, the value columns per program: a power of two >= 16, at most the padded dv. value_block None: the
    environment variable `env`, else `default`; 0 or less: all columns in one program."""
    if value_block is None:
        value_block = env_int(env, default)
    full = max(16, triton.next_power_of_2(dv))
    return full if value_block <= 0 else min(full, max(16, triton.next_power_of_2(value_block)))


def alloc_partials(
    likes: Sequence[torch.Tensor],
    nv: int,
    acc: torch.dtype,
    alloc: Callable[[tuple, torch.Tensor, torch.dtype], torch.Tensor],
) -> list[torch.Tensor]:
    """Gradient buffers for `likes`: their own shape and dtype with one block, else (nv, *shape) slabs in acc."""
    if nv == 1:
        return [alloc(x.shape, x, x.dtype) for x in likes]
    return [alloc((nv,) + tuple(x.shape), x, acc) for x in likes]


def sum_partials(grads: Sequence[torch.Tensor], likes: Sequence[torch.Tensor], nv: int) -> list[torch.Tensor]:
    """The slabs of `alloc_partials` summed over the blocks, in the dtypes of `likes` (unchanged with one)."""
    if nv == 1:
        return list(grads)
    return [g.sum(0).to(x.dtype) for g, x in zip(grads, likes)]
