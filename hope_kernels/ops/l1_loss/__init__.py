"""Fused teacher-forcing / rollout L1 loss (docs/design.md#l1-loss): public function, custom op and dispatcher.

    loss, per_step = l1_rollout_loss(pred, target, step_weight=w)       # pred, target (B, T, N, D)

Backends: reference (eager, autograd), and the table `_L1` (hope_kernels/ops/registry.py): cuda, triton (CUDA
tensors, cuda first) and cpu (compiled C++). Each is the custom op `torch.ops.hope_kernels.l1_rollout_loss_<backend>
(pred, target, step_weight, normalize_target, eps, for_backward) -> (loss, per_step, signs)` with its backward op
`..._<backend>_backward` and fake kernels, so it traces under torch.compile. The public function validates and
resolves once. With for_backward (pred needs a gradient) the C++ CPU forward also writes the signs of
pred - target_n (2 bits per element) and the backward builds the gradient from those signs alone (no second read
of pred and target).
"""

from __future__ import annotations

import math
import numbers

import torch

from hope_kernels.dispatch import needs_backward
from hope_kernels.ops.checks import (
    accum_dtype,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_tensor,
    reads_values,
)
from hope_kernels.ops.l1_loss.reference import l1_rollout_loss_reference
from hope_kernels.ops.registry import Backend, OpTable, register

__all__ = ["l1_rollout_loss", "l1_rollout_loss_reference"]

_OP = "l1_rollout_loss"


def _validate(pred, target, step_weight, normalize_target, eps) -> None:
    check_tensor("pred", pred, ndim=4, shape_doc="(B, T, N, D)")
    check_tensor("target", target, ndim=4, shape_doc="(B, T, N, D)")
    check_same_shape(("pred", "target"), (pred, target))
    if pred.numel() == 0:  # a mean over nothing: NaN from some paths, 0 from others
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
    return _L1.resolve(backend, (pred, target))


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


# ---------------------------------------------------------------- backends
# forward(pred, target, step_weight, normalize_target, eps, for_backward) -> (loss, per_step, signs);
# backward(pred_or_signs, target, coef, D, dtype, normalize_target, eps) -> grad_pred. signs is empty except on
# cpu with for_backward: the bitmaps of pred - target_n, (B, T, N, 2, ceil(D / 8)) uint8, bit d % 8 of byte d // 8
# set where it is > 0 (first map), < 0 (second); then the backward gets them instead of pred, and target None.


def _no_signs(pred):
    return pred.new_empty((0,), dtype=torch.uint8)


def _compiled_forward(pred, target, step_weight, normalize_target, eps, for_backward):
    per_step = torch.ops.hope_kernels.l1_per_step(pred, target, normalize_target, eps)
    return (*_weighted(per_step, step_weight), _no_signs(pred))


def _compiled_backward(pred, target, coef, D, dtype, normalize_target, eps):
    return torch.ops.hope_kernels.l1_per_step_backward(pred, target, coef, normalize_target, eps)


def _cpu_forward(pred, target, step_weight, normalize_target, eps, for_backward):
    if not for_backward:
        return _compiled_forward(pred, target, step_weight, normalize_target, eps, for_backward)
    per_step, signs = torch.ops.hope_kernels.l1_per_step_signs(pred, target, normalize_target, eps)
    return (*_weighted(per_step, step_weight), signs)


def _cpu_backward(pred_or_signs, target, coef, D, dtype, normalize_target, eps):
    if target is None:
        return torch.ops.hope_kernels.l1_signs_backward(pred_or_signs, coef, D, dtype)
    return _compiled_backward(pred_or_signs, target, coef, D, dtype, normalize_target, eps)


def _triton_forward(pred, target, step_weight, normalize_target, eps, for_backward):
    from hope_kernels.ops.l1_loss.triton import l1_per_step_triton

    per_step = l1_per_step_triton(pred, target, normalize_target, eps)
    return (*_weighted(per_step, step_weight), _no_signs(pred))


def _triton_backward(pred, target, coef, D, dtype, normalize_target, eps):
    from hope_kernels.ops.l1_loss.triton import l1_per_step_backward_triton

    return l1_per_step_backward_triton(pred, target, coef, normalize_target, eps)


def _fake(pred, target, step_weight, normalize_target, eps, for_backward):
    acc = accum_dtype(pred.dtype)
    return pred.new_empty((), dtype=acc), pred.new_empty((pred.shape[1],), dtype=acc), _no_signs(pred)


def _cpu_fake(pred, target, step_weight, normalize_target, eps, for_backward):
    loss, per_step, signs = _fake(pred, target, step_weight, normalize_target, eps, for_backward)
    if for_backward:
        B, T, N, D = pred.shape
        signs = pred.new_empty((B, T, N, 2, (D + 7) // 8), dtype=torch.uint8)
    return loss, per_step, signs


def _fake_backward(pred_or_signs, target, coef, D, dtype, normalize_target, eps):
    if target is None:
        return pred_or_signs.new_empty((*pred_or_signs.shape[:3], D), dtype=dtype)
    return torch.empty_like(pred_or_signs)


def _setup_context(ctx, inputs, output):
    pred, target, step_weight, normalize_target, eps, _ = inputs
    signs = output[2]
    ctx.set_materialize_grads(False)
    ctx.shape, ctx.dtype, ctx.normalize_target, ctx.eps = pred.shape, pred.dtype, normalize_target, eps
    if signs.dim() == 5:  # the cpu forward's signs stand for pred and target
        ctx.save_for_backward(signs, None, step_weight)
    else:
        ctx.save_for_backward(pred, target, step_weight)


def _backward(ctx, backward_op, grad_loss, grad_per_step, _):
    pred_or_signs, target, step_weight = ctx.saved_tensors
    if grad_loss is None and grad_per_step is None:
        return None, None, None, None, None, None
    coef = _coef(grad_loss, grad_per_step, step_weight, ctx.shape).to(accum_dtype(ctx.dtype))
    grad_pred = backward_op(pred_or_signs, target, coef, ctx.shape[-1], ctx.dtype, ctx.normalize_target, ctx.eps)
    return grad_pred, None, None, None, None, None


_L1 = register(
    OpTable(
        name=_OP,
        label=_OP,
        schema="(Tensor pred, Tensor target, Tensor? step_weight, bool normalize_target, float eps, "
        "bool for_backward) -> (Tensor, Tensor, Tensor)",
        backward_schema="(Tensor pred_or_signs, Tensor? target, Tensor coef, SymInt D, ScalarType dtype, "
        "bool normalize_target, float eps) -> Tensor",
        fake=_fake,
        fake_backward=_fake_backward,
        setup_context=_setup_context,
        backward=_backward,
        saved_only=1,
        backends=(
            Backend("cuda", _compiled_forward, _compiled_backward, devices=("cuda",), priority=2),
            Backend("triton", _triton_forward, _triton_backward, devices=("cuda",), priority=1),
            Backend("cpu", _cpu_forward, _cpu_backward, devices=("cpu",), fake=_cpu_fake),
        ),
    )
)


def l1_rollout_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    step_weight: torch.Tensor | None = None,
    normalize_target: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
):
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
    return _L1(backend, pred, target.detach(), step_weight, normalize_target, float(eps), needs_backward(pred))
