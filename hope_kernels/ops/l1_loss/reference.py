"""Eager reference of the fused teacher-forcing / rollout L1 loss (docs/design.md#l1-loss). Ground truth and baseline.

    target_n     = layer_norm(target) over D, no affine          (when normalize_target)
    per_step[t]  = mean_{b, n, d} |pred[b, t, n, d] - target_n[b, t, n, d]|
    loss         = sum_t w_t * per_step[t] / sum_t w_t

pred, target: (B, T, N, D); step_weight w: (T,) or None (ones). Reductions run in float32 (float64 for float64
inputs); loss and per_step come back in that dtype. The target gets no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hope_kernels.ops.checks import accum_dtype


def l1_rollout_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    step_weight: torch.Tensor | None = None,
    normalize_target: bool = True,
    eps: float = 1e-6,
):
    """(B, T, N, D) x2 -> (loss (), per_step (T,))."""
    acc = accum_dtype(pred.dtype)
    target = target.detach().to(acc)
    if normalize_target:
        target = F.layer_norm(target, target.shape[-1:], eps=eps)
    per_step = (pred.to(acc) - target).abs().mean(dim=(0, 2, 3))
    # the weights get no gradient, as on every other backend (docs/design.md#l1-loss: the gradient reaches pred only)
    w = torch.ones_like(per_step) if step_weight is None else step_weight.detach().to(per_step)
    return (w * per_step).sum() / w.sum(), per_step
