"""Fused teacher-forcing / rollout L1 loss (DESIGN 4.1): public function, custom op and dispatcher.

    loss, per_step = l1_rollout_loss(pred, target, step_weight=w)       # pred, target (B, T, N, D)

Backends: reference (eager), triton, cuda, cpu (compiled C++). The registered op is
`torch.ops.hope_kernels.l1_rollout_loss(pred, target, step_weight, normalize_target, eps, backend)`; its
backward is `torch.ops.hope_kernels.l1_rollout_loss_backward`. Both have fake kernels, so the op traces
under torch.compile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from hope_kernels.dispatch import resolve_backend
from hope_kernels.ops.checks import accum_dtype, check_same_device, check_same_dtype, check_same_shape, check_tensor
from hope_kernels.ops.l1_loss.reference import l1_rollout_loss_reference

__all__ = ["l1_rollout_loss", "l1_rollout_loss_reference"]

_OP = "l1_rollout_loss"


def _validate(pred, target, step_weight) -> None:
    check_tensor("pred", pred, ndim=4, shape_doc="(B, T, N, D)")
    check_tensor("target", target, ndim=4, shape_doc="(B, T, N, D)")
    check_same_shape(("pred", "target"), (pred, target))
    check_same_dtype(("pred", "target"), (pred, target))
    check_same_device(("pred", "target", "step_weight"), (pred, target, step_weight))
    if step_weight is not None:
        check_tensor("step_weight", step_weight, ndim=1, shape_doc=f"(T,) = ({pred.shape[1]},)")
        if step_weight.shape[0] != pred.shape[1]:
            raise ValueError(f"step_weight must be (T,) = ({pred.shape[1]},), got {tuple(step_weight.shape)}")


def _check_weight_values(step_weight: torch.Tensor) -> None:
    # Value checks read the data, so they run in the real kernel only (not while tracing with fake tensors).
    # One host sync for the common valid case; the precise message is worked out only on failure.
    if bool((torch.isfinite(step_weight).all() & (step_weight >= 0).all() & (step_weight.sum() > 0)).item()):
        return
    if not torch.isfinite(step_weight).all():
        raise ValueError("step_weight must be finite")
    if (step_weight < 0).any():
        raise ValueError(f"step_weight must be >= 0, got {step_weight.tolist()}")
    raise ValueError("step_weight must not sum to 0")


def _resolve(backend: str, pred: torch.Tensor, target: torch.Tensor) -> str:
    return resolve_backend(backend, (pred, target), op=_OP, gpu_order=("cuda", "triton"))


def _per_step(backend: str, pred, target, normalize_target: bool, eps: float) -> torch.Tensor:
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


@torch.library.custom_op("hope_kernels::l1_rollout_loss", mutates_args=())
def _l1_rollout_loss_op(pred: torch.Tensor, target: torch.Tensor, step_weight: Optional[torch.Tensor],
                        normalize_target: bool, eps: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _validate(pred, target, step_weight)
    backend = _resolve(backend, pred, target)
    per_step = _per_step(backend, pred, target, normalize_target, eps)
    if step_weight is None:
        return per_step.mean(), per_step
    _check_weight_values(step_weight)
    w = step_weight.to(per_step)
    return (w * per_step).sum() / w.sum(), per_step


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
    B, T, N, D = pred.shape
    acc = accum_dtype(pred.dtype)
    w = torch.ones(T, device=pred.device, dtype=acc) if step_weight is None else step_weight.to(acc)
    # d loss / d per_step[t] = w_t / sum(w); d per_step[t] / d pred = sign(.) / (B N D)
    coef = grad_loss.to(acc) * w / w.sum()
    if grad_per_step is not None:
        coef = coef + grad_per_step.to(acc)
    coef = coef / (B * N * D)
    grad_pred = _l1_rollout_loss_backward_op(pred, target, coef, ctx.normalize_target, ctx.eps, ctx.backend)
    return grad_pred, None, None, None, None, None


_l1_rollout_loss_op.register_autograd(_backward, setup_context=_setup_context)


def l1_rollout_loss(pred: torch.Tensor, target: torch.Tensor, step_weight: torch.Tensor | None = None,
                    normalize_target: bool = True, eps: float = 1e-6, backend: str = "auto"):
    """Fused L1 loss over time steps.

    pred, target: (B, T, N, D), same dtype and device; step_weight: (T,) non-negative, not all zero, or None.
    Returns (loss (), per_step (T,)) in float32 (float64 for float64 inputs). Gradient flows to pred only.
    """
    _validate(pred, target, step_weight)
    backend = _resolve(backend, pred, target)
    if backend == "reference":
        if step_weight is not None and not torch.compiler.is_compiling():
            _check_weight_values(step_weight)
        return l1_rollout_loss_reference(pred, target, step_weight, normalize_target, eps)
    return _l1_rollout_loss_op(pred, target.detach(), step_weight, normalize_target, float(eps), backend)
