"""CMS update periods: the gradient accumulation shared by training (`cms_train_periods`, hope_kernels.train) and
the `hope` / `hope+ttt` adaptation strategies (hope_kernels.adapt)."""

from __future__ import annotations

import torch
import torch.nn as nn


class CMSPeriods:
    """Level l with period p > 1 sums the gradients it is given and gets their mean as its gradient on every p-th
    call; on the other calls its gradients are set to None, so an optimizer leaves those parameters and their
    moments untouched. A period-1 level keeps its gradient as it is.

    levels: [(period, [parameters of model])], e.g. `model.cms_levels()`. `acc`: {parameter name: the sum of its
    gradients since its level's last update} (what a checkpoint stores); its tensors are never changed in place,
    so `dict(acc)` is a snapshot.
    """

    def __init__(self, model: nn.Module, levels):
        names = {id(p): n for n, p in model.named_parameters()}
        self.levels = [(int(period), [(names[id(p)], p) for p in ps]) for period, ps in levels]
        self.acc: dict[str, torch.Tensor] = {}

    def apply(self, count: int) -> list[int]:
        """Call with each parameter's .grad holding this call's gradient (None: no gradient, skipped) and `count`,
        the 1-based number of this call (training: the global step + 1, so a resumed run updates on the same
        steps). A level is due when count % period == 0. -> the indices of the due levels."""
        due_levels = []
        for li, (period, params) in enumerate(self.levels):
            due = count % period == 0
            if due:
                due_levels.append(li)
            if period == 1:
                continue
            for name, p in params:
                if p.grad is None:
                    continue
                total = p.grad if name not in self.acc else self.acc.pop(name) + p.grad
                if due:
                    p.grad = total / period
                else:  # p.grad is dropped here, so the stored tensor is not aliased by later steps
                    self.acc[name] = total.detach()
                    p.grad = None
        return due_levels
