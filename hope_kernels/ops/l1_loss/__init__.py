"""Fused teacher-forcing / rollout L1 loss (docs/design.md#l1-loss): public function, custom op and dispatcher.

    loss, per_step = l1_rollout_loss(pred, target, step_weight=w)       # pred, target (B, T, N, D)

Backends: reference (eager), triton, cuda, cpu (compiled C++). The registered op is
`torch.ops.hope_kernels.l1_rollout_loss(pred, target, step_weight, normalize_target, eps, backend)`; its
backward is `torch.ops.hope_kernels.l1_rollout_loss_backward`. Both have fake kernels, so the op traces
under torch.compile. In eager mode the public function validates and resolves once and calls the same kernels
through a torch.autograd.Function (no custom-op dispatch, no host sync on GPU); there the C++ CPU forward also
writes the signs of pred - target_n (2 bits per element) when pred needs a gradient, and the backward builds the
gradient from those signs alone (no second read of pred and target).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from hope_kernels.dispatch import resolve_backend
from hope_kernels.ops.checks import (accum_dtype, check_same_device, check_same_dtype, check_same_shape, check_tensor,
                                     reads_values)
from hope_kernels.ops.l1_loss.reference import l1_rollout_loss_reference

__all__ = ["l1_rollout_loss", "l1_rollout_loss_reference"]

_OP = "l1_rollout_loss"


def _validate(pred, target, step_weight, normalize_target, eps) -> None:
    check_tensor("pred", pred, ndim=4, shape_doc="(B, T, N, D)")
    check_tensor("target", target, ndim=4, shape_doc="(B, T, N, D)")
    check_same_shape(("pred", "target"), (pred, target))
    if pred.numel() == 0:   # a mean over nothing: NaN from some paths, 0 from others
        raise ValueError(f"pred and target must not be empty, got shape {tuple(pred.shape)} (B, T, N, D)")
    if not isinstance(normalize_target, bool):
        raise TypeError(f"normalize_target must be a bool, got {type(normalize_target).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (added to the target's variance), got {eps!r}")
    check_same_dtype(("pred", "target"), (pred, target))
    check_same_device(("pred", "target", "step_weight"), (pred, target, step_weight))
    if step_weight is not None:
        check_tensor("step_weight", step_weight, ndim=1, shape_doc=f"(T,) = ({pred.shape[1]},)")
        if step_weight.shape[0] != pred.shape[1]:
            raise ValueError(f"step_weight must be (T,) = ({pred.shape[1]},), got {tuple(step_weight.shape)}")


def _check_weight_values(step_weight: torch.Tensor) -> None:
    """step_weight must be finite, >= 0 and not sum to 0. The check reads the values: on a CPU tensor that is
    cheap and always done; on a GPU it would be a host sync per call, so there it runs only with
    HOPE_KERNELS_DEBUG=1 (otherwise a zero sum gives a non-finite loss and nothing is raised)."""
    if not reads_values(step_weight):
        return
    vals = step_weight.detach().double().tolist()
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"step_weight must be finite, got {vals}")
    if any(v < 0 for v in vals):
        raise ValueError(f"step_weight must be >= 0, got {vals}")
    if sum(vals) <= 0:
        raise ValueError(f"step_weight must not sum to 0, got {vals}")


def _resolve(backend: str, pred: torch.Tensor, target: torch.Tensor) -> str:
    return resolve_backend(backend, (pred, target), op=_OP, gpu_order=("cuda", "triton"))


def _per_step(backend: str, pred, target, normalize_target: bool, eps: float, signs: bool = False):
    """per_step (T,); with signs=True (backend "cpu" only) (per_step, sign bitmaps of pred - target_n, (B, T, N,
    2, ceil(D / 8)) uint8: bit d % 8 of byte d // 8 set where it is > 0 (first map), < 0 (second))."""
    if signs:
        return torch.ops.hope_kernels.l1_per_step_signs(pred, target, normalize_target, eps)
    if backend == "triton":
        from hope_kernels.ops.l1_loss.triton import l1_per_step_triton
        return l1_per_step_triton(pred, target, normalize_target, eps)
    if backend in ("cuda", "cpu"):
        return torch.ops.hope_kernels.l1_per_step(pred, target, normalize_target, eps)
    with torch.no_grad():
        return l1_rollout_loss_reference(pred, target, None, normalize_target, eps)[1]


def _per_step_backward(backend: str, pred, target, coef, normalize_target: bool, eps: float) -> torch.Tensor:
    if backend == "triton":
        from hope_kernels.ops.l1_loss.triton import l1_per_step_backward_triton
        return l1_per_step_backward_triton(pred, target, coef, normalize_target, eps)
    if backend in ("cuda", "cpu"):
        return torch.ops.hope_kernels.l1_per_step_backward(pred, target, coef, normalize_target, eps)
    B, _, N, D = pred.shape
    with torch.enable_grad():
        p = pred.detach().requires_grad_(True)
        per_step = l1_rollout_loss_reference(p, target, None, normalize_target, eps)[1]
        (grad,) = torch.autograd.grad(per_step, p, coef.to(per_step) * (B * N * D))
    return grad


def _forward(backend: str, pred, target, step_weight, normalize_target: bool, eps: float):
    """Validated inputs, resolved backend -> (loss, per_step)."""
    return _weighted(_per_step(backend, pred, target, normalize_target, eps), step_weight)


def _weighted(per_step, step_weight):
    """per_step (T,) -> (loss, per_step)."""
    if step_weight is None:
        return per_step.mean(), per_step
    _check_weight_values(step_weight)
    w = step_weight.to(per_step)
    return (w * per_step).sum() / w.sum(), per_step


def _coef(grad_loss, grad_per_step, step_weight, shape) -> torch.Tensor:
    """d(loss, per_step)/d pred = coef[t] * sign(pred - target_n), coef (T,) in the accumulation dtype:
    d loss / d per_step[t] = w_t / sum(w), d per_step[t] / d pred = sign(.) / (B N D)."""
    B, T, N, D = shape
    coef = None
    if grad_loss is not None:
        if step_weight is None:
            coef = (grad_loss / T).expand(T)
        else:
            w = step_weight.to(grad_loss)
            coef = grad_loss * w / w.sum()
    if grad_per_step is not None:
        coef = grad_per_step if coef is None else coef + grad_per_step
    return coef / (B * N * D)


@torch.library.custom_op("hope_kernels::l1_rollout_loss", mutates_args=())
def _l1_rollout_loss_op(pred: torch.Tensor, target: torch.Tensor, step_weight: Optional[torch.Tensor],
                        normalize_target: bool, eps: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _validate(pred, target, step_weight, normalize_target, eps)
    return _forward(_resolve(backend, pred, target), pred, target, step_weight, normalize_target, eps)


@_l1_rollout_loss_op.register_fake
def _(pred, target, step_weight, normalize_target, eps, backend):
    acc = accum_dtype(pred.dtype)
    return pred.new_empty((), dtype=acc), pred.new_empty((pred.shape[1],), dtype=acc)


@torch.library.custom_op("hope_kernels::l1_rollout_loss_backward", mutates_args=())
def _l1_rollout_loss_backward_op(pred: torch.Tensor, target: torch.Tensor, coef: torch.Tensor,
                                 normalize_target: bool, eps: float, backend: str) -> torch.Tensor:
    backend = _resolve(backend, pred, target)
    return _per_step_backward(backend, pred, target, coef, normalize_target, eps)


@_l1_rollout_loss_backward_op.register_fake
def _(pred, target, coef, normalize_target, eps, backend):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    pred, target, step_weight, normalize_target, eps, backend = inputs
    ctx.save_for_backward(pred, target, step_weight)
    ctx.normalize_target, ctx.eps, ctx.backend = normalize_target, eps, backend


def _backward(ctx, grad_loss, grad_per_step):
    pred, target, step_weight = ctx.saved_tensors
    if grad_loss is None and grad_per_step is None:
        return None, None, None, None, None, None
    coef = _coef(grad_loss, grad_per_step, step_weight, pred.shape).to(accum_dtype(pred.dtype))
    grad_pred = _l1_rollout_loss_backward_op(pred, target, coef, ctx.normalize_target, ctx.eps, ctx.backend)
    return grad_pred, None, None, None, None, None


_l1_rollout_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _L1RolloutLoss(torch.autograd.Function):
    """Eager lane of the op: the same kernels and gradient as the registered custom op, without its dispatch
    (about 0.1 ms of Python per call); on the "cpu" backend, with pred needing a gradient, the forward's signs
    are saved and backward reads them instead of recomputing. Inputs are validated and the backend resolved by
    the caller; under torch.compile the public function uses the custom op instead."""

    @staticmethod
    def forward(ctx, pred, target, step_weight, normalize_target, eps, backend):
        ctx.set_materialize_grads(False)
        ctx.normalize_target, ctx.eps, ctx.backend = normalize_target, eps, backend
        ctx.shape, ctx.dtype = pred.shape, pred.dtype
        ctx.from_signs = backend == "cpu" and ctx.needs_input_grad[0]
        if ctx.from_signs:
            per_step, signs = _per_step(backend, pred, target, normalize_target, eps, True)
            ctx.save_for_backward(signs, None, step_weight)
        else:
            per_step = _per_step(backend, pred, target, normalize_target, eps)
            ctx.save_for_backward(pred, target, step_weight)
        return _weighted(per_step, step_weight)

    @staticmethod
    def backward(ctx, grad_loss, grad_per_step):
        pred_or_signs, target, step_weight = ctx.saved_tensors
        if grad_loss is None and grad_per_step is None:
            return None, None, None, None, None, None
        coef = _coef(grad_loss, grad_per_step, step_weight, ctx.shape).to(accum_dtype(ctx.dtype))
        if ctx.from_signs:
            grad_pred = torch.ops.hope_kernels.l1_signs_backward(pred_or_signs, coef, ctx.shape[-1], ctx.dtype)
        else:
            grad_pred = _per_step_backward(ctx.backend, pred_or_signs, target, coef, ctx.normalize_target, ctx.eps)
        return grad_pred, None, None, None, None, None


def l1_rollout_loss(pred: torch.Tensor, target: torch.Tensor, step_weight: torch.Tensor | None = None,
                    normalize_target: bool = True, eps: float = 1e-6, backend: str = "auto"):
    """Fused L1 loss over time steps.

    pred, target: (B, T, N, D), same dtype and device; step_weight: (T,) non-negative, not all zero, or None
    (its values are checked on CPU always, on GPU only with HOPE_KERNELS_DEBUG=1: the check is a host sync).
    Returns (loss (), per_step (T,)) in float32 (float64 for float64 inputs). Gradient flows to pred only.
    """
    _validate(pred, target, step_weight, normalize_target, eps)
    backend = _resolve(backend, pred, target)
    if backend == "reference":
        if step_weight is not None:
            _check_weight_values(step_weight)
        return l1_rollout_loss_reference(pred, target, step_weight, normalize_target, eps)
    if torch.compiler.is_compiling():
        return _l1_rollout_loss_op(pred, target.detach(), step_weight, normalize_target, float(eps), backend)
    return _L1RolloutLoss.apply(pred, target.detach(), step_weight, normalize_target, float(eps), backend)
