"""3D RoPE + block-causal attention (docs/design.md#rope-attention): public functions, custom ops and dispatcher.

    o  = rope_attention(q, k, v, pos, window=None, rope_compat=None)   # q, k, v (B, H, L, d); pos (L, 3) int
    xr = rope3d(x, pos, rope_compat=None)                               # x (..., L, d)

Token i attends token j iff t_j <= t_i and, when `window` is given, t_i - t_j < window: `window` counts the
visible timesteps including the current one (window=1: own timestep only), as V-JEPA 2's local_window_time.

rope_attention backends: reference (rope + SDPA with a materialised (L, L) bool mask), cpu (the C++ rotation,
then the C++ block-causal kernels of csrc/block_attention_cpu.cpp: each timestep attends exactly the keys it
may see, no mask; forward and backward), cuda (the CUDA rotation op composed with PyTorch SDPA and the mask),
triton (q and k rotated once into O(L d) scratch, then fused flash-attention kernels, forward and backward).
rope3d backends: reference, cpu, cuda.
The fast paths are the registry tables `_ROPE` and `_ATTN` (hope_kernels/ops/registry.py): custom ops
`hope_kernels::rope3d_<backend>` and `hope_kernels::rope_attention_<triton|cpu>` with their backward ops.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from hope_kernels.ops.checks import check_same_device, check_same_dtype, check_same_shape, check_tensor
from hope_kernels.ops.registry import Backend, OpTable, register
from hope_kernels.ops.rope_attention.reference import (
    ROPE_COMPAT,
    block_causal_mask,
    rope3d_reference,
    rope_attention_reference,
    rope_freqs,
)

__all__ = ["rope_attention", "rope3d", "rope_attention_reference", "rope3d_reference", "block_causal_mask"]


# ---------------------------------------------------------------------------------------------- validation
def _check_pos(pos, L: int) -> None:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"pos must be a torch.Tensor of integer (t, h, w) positions, got {type(pos).__name__}")
    if pos.dtype not in (torch.int32, torch.int64):  # uint8 would wrap t_i - t_j and lift the causal mask
        raise TypeError(f"pos must have an integer dtype (int32 or int64), got {pos.dtype}")
    if pos.dim() != 2 or pos.shape[1] != 3 or pos.shape[0] != L:
        raise ValueError(f"pos must be (L, 3) = ({L}, 3) holding (t, h, w), got shape {tuple(pos.shape)}")


def _check_head_dim(d: int) -> None:
    if d % 2 != 0 or d < 6:
        raise ValueError(f"head_dim d must be even and >= 6 (three rotated slices of 2*floor(d/6) columns), got d={d}")


def _check_compat(rope_compat) -> None:
    if rope_compat not in ROPE_COMPAT:
        raise ValueError(f"rope_compat must be None (true rotation) or 'vjepa2', got {rope_compat!r}")


_CHECKED = "_hope_kernels_pos_checked_version"


def _check_pos_values(pos: torch.Tensor) -> None:
    """t = pos[:, 0] must be non-decreasing. Reading it is a host sync on a GPU, so a tensor that passed is
    marked with its version counter and not read again until it changes: a predictor's layers share one pos
    per forward, which then costs one sync, not one per layer. Eager only (not while tracing fake tensors)."""
    if torch.compiler.is_compiling() or pos.shape[0] < 2 or getattr(pos, _CHECKED, None) == pos._version:
        return
    t = pos[:, 0]
    bad = (t[1:] < t[:-1]).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(
            f"pos[:, 0] (timestep t) must be non-decreasing, got t[{i}]={int(t[i])} > t[{i + 1}]={int(t[i + 1])}"
        )
    setattr(pos, _CHECKED, pos._version)


def _validate_attention(q, k, v, pos, window, rope_compat, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=4, shape_doc="(B, H, L, d)")
    check_same_shape(("q", "k", "v"), (q, k, v))
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_same_device(("q", "k", "v", "pos"), (q, k, v, pos))
    _check_pos(pos, q.shape[2])
    _check_head_dim(q.shape[3])
    _check_compat(rope_compat)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(
            f"window must be None or an int >= 1 (timesteps visible, the current one included), got {window!r}"
        )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"scale must be None (1/sqrt(d)) or a finite float > 0, got {scale!r}")


# ----------------------------------------------------------------------- rotation custom op (cpu / cuda)
@lru_cache(maxsize=64)
def _freqs_cached(d: int, vjepa2: bool, device: str, dtype: torch.dtype) -> torch.Tensor:
    return rope_freqs(d, "vjepa2" if vjepa2 else None, device=device, dtype=dtype).contiguous()


def _freqs(x: torch.Tensor, vjepa2: bool) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _freqs_cached(x.shape[-1], vjepa2, str(x.device), dtype)


def _rotate(x, pos, vjepa2):
    return torch.ops.hope_kernels.rope3d_fwd(x, pos, _freqs(x, vjepa2))


def _rotate_backward(grad, pos, vjepa2):
    return torch.ops.hope_kernels.rope3d_bwd(grad, pos, _freqs(grad, vjepa2))


def _rope3d_fake(x, pos, vjepa2):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope3d_setup(ctx, inputs, output):
    _, pos, vjepa2 = inputs
    ctx.save_for_backward(pos)
    ctx.vjepa2 = vjepa2


def _rope3d_backward(ctx, backward_op, grad):
    (pos,) = ctx.saved_tensors
    return backward_op(grad, pos, ctx.vjepa2), None, None


# hope_kernels::rope3d_<backend>(x, pos, vjepa2); one C++ op serves both (it dispatches on the device)
_ROPE = register(
    OpTable(
        name="rope3d",
        label="rope3d",
        schema="(Tensor x, Tensor pos, bool vjepa2) -> Tensor",
        backward_schema="(Tensor grad, Tensor pos, bool vjepa2) -> Tensor",
        fake=_rope3d_fake,
        fake_backward=_rope3d_fake,
        setup_context=_rope3d_setup,
        backward=_rope3d_backward,
        backends=(
            Backend("cuda", _rotate, _rotate_backward, devices=("cuda",)),
            Backend("cpu", _rotate, _rotate_backward, devices=("cpu",)),
        ),
    )
)
_ROPE_BACKENDS = _ROPE.supported


# ------------------------------------------------------------------------------------- attention backends
# forward(q, k, v, pos, window (0: none), vjepa2, scale) -> (o, lse); lse only for the fused backward.


def _rotate_then_sdpa(q, k, v, pos, window: int, vjepa2: bool, scale: float):
    """cuda: the CUDA rotation op composed with PyTorch SDPA and the mask (autograd through both) -> (o,)."""
    qr = _ROPE("cuda", q, pos, vjepa2)
    kr = _ROPE("cuda", k, pos, vjepa2)
    mask = block_causal_mask(pos[:, 0], window or None)
    return (F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, scale=scale),)


def _cpu_forward(q, k, v, pos, window, vjepa2, scale):
    """q and k rotated (contiguous copies), then the C++ block-causal kernels -> (o, lse)."""
    qr, kr = _rotate(q, pos, vjepa2), _rotate(k, pos, vjepa2)
    return torch.ops.hope_kernels.block_attention_fwd(qr, kr, v, pos, window, scale)


def _cpu_backward(grad_o, q, k, v, o, lse, pos, window, vjepa2, scale):
    """q and k rotated again (saving the rotated copies instead would hold two more (B, H, L, d) tensors per
    layer until the backward), the backward kernel, then the gradients rotated back."""
    qr, kr = _rotate(q, pos, vjepa2), _rotate(k, pos, vjepa2)
    dqr, dkr, dv = torch.ops.hope_kernels.block_attention_bwd(grad_o, qr, kr, v, o, lse, pos, window, scale)
    return _rotate_backward(dqr, pos, vjepa2), _rotate_backward(dkr, pos, vjepa2), dv


def _cpu_fake(q, k, v, pos, window, vjepa2, scale):
    B, H, L, d = q.shape
    o = q.new_empty((B, L, H, d)).transpose(1, 2)  # (B, L, H, d) memory: the heads merge with a view
    return o, q.new_empty((B, H, L), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


def _fused_forward(q, k, v, pos, window, vjepa2, scale):
    from hope_kernels.ops.rope_attention.triton import rope_attention_fwd_triton

    return rope_attention_fwd_triton(q, k, v, pos, _freqs(q, vjepa2), window, scale)


def _fused_backward_kernels(grad_o, q, k, v, o, lse, pos, window, vjepa2, scale):
    from hope_kernels.ops.rope_attention.triton import rope_attention_bwd_triton

    return rope_attention_bwd_triton(grad_o, q, k, v, o, lse, pos, _freqs(q, vjepa2), window, scale)


def _fused_fake(q, k, v, pos, window, vjepa2, scale):
    B, H, L, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, L), dtype=torch.float32)


def _fused_fake_backward(grad_o, q, k, v, o, lse, pos, window, vjepa2, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _fused_setup(ctx, inputs, output):
    q, k, v, pos, window, vjepa2, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, pos)
    ctx.window, ctx.vjepa2, ctx.scale = window, vjepa2, scale
    ctx.mark_non_differentiable(lse)


def _fused_backward(ctx, backward_op, grad_o, grad_lse):
    q, k, v, o, lse, pos = ctx.saved_tensors
    dq, dk, dv = backward_op(grad_o, q, k, v, o, lse, pos, ctx.window, ctx.vjepa2, ctx.scale)
    return dq, dk, dv, None, None, None, None


def _triton_accepts(q: torch.Tensor, device) -> str | None:
    from hope_kernels.ops.rope_attention.triton import MAX_D, SUPPORTED_DTYPES

    if q.dtype not in SUPPORTED_DTYPES:
        return f"rope_attention: backend 'triton' supports dtypes {SUPPORTED_DTYPES}, got {q.dtype}"
    if q.shape[-1] > MAX_D:
        return f"rope_attention: backend 'triton' supports head_dim d <= {MAX_D}, got d={q.shape[-1]}"
    return None


# triton: hope_kernels::rope_attention_triton, q and k rotated once into O(L d) scratch, then fused
# flash-attention kernels; cpu: hope_kernels::rope_attention_cpu, C++ rotation + block-causal kernels; cuda: a
# composite (auto on CUDA tensors: triton when it takes q, else cuda)
_ATTN = register(
    OpTable(
        name="rope_attention",
        label="rope_attention",
        schema="(Tensor q, Tensor k, Tensor v, Tensor pos, int window, bool vjepa2, float scale) -> (Tensor, Tensor)",
        backward_schema="(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor pos, int window, "
        "bool vjepa2, float scale) -> (Tensor, Tensor, Tensor)",
        fake=_fused_fake,
        fake_backward=_fused_fake_backward,
        setup_context=_fused_setup,
        backward=_fused_backward,
        saved_only=1,
        backends=(
            Backend(
                "triton",
                _fused_forward,
                _fused_backward_kernels,
                devices=("cuda",),
                priority=2,
                accepts=_triton_accepts,
            ),
            Backend("cuda", _rotate_then_sdpa, None, devices=("cuda",), priority=1),
            Backend("cpu", _cpu_forward, _cpu_backward, devices=("cpu",), fake=_cpu_fake),
        ),
    )
)
_ATTN_BACKENDS = _ATTN.supported


# ------------------------------------------------------------------------------------------- public API
def rope3d(
    x: torch.Tensor, pos: torch.Tensor, *, rope_compat: str | None = None, backend: str = "auto"
) -> torch.Tensor:
    """3D RoPE of docs/design.md#rope-attention. x (..., L, d) floating, pos (L, 3) int (t, h, w) -> rotated x,
    same shape/dtype.

    Backends: reference, cpu (compiled C++), cuda (compiled CUDA); auto picks the compiled one when built.
    """
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (..., L, d), got shape {tuple(x.shape)}")
    check_same_device(("x", "pos"), (x, pos))
    _check_pos(pos, x.shape[-2])
    _check_head_dim(x.shape[-1])
    _check_compat(rope_compat)
    backend = _ROPE.resolve(backend, (x, pos))
    if backend == "reference":
        return rope3d_reference(x, pos, rope_compat)
    return _ROPE(backend, x, pos, rope_compat == "vjepa2")


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    *,
    window: int | None = None,
    rope_compat: str | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-causal attention with 3D RoPE on q and k.

    q, k, v: (B, H, L, d), one floating dtype and device; pos: (L, 3) integer (t, h, w), t non-decreasing
    (action/state tokens: their timestep and h = w = 0). window: None (all past timesteps) or the number of
    timesteps visible including the current one. rope_compat: None (true rotation) or "vjepa2" (official
    V-JEPA 2 formula). scale: default 1/sqrt(d). Returns o (B, H, L, d) in q's dtype.
    """
    _validate_attention(q, k, v, pos, window, rope_compat, scale)
    backend = _ATTN.resolve(backend, (q,), q)
    _check_pos_values(pos)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return rope_attention_reference(q, k, v, pos, window, rope_compat, scale)
    return _ATTN(backend, q, k, v, pos, window or 0, rope_compat == "vjepa2", scale)[0]
