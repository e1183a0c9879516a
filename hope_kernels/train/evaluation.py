"""Held-out evaluation of a trained predictor."""

from __future__ import annotations

import torch

from hope_kernels.train.data import _collate
from hope_kernels.train.losses import copy_last_loss, prediction_losses


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 16, device="cpu") -> dict:
    """Held-out teacher-forcing L1 of the model and of the copy-last baseline, averaged over clips."""
    model.eval()
    tot, base, n = 0.0, 0.0, 0
    for i in range(0, len(dataset), batch_size):
        z, a, s = _collate(dataset, range(i, min(i + batch_size, len(dataset))), device)
        b = z.shape[0]
        tot += prediction_losses(model, z, a, s, rollout_steps=0)["tf"].item() * b
        base += copy_last_loss(z).item() * b
        n += b
    model.train()
    return {"tf": tot / n, "copy_last": base / n}
