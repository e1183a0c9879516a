"""Training losses and schedules: teacher-forcing + rollout L1, the copy-last baseline, the rollout weight and
the warmup-stable-decay learning rate."""

from __future__ import annotations

import math

import torch

from hope_kernels.config import TrainConfig
from hope_kernels.ops import l1_rollout_loss


def prediction_losses(model, z, actions, states=None, rollout_steps: int = 2, rollout_score: str = "last") -> dict:
    """Teacher-forcing and rollout L1 (both through `l1_rollout_loss`, targets layer-normalised).

    tf: z_hat[:, t] vs z[:, t+1] for t < T-1 (the seed's teacher-forcing loss).
    rollout: from z[:, :1] with the true actions, `rollout_steps` autoregressive steps; "last" scores only
    the last prediction against z[:, rollout_steps] (the seed's rollout loss), "all" every step. The rollout
    runs first, so a HOPE model carrying memory rolls out from the state before this clip.
    """
    T = z.shape[1]
    if T < 2:
        raise ValueError(f"prediction losses need T >= 2 timesteps, got z {tuple(z.shape)}")
    out = {}
    steps = min(int(rollout_steps), T - 1)
    if steps > 0:
        r = model.rollout(z[:, :1], actions, steps, states)
        tgt = z[:, 1 : 1 + steps]
        if rollout_score == "last":
            r, tgt = r[:, -1:], tgt[:, -1:]
        out["rollout"] = l1_rollout_loss(r.float(), tgt.float())[0]
    else:
        out["rollout"] = z.new_zeros((), dtype=torch.float32)
    z_hat = model(z, actions, states)
    out["tf"] = l1_rollout_loss(z_hat[:, :-1].float(), z[:, 1:].float())[0]
    return out


def copy_last_loss(z) -> torch.Tensor:
    """Copy-last-latent baseline on the teacher-forcing loss: z_hat[:, t] = layer_norm(z[:, t])."""
    zn = torch.nn.functional.layer_norm(z.float(), z.shape[-1:])
    return l1_rollout_loss(zn[:, :-1], z[:, 1:].float())[0]


def rollout_weight(step: int, total: int, w0: float, w1: float, schedule: str = "linear") -> float:
    """w ramps from w0 (step 0) to w1 (last step)."""
    frac = min(max(step / max(total - 1, 1), 0.0), 1.0)
    if schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    elif schedule != "linear":
        raise ValueError(f"rollout_schedule must be 'linear' or 'cosine', got {schedule!r}")
    return w0 + (w1 - w0) * frac


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup over `warmup` steps, constant, linear decay to 0 over the last
    `decay_frac` of the steps."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    n_decay = int(round(cfg.decay_frac * cfg.steps))
    start = cfg.steps - n_decay
    if n_decay > 0 and step >= start:
        return cfg.lr * (cfg.steps - step) / (n_decay + 1)
    return cfg.lr
