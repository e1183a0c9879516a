"""Predictors (DESIGN 5). `build_predictor(kind, preset, enc_dim=..., grid=...)` builds either one."""
from __future__ import annotations

import torch.nn as nn

from hope_kernels.config import PRESETS, PredictorConfig, predictor_config
from hope_kernels.models.ac_predictor import ACPredictor
from hope_kernels.models.hope_predictor import HOPEPredictor

__all__ = ["ACPredictor", "HOPEPredictor", "PRESETS", "PredictorConfig", "build_predictor", "predictor_from_config"]


def build_predictor(kind: str, preset: str = "tiny", *, enc_dim: int, grid, action_dim: int = 2,
                    state_dim: int = 0, **overrides) -> nn.Module:
    """kind "ac" | "hope"; grid (T, H, W); overrides: any PredictorConfig field (unknown names raise)."""
    cfg = predictor_config(kind, preset, enc_dim=enc_dim, grid=tuple(grid), action_dim=action_dim,
                           state_dim=state_dim, **overrides)
    return predictor_from_config(cfg)


def predictor_from_config(cfg: PredictorConfig | dict) -> nn.Module:
    if isinstance(cfg, dict):
        cfg = PredictorConfig.from_dict(cfg)
    return (ACPredictor if cfg.kind == "ac" else HOPEPredictor)(cfg)
