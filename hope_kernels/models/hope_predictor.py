"""HOPE predictor (docs/design.md#hope-predictor, docs/hope.md): per block 3D-RoPE block-causal attention, a
self-referential memory updated in context (`dgd_memory`, or `titans_memory` as an ablation) and a continuum
memory system (CMS: residual MLP levels with update periods). Same inputs, outputs and losses as the AC predictor.

Memory layout per block and head (dh = width / mem_heads): five (dh, dh) matrix memories
[M_k, M_v, M_eta, M_alpha, M_mem] side by side along the value axis, state (B, H, dh, 5 dh). All five are read
with the same q and written with the same k and gates, and the update rule acts on each value column on its
own, so one op call with 5 dh value columns updates all of them (`SelfModifyingMemory._update`). Each
timestep's tokens form one chunk: k, v, eta, alpha are read from the memories' chunk-start state (HOPE's
chunk-wise form), every memory is then updated on the chunk with its self-generated target v_hat = M(v).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hope_kernels.config import PredictorConfig
from hope_kernels.models.base import MLP, Linear, PredictorBase, RoPEAttention
from hope_kernels.ops import dgd_memory, titans_memory

_N_MEM = 5  # k, v, eta, alpha, mem


def _stack(t: torch.Tensor, m: int) -> torch.Tensor:
    """(B, H, a, m*b) -> (B, m*H, a, b): the m column blocks as heads, memory-major."""
    B, H, a, mb = t.shape
    return t.reshape(B, H, a, m, mb // m).permute(0, 3, 1, 2, 4).reshape(B, m * H, a, mb // m)


def _each(fn, state):
    """fn on a memory state: one tensor (dgd) or a tuple of them (titans: W, S)."""
    return tuple(fn(t) for t in state) if isinstance(state, tuple) else fn(state)


def _unstack(t: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of _stack: (B, m*H, a, b) -> (B, H, a, m*b)."""
    B, mH, a, b = t.shape
    return t.reshape(B, m, mH // m, a, b).permute(0, 2, 3, 1, 4).reshape(B, mH // m, a, m * b)


class SelfModifyingMemory(nn.Module):
    """x (B, L, C) -> (y (B, L, C), end state). State: dgd -> M (B, H, dh, m*dh) (the m memories side by side,
    m = 5 self-referential, 1 static); titans -> (W, S) in the same layout."""

    stack_memories = None  # None: stacked along heads on CUDA, wide on CPU (see _update); True / False: forced

    def __init__(self, c: PredictorConfig):
        super().__init__()
        self.H = c.mem_heads or c.heads
        self.dh = c.width // self.H
        self.rule, self.self_ref, self.eta_max = c.memory_rule, c.self_referential, c.eta_max
        H, dh = self.H, self.dh
        self.q = Linear(c.width, c.width, bias=False)  # static query projection
        self.out = Linear(c.width, c.width)
        if self.self_ref:
            # learned initial states (outer loop) of M_k, M_v, M_eta, M_alpha, M_mem: random maps. (M_mem = 0
            # would be a fixed point: its self-generated target v M_mem is then 0 too.)
            self.M0 = nn.Parameter(torch.randn(_N_MEM, H, dh, dh).mul_(dh**-0.5))
            self.gate_read = nn.Parameter(torch.zeros(2, H, dh))  # static readout of the eta/alpha memories
        else:
            self.kv = Linear(c.width, 2 * c.width, bias=False)
            self.gates = Linear(c.width, 2 * H)
            self.M0 = nn.Parameter(torch.randn(1, H, dh, dh).mul_(dh**-0.5))
        # gate biases: eta_t starts near 0.12 * eta_max / P, the retention near 0.99 per timestep (P tokens)
        self.gate_bias = nn.Parameter(torch.tensor([-2.0, 4.6]))
        if self.rule == "titans":
            self.momentum_logit = nn.Parameter(torch.zeros(H))  # Titans momentum eta (ablation)

    def _gates(self, e_logit, a_logit, chunk: int):
        # the chunk's tokens share one gradient step taken at the chunk-start state, so their updates add up
        # coherently: the per-token rate is eta_max / chunk, which keeps the summed step of a timestep at most
        # eta_max whatever the grid (with eta_max per token, 65 tokens blew the memory up to 1e34 in 3 steps)
        eta = self.eta_max / chunk * torch.sigmoid(e_logit + self.gate_bias[0])
        # retention is per timestep too: the gate gives a timestep's retention and each of its `chunk` tokens
        # keeps its chunk-th root. A per-token 0.99 kept 0.99^65 = 0.48 of the memory per timestep of the 8x8
        # grid and 0.003 per clip, so the memory had decayed to its bias after a timestep or two and carrying it
        # across clips changed nothing (docs/hope.md). float32 sigmoid underflows to exactly 0 below ~-104 (a
        # carried memory can drive the logit there); the memory ops need alpha in (0, 1]
        alpha = torch.sigmoid(a_logit + self.gate_bias[1]).clamp_min(1e-6) ** (1.0 / chunk)
        return eta, alpha

    def initial_state(self, B: int):
        m, H, dh = self.M0.shape[0], self.H, self.dh
        W = self.M0.permute(1, 2, 0, 3).reshape(1, H, dh, m * dh).expand(B, -1, -1, -1)
        return (W, torch.zeros_like(W)) if self.rule == "titans" else W

    def _update(self, q, k, v, alpha, eta, chunk, state):
        """One op call over all m memories: q, k (B, H, L, dh), targets v (B, H, L, m*dh), gates (B, H, L).

        CPU tensors go in as one memory with m*dh value columns (the C++ dgd kernel runs the wide rows of HOPE's
        shape 2.1x faster than five stacked (dh, dh) memories, fwd+bwd); CUDA tensors stacked along heads as
        (B, m*H, dh, dh) memories, the tiles the Triton kernels hold in registers. Both give the same result."""
        m = v.shape[-1] // self.dh
        stack = (q.is_cuda if self.stack_memories is None else self.stack_memories) and m > 1
        if stack:
            rep = lambda t: torch.cat([t] * m, dim=1)  # noqa: E731
            q, k, alpha, eta, v = rep(q), rep(k), rep(alpha), rep(eta), _stack(v, m)
            state = _each(lambda t: _stack(t, m), state)
        if self.rule == "dgd":
            o, state = dgd_memory(q, k, v, alpha, eta, chunk_size=chunk, initial_state=state, output_final_state=True)
        else:
            mom = torch.sigmoid(self.momentum_logit).repeat(q.shape[1] // self.H)[None, :, None].expand_as(eta)
            # Titans: theta = eta_t (inner lr), forget = 1 - alpha_t (retention), momentum learned per head
            o, state = titans_memory(
                q, k, v, 1 - alpha, mom, eta, chunk_size=chunk, initial_state=state, output_final_state=True
            )
        if stack:
            o = _unstack(o, m)
            state = _each(lambda t: _unstack(t, m), state)
        return o, state

    def forward(self, x, T: int, state=None):
        B, L, C = x.shape
        H, dh, P = self.H, self.dh, L // T
        heads = lambda t: t.reshape(B, L, H, dh).transpose(1, 2)  # noqa: E731  (B, H, L, dh)
        q = F.normalize(heads(self.q(x)), dim=-1)
        state = self.initial_state(B) if state is None else state
        if not self.self_ref:
            k_, v_ = self.kv(x).chunk(2, dim=-1)
            e_l, a_l = self.gates(x).reshape(B, L, 2, H).permute(2, 0, 3, 1)
            eta, alpha = self._gates(e_l, a_l, P)
            o, state = self._update(q, F.normalize(heads(k_), dim=-1), heads(v_), alpha, eta, P, state)
        else:
            xh, outs = heads(x), []
            for t in range(T):  # one chunk per timestep
                sl = slice(t * P, (t + 1) * P)
                W = state[0] if self.rule == "titans" else state  # (B, H, dh, 5 dh): [Mk|Mv|Meta|Malpha|Mmem]
                xc = xh[:, :, sl]
                k, v, e, a = (xc @ W[..., : 4 * dh]).split(dh, dim=-1)  # reads of M_k, M_v, M_eta, M_alpha
                eta, alpha = self._gates(
                    (e * self.gate_read[0, :, None]).sum(-1), (a * self.gate_read[1, :, None]).sum(-1), P
                )
                # self-generated targets v M_i, (B, H, P, 5 dh), each memory's target scaled to unit length: raw,
                # v = x M_v makes the target v M_i grow with |M_v| |M_i| and the written memory with it, so a
                # memory carried across clips blew up (untrained tiny HOPE: norm 20 -> 400 -> NaN within 4 clips).
                # With unit targets the update is a contraction plus a write of size <= eta (docs/hope.md)
                v_hat = F.normalize((v @ W).unflatten(-1, (-1, dh)), dim=-1).flatten(-2)
                o, state = self._update(q[:, :, sl], F.normalize(k, dim=-1), v_hat, alpha, eta, P, state)
                outs.append(o[..., 4 * dh :])  # the output memory's read
            o = torch.cat(outs, dim=2)
        return self.out(o.transpose(1, 2).reshape(B, L, C)), state


class CMSLevel(nn.Module):
    def __init__(self, c: PredictorConfig, hidden: int, period: int):
        super().__init__()
        self.period = period
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.mlp = MLP(c.width, hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class HOPEBlock(nn.Module):
    def __init__(self, c: PredictorConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.attn = RoPEAttention(c.width, c.heads, c.qkv_bias, c.window, c.rope_compat)
        self.norm2 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.memory = SelfModifyingMemory(c)
        hidden = int(c.width * c.cms_ratio)
        if c.cms:
            self.cms = nn.ModuleList(CMSLevel(c, hidden, p) for p in c.cms_periods)
        else:  # CMS off: one plain MLP level of the same total width, updated like any other weight
            self.cms = nn.ModuleList([CMSLevel(c, hidden * len(c.cms_periods), 1)])

    def residual_projections(self):
        return [self.attn.proj.weight, self.memory.out.weight] + [lvl.mlp.fc2.weight for lvl in self.cms]

    def forward(self, x, pos, state=None, T=None):
        x = x + self.attn(self.norm1(x), pos)
        y, state = self.memory(self.norm2(x), T, state)
        x = x + y
        for lvl in self.cms:
            x = lvl(x)
        return x, state


class HOPEPredictor(PredictorBase):
    """model(z (B, T, N, D), actions (B, T, A), states=None) -> z_hat (B, T, N, D).

    carry_memory=True: each forward starts from the stored memory state (else the learned initial state) and
    stores its end state, detached unless `memory_grad` is True (training through a sequence of clips, see
    hope_kernels.train: the caller then detaches with `detach_memory()` at the truncation point);
    `reset_memory()` forgets it. Rollouts read but never store it."""

    kind = "hope"

    def __init__(self, config: PredictorConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(HOPEBlock(config) for _ in range(config.depth))
        self._init_weights()
        self.carry_memory = False
        self.memory_grad = False
        self._memory = None

    def reset_memory(self):
        self._memory = None

    def detach_memory(self):
        """Cut the graph behind the stored memory (truncated backprop through clips); the values stay."""
        if self._memory is not None:
            self._memory = [_each(torch.Tensor.detach, s) for s in self._memory]

    def memory_state(self) -> dict[str, torch.Tensor]:
        """The stored memory as flat named tensors ({} when none is stored): for checkpoints and for the
        adaptation engine's snapshots."""
        out = {}
        for i, s in enumerate(self._memory or []):
            for j, t in enumerate(s if isinstance(s, tuple) else (s,)):
                out[f"{i}.{j}"] = t.detach()
        return out

    def load_memory_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of memory_state ({} resets the memory)."""
        if not tensors:
            self._memory = None
            return
        mem = []
        for i in range(len(self.blocks)):
            parts = [tensors[f"{i}.{j}"] for j in range(2) if f"{i}.{j}" in tensors]
            if not parts:
                raise ValueError(f"stored memory has no tensors for block {i} (keys {sorted(tensors)})")
            mem.append(tuple(parts) if self.config.memory_rule == "titans" else parts[0])
        self._memory = mem

    def _stored(self, B: int):
        if not self.carry_memory or self._memory is None:
            return None

        def fit(t):
            if t.shape[0] == B:
                return t
            if t.shape[0] == 1:
                return t.expand(B, *t.shape[1:])
            raise ValueError(
                f"carried memory has batch {t.shape[0]} but the input has batch {B}; call reset_memory() first"
            )

        return [_each(fit, s) for s in self._memory]

    def forward(self, z, actions, states=None):
        y, new = self._predict(z, actions, states, self._stored(z.shape[0]))
        if self.carry_memory:
            self._memory = new if self.memory_grad else [_each(torch.Tensor.detach, s) for s in new]
        return y

    def _rollout_step(self, z, actions, states):
        return self._predict(z, actions, states, self._stored(z.shape[0]))[0]

    def cms_levels(self) -> list[tuple[int, list[nn.Parameter]]]:
        """[(update period, params of that level in every block)], fastest first; [] when CMS is off."""
        if not self.config.cms:
            return []
        return [
            (p, [q for blk in self.blocks for q in blk.cms[i].parameters()])
            for i, p in enumerate(self.config.cms_periods)
        ]
