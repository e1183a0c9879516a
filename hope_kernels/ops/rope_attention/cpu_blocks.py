"""CPU block-causal attention over per-timestep blocks (the cpu backend of rope_attention, after the rotation).

    o = timestep_block_attention(q, k, v, pos, blocks, window, scale)   # q, k, v (B, H, L, d) rotated -> o

`blocks` is _timestep_blocks' [(start, end, key_start)]: queries [start, end) see exactly keys [key_start, end).
Long blocks (at least MIN_BLOCK_QUERIES queries on average) run PyTorch's CPU flash-attention kernels forward and
backward per block, unmasked, over views of q, k and v: no masked score is computed. One autograd node holds all
blocks: slicing k and v per block under autograd gave each slice's gradient its own zero-filled full-length
tensor, summed afterwards (~10% of a tiny AC predictor step); here the block gradients are added into one dk and
one dv, and the outputs are written into one o (no concatenation, one copy saved). o is a (B, H, L, d) view of
(B, L, H, d) memory, so merging the heads back afterwards is a view.
Short blocks run one SDPA over all tokens with the block-causal mask, cached per pos: each kernel call is a
parallel region with its own fixed cost (and, on a busy machine, a wait for the slowest thread), which for a
tiny predictor (8 blocks of 66 tokens) cost more than the masked scores it skipped (2-4x slower, fwd+bwd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from hope_kernels.ops.rope_attention.reference import block_causal_mask

# per-block kernels from this many queries per block on average (V-JEPA 2-AC: 258 tokens a timestep); below,
# one masked call. Measured on 2 cores, fwd+bwd, d 64: masked 2.4x faster at 66 tokens, 1.3x at 146, even at 258.
MIN_BLOCK_QUERIES = 256
# nor past this many tokens: the cached (L, L) mask stays at most 64 MiB in float32
MAX_MASKED_TOKENS = 4096
_MASKS = "_hope_kernels_block_masks"

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _flash_chosen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether PyTorch's SDPA would run its CPU flash kernels for these inputs (not, e.g., under an
    sdpa_kernel context that excludes them): only then do the blocks call them directly."""
    return torch._fused_sdp_choice(q, k, v) == SDPBackend.FLASH_ATTENTION.value


def _additive_mask(pos: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """(L, L) 0 / -inf block-causal mask in `dtype` (what SDPA makes of the bool mask on every call), cached on
    pos with its version counter, like _timestep_blocks."""
    key = (pos._version, window, dtype)
    cached = getattr(pos, _MASKS, None)
    if cached is None or cached[0] != key:
        keep = block_causal_mask(pos[:, 0], window)
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
        cached = (key, mask)
        setattr(pos, _MASKS, cached)
    return cached[1]


class _TimestepBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, blocks, scale):
        B, H, L, d = q.shape
        o = q.new_empty(B, L, H, d).transpose(1, 2)
        lse = None
        for s, e, ks in blocks:
            ob, lb = _flash_fwd(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], scale=scale)
            if lse is None:  # the kernel's accumulation dtype
                lse = lb.new_empty(B, H, L)
            o[:, :, s:e] = ob
            lse[:, :, s:e] = lb
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.blocks, ctx.scale = blocks, scale
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o, lse = ctx.saved_tensors
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for s, e, ks in ctx.blocks:
            dqb, dkb, dvb = _flash_bwd(
                grad_o[:, :, s:e],
                q[:, :, s:e],
                k[:, :, ks:e],
                v[:, :, ks:e],
                o[:, :, s:e],
                lse[:, :, s:e],
                0.0,
                False,
                scale=ctx.scale,
            )
            dq[:, :, s:e] = dqb
            dk[:, :, ks:e] += dkb
            dv[:, :, ks:e] += dvb
        return dq, dk, dv, None, None


def timestep_block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, blocks: list, window: int | None, scale: float
) -> torch.Tensor:
    """Block-causal attention of rotated q, k, v (B, H, L, d) -> o (B, H, L, d); pos (L, 3) on the CPU."""
    if q.shape[2] < MIN_BLOCK_QUERIES * len(blocks) and q.shape[2] <= MAX_MASKED_TOKENS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_mask(pos, window, q.dtype), scale=scale)
    if _flash_chosen(q, k, v):
        return _TimestepBlockAttention.apply(q, k, v, blocks, scale)
    # SDPA would pick another kernel: one call per block, its choice
    return torch.cat(
        [
            F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], scale=scale)
            for s, e, ks in blocks
        ],
        dim=2,
    )
