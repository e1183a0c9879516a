"""Predictors (docs/design.md#predictors). `build_predictor(kind, preset, enc_dim=..., grid=...)` builds either one."""

from __future__ import annotations

import torch.nn as nn

from hope_kernels.config import PRESETS, PredictorConfig, predictor_config
from hope_kernels.models.ac_predictor import ACPredictor
from hope_kernels.models.hope_predictor import HOPEPredictor

__all__ = [
    "ACPredictor",
    "HOPEPredictor",
    "PRESETS",
    "PredictorConfig",
    "build_predictor",
    "predictor_from_config",
    "load_state_exactly",
]


def build_predictor(
    kind: str, preset: str = "tiny", *, enc_dim: int, grid, action_dim: int = 2, state_dim: int = 0, **overrides
) -> nn.Module:
    """kind "ac" | "hope"; grid (T, H, W); overrides: any PredictorConfig field (unknown names raise)."""
    cfg = predictor_config(
        kind, preset, enc_dim=enc_dim, grid=tuple(grid), action_dim=action_dim, state_dim=state_dim, **overrides
    )
    return predictor_from_config(cfg)


def predictor_from_config(cfg: PredictorConfig | dict) -> nn.Module:
    if isinstance(cfg, dict):
        cfg = PredictorConfig.from_dict(cfg)
    return (ACPredictor if cfg.kind == "ac" else HOPEPredictor)(cfg)


def load_state_exactly(model: nn.Module, weights: dict) -> None:
    """model.load_state_dict(weights) (strict, same shapes), or a ValueError of one line that counts the missing,
    unexpected and mis-shaped tensors and names the first of each (torch lists them all, one line each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shaped = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(missing)} missing (first {missing[0]!r})"] if missing else []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
    if shaped:
        k = shaped[0]
        parts.append(
            f"{len(shaped)} of another shape (first {k!r}: {tuple(weights[k].shape)} stored, "
            f"{tuple(own[k].shape)} for the config)"
        )
    if parts:
        raise ValueError("tensors " + "; ".join(parts))
    model.load_state_dict(weights)
