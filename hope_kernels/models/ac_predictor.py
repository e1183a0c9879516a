"""V-JEPA 2-AC predictor (docs/design.md#ac-predictor): pre-norm ViT blocks over `[a_t, (s_t), N patches]` tokens
with 3D-RoPE block-causal attention. `load_official_state_dict` maps the official checkpoint key layout."""

from __future__ import annotations

import torch.nn as nn

from hope_kernels.config import PredictorConfig
from hope_kernels.models.base import MLP, PredictorBase, RoPEAttention


class ACBlock(nn.Module):
    def __init__(self, c: PredictorConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.attn = RoPEAttention(c.width, c.heads, c.qkv_bias, c.window, c.rope_compat)
        self.norm2 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.mlp = MLP(c.width, int(c.width * c.mlp_ratio))

    def residual_projections(self):
        return [self.attn.proj.weight, self.mlp.fc2.weight]

    def forward(self, x, pos, state=None, T=None):
        x = x + self.attn(self.norm1(x), pos)
        return x + self.mlp(self.norm2(x)), None


class ACPredictor(PredictorBase):
    """model(z (B, T, N, D), actions (B, T, A), states=None) -> z_hat (B, T, N, D)."""

    kind = "ac"

    def __init__(self, config: PredictorConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(ACBlock(config) for _ in range(config.depth))
        self._init_weights()

    def load_official_state_dict(self, sd: dict, strict: bool = True):
        """Load a state dict in the official V-JEPA 2-AC predictor layout (see `official_to_local`)."""
        if self.config.predict_delta or self.config.stem_kernel:
            raise ValueError(
                "the official V-JEPA 2-AC predictor has no input stem and outputs absolute latents: "
                "build this predictor with predict_delta=False, stem_kernel=0 to load its weights"
            )
        if self.config.rope_compat != "vjepa2":  # the weights would load, and attend with another rotation
            raise ValueError(
                "the official V-JEPA 2-AC weights were trained with its own RoPE formula: build this "
                "predictor with rope_compat='vjepa2' to load them"
            )
        mapped = official_to_local(sd)
        own = self.state_dict()
        bad = [
            f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
            for k, v in mapped.items()
            if k in own and own[k].shape != v.shape
        ]
        if bad:
            raise ValueError("official checkpoint shapes do not match this config: " + "; ".join(bad[:5]))
        unexpected = sorted(set(mapped) - set(own))
        if unexpected and strict:
            raise ValueError(f"official checkpoint has keys this predictor lacks: {unexpected[:8]}")
        missing = sorted(set(own) - set(mapped))
        if missing and strict:
            raise ValueError(f"official checkpoint lacks keys: {missing[:8]}")
        return self.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=strict)


# Official V-JEPA 2-AC predictor names (after stripping "module." / "backbone." prefixes) -> ours.
# Inside the blocks the names agree: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2.
OFFICIAL_PREFIXES = {
    "predictor_embed.": "embed.",
    "action_encoder.": "action_encoder.",
    "state_encoder.": "state_encoder.",
    "predictor_blocks.": "blocks.",
    "predictor_norm.": "norm.",
    "predictor_proj.": "proj.",
}


# The official predictor always builds `extrinsics_encoder` (camera extrinsics, unused here): dropped.
OFFICIAL_IGNORED = ("extrinsics_encoder.",)


def official_to_local(sd: dict) -> dict:
    out = {}
    for key, val in sd.items():
        k = key
        for strip in ("module.", "backbone.", "predictor."):
            while k.startswith(strip) and not any(k.startswith(p) for p in OFFICIAL_PREFIXES):
                k = k[len(strip) :]
        if k.startswith(OFFICIAL_IGNORED):
            continue
        for src, dst in OFFICIAL_PREFIXES.items():
            if k.startswith(src):
                out[dst + k[len(src) :]] = val
                break
        else:
            out[k] = val  # unknown keys are reported by the caller
    return out
