"""What both predictors share: input/condition embedding, token layout, output head, rollout, init.

Inputs: z (B, T, N, D) encoder latents, actions (B, T, A), states (B, T, S) or None. Output z_hat (B, T, N, D):
z_hat[:, t] predicts layer_norm(z[:, t+1]) from z[:, :t+1], actions[:, :t+1], states[:, :t+1].
The input latents are layer-normalised over D (no affine) like the targets, so predictions fed back during a
rollout live in the same space as the encoder latents they replace.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hope_kernels.config import PredictorConfig
from hope_kernels.models.rope import drop_cond_tokens, interleave_tokens, token_positions
from hope_kernels.ops import rope_attention


def trunc_normal_(w: torch.Tensor, std: float, a: float, b: float) -> torch.Tensor:
    """w ~ N(0, std^2) truncated to [a, b], in place, from the global generator (seeded by torch.manual_seed).

    Inverse-CDF sampling: u uniform on [erf(a / (std sqrt 2)), erf(b / (std sqrt 2))], w = std sqrt(2) erfinv(u),
    then clamped to [a, b] against rounding at the ends. One random number and four passes per element.
    torch.nn.init.trunc_normal_ (torch 2.13) draws the whole tensor again until no element is out of range (about
    six rounds for a (4096, 1024) weight at +-2 std): 41 of the 46 s of a loaded vjepa2-ac build. Bounds past
    4 std (where float32 u resolves the tail poorly) and half-precision tensors go to torch's sampler."""
    if not _inverse_cdf_ok(w.dtype, std, a, b):
        return nn.init.trunc_normal_(w, std=std, a=a, b=b)
    r2 = math.sqrt(2.0)
    with torch.no_grad():
        return w.uniform_(math.erf(a / std / r2), math.erf(b / std / r2)).erfinv_().mul_(std * r2).clamp_(a, b)


def _inverse_cdf_ok(dtype: torch.dtype, std: float, a: float, b: float) -> bool:
    return dtype in (torch.float32, torch.float64) and -4.0 <= a / std < b / std <= 4.0


def trunc_normal_all_(ws: list[torch.Tensor], std: float, a: float, b: float, batch: int = 1 << 23) -> None:
    """trunc_normal_(w, std, a, b) for every w of ws, drawn up to `batch` elements at a time into one buffer and
    copied out. The serial random draw then writes memory already touched (the buffer), each weight's first write
    (its page faults) is a copy that runs on every thread, and a weight costs one parallel op instead of three:
    with a core busy elsewhere each parallel op waited ~17 ms for it, 732 of them in a HOPE vjepa2-ac build."""
    groups: dict = {}
    for w in ws:
        if w.is_meta:
            continue
        if w.numel() >= batch or not _inverse_cdf_ok(w.dtype, std, a, b):
            trunc_normal_(w, std, a, b)
        else:
            groups.setdefault((w.dtype, w.device), []).append(w)
    with torch.no_grad():
        for (dtype, device), group in groups.items():
            buf = torch.empty(min(batch, sum(w.numel() for w in group)), dtype=dtype, device=device)
            start = 0
            while start < len(group):
                n, end = 0, start
                while end < len(group) and n + group[end].numel() <= batch:
                    n += group[end].numel()
                    end += 1
                u, o = trunc_normal_(buf[:n], std, a, b), 0
                for w in group[start:end]:
                    w.copy_(u[o : o + w.numel()].view(w.shape))
                    o += w.numel()
                start = end


class _InitLater:
    """Mixin for the predictors' nn.Linear / nn.Conv3d: no default Kaiming-uniform draw while the module is built.
    PredictorBase._init_weights sets the parameters of every one, and the draws it replaced took 5-8 s of a
    loaded vjepa2-ac build. A later reset_parameters() call is torch's."""

    def __init__(self, *args, **kwargs):
        self._building = True
        super().__init__(*args, **kwargs)
        del self._building

    def reset_parameters(self):
        if not getattr(self, "_building", False):
            super().reset_parameters()


class Linear(_InitLater, nn.Linear):
    pass


class Conv3d(_InitLater, nn.Conv3d):
    pass


class RoPEAttention(nn.Module):
    """Multi-head attention through the `rope_attention` op (3D RoPE, block-causal over timesteps)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True, window=None, rope_compat=None):
        super().__init__()
        self.heads, self.window, self.rope_compat = heads, window, rope_compat
        self.qkv = Linear(width, 3 * width, bias=qkv_bias)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        # unbind before the head transpose: their gradients are then stacked straight into (B, L, 3, H, d)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).unbind(2))
        o = rope_attention(q, k, v, pos, window=self.window, rope_compat=self.rope_compat)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear(width, hidden), nn.GELU(), Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@contextlib.contextmanager
def compiled_forward(model: nn.Module, enabled: bool = True):
    """Inside the block, model.forward runs under torch.compile: an instance attribute, so model(...) and a
    rollout's self.forward(...) both run compiled. The plain forward is back afterwards, whatever happens.
    enabled=False: a no-op (callers pass their `compile` setting)."""
    if not enabled:
        yield model
        return
    model.forward = torch.compile(model.forward)
    try:
        yield model
    finally:
        del model.forward


class PredictorBase(nn.Module):
    """Subclasses set `self.blocks` (nn.ModuleList) whose blocks take (x, pos, state, T) -> (x, new_state)."""

    kind = "base"

    def __init__(self, config: PredictorConfig):
        super().__init__()
        c = self.config = config
        self.n_cond = 1 + (c.state_dim > 0)
        self.embed = Linear(c.enc_dim, c.width)
        k = c.stem_kernel
        # each patch token also sees its k x k neighbourhood now and one timestep back (causal): motion is local,
        # and block-causal attention alone learns such sharp local patterns slowly (docs/training.md)
        self.stem = Conv3d(2 * c.enc_dim, c.width, (1, k, k), padding=(0, k // 2, k // 2), bias=False) if k else None
        self.action_encoder = Linear(c.action_dim, c.width)
        self.state_encoder = Linear(c.state_dim, c.width) if c.state_dim > 0 else None
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.proj = Linear(c.width, c.enc_dim)

    # -- carried memory: none here; HOPE overrides both (the adaptation engine and checkpoints use them) --
    def memory_state(self) -> dict[str, torch.Tensor]:
        """The memory carried between forwards as flat named tensors ({}: none)."""
        return {}

    def load_memory_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of memory_state; a model without memory accepts only {}."""
        if tensors:
            raise ValueError(f"a {self.kind} predictor carries no memory, got memory tensors {sorted(tensors)}")

    # -- init (docs/design.md#predictors: truncated normal std 0.02, residual projections / sqrt(2 * layer)) --
    def _init_weights(self):
        std = self.config.init_std
        trunc_normal_all_([m.weight for m in self.modules() if isinstance(m, nn.Linear)], std, -2 * std, 2 * std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv3d):  # the stem: the embedding's output scale
                s = std / math.sqrt(m.weight[0, 0].numel())
                trunc_normal_(m.weight, s, -2 * s, 2 * s)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                for p in blk.residual_projections():
                    p.div_(math.sqrt(2.0 * (i + 1)))
            if self.config.predict_delta:
                # the delta head starts at zero: an untrained predictor is exactly copy-last, and training only
                # moves it where the next latent differs (a random head costs ~10x the copy-last error at init)
                self.proj.weight.zero_()
                self.proj.bias.zero_()

    def layernorm_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]

    # -- inputs --
    def _check_inputs(self, z, actions, states):
        c = self.config
        N = c.grid[1] * c.grid[2]
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[2] != N or z.shape[3] != c.enc_dim:
            raise ValueError(
                f"z must be (B, T, N, D) = (B, T, {N}, {c.enc_dim}), got "
                f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}"
            )
        B, T = z.shape[:2]
        if not isinstance(actions, torch.Tensor) or actions.shape != (B, T, c.action_dim):
            raise ValueError(
                f"actions must be (B, T, A) = ({B}, {T}, {c.action_dim}), got "
                f"{tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__}"
            )
        if c.state_dim > 0:
            if states is None or states.shape != (B, T, c.state_dim):
                raise ValueError(
                    f"states must be (B, T, S) = ({B}, {T}, {c.state_dim}), got "
                    f"{None if states is None else tuple(states.shape)}"
                )
        elif states is not None and states.numel() > 0:
            raise ValueError(f"this predictor has state_dim=0 but states {tuple(states.shape)} were given")

    def _tokens(self, zn, actions, states):
        """zn: the layer-normalised latents (B, T, N, D)."""
        x = self.embed(zn)
        if self.stem is not None:
            B, T, N, D = zn.shape
            _, H, W = self.config.grid
            # input: the latent and its change since the previous timestep (zero at t = 0), explicitly: a
            # difference that the model would otherwise have to learn is what carries the motion
            dz = torch.cat([torch.zeros_like(zn[:, :1]), zn[:, 1:] - zn[:, :-1]], dim=1)
            g = torch.cat([zn, dz], dim=-1).transpose(2, 3).reshape(B, T, 2 * D, H, W).transpose(1, 2)
            x = x + self.stem(g.to(x.dtype)).permute(0, 2, 3, 4, 1).reshape(B, T, N, -1)
        x_dtype = x.dtype
        cond = [self.action_encoder(actions.to(x_dtype))]
        if self.state_encoder is not None:
            cond.append(self.state_encoder(states.to(x_dtype)))
        return interleave_tokens(cond, x)

    def _positions(self, T: int, device: torch.device) -> torch.Tensor:
        """token_positions for T timesteps on `device`, built once per (T, device): the same tensor every
        forward, so rope_attention's order check (a host sync on a GPU) reads it once, not once per call."""
        cache = self.__dict__.setdefault("_pos_cache", {})
        key = (T, str(device))
        if key not in cache:
            _, H, W = self.config.grid
            cache[key] = token_positions(T, H, W, self.n_cond, device=device)
        return cache[key]

    def _predict(self, z, actions, states, memory):
        """-> (z_hat (B, T, N, D), per-block end states)."""
        self._check_inputs(z, actions, states)
        T = z.shape[1]
        zn = F.layer_norm(z, z.shape[-1:])
        x = self._tokens(zn, actions, states)
        pos = self._positions(T, z.device)
        new = []
        for i, blk in enumerate(self.blocks):
            x, st = blk(x, pos, None if memory is None else memory[i], T)
            new.append(st)
        y = self.proj(self.norm(drop_cond_tokens(x, T, self.n_cond)))
        if self.config.predict_delta:
            y = y + zn.to(y.dtype)
        return y, new

    def forward(self, z, actions, states=None):
        return self._predict(z, actions, states, None)[0]

    def rollout(self, z_context, actions, steps: int, states=None):
        """Autoregressive rollout from z_context (B, Tc, N, D) with the true actions (B, >= Tc+steps-1, A)
        (and states, same length, if state_dim > 0). Predictions are fed back without detach.
        Returns (B, steps, N, D): element i predicts z[:, Tc + i]."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        Tc = z_context.shape[1]
        need = Tc + steps - 1
        if actions.dim() != 3 or actions.shape[1] < need:
            raise ValueError(
                f"rollout of {steps} steps from {Tc} context steps needs actions (B, >= {need}, A), "
                f"got {tuple(actions.shape)}"
            )
        if states is not None and states.shape[1] < need:
            raise ValueError(f"rollout needs states (B, >= {need}, S), got {tuple(states.shape)}")
        seq, preds = z_context, []
        for i in range(steps):
            T = Tc + i
            s = None if states is None else states[:, :T]
            zh = self._rollout_step(seq, actions[:, :T], s)[:, -1]
            preds.append(zh)
            seq = torch.cat([seq, zh[:, None].to(seq.dtype)], dim=1)
        return torch.stack(preds, dim=1)

    def _rollout_step(self, z, actions, states):
        return self.forward(z, actions, states)
