"""Tiny stand-ins with the predictor / data / training interfaces the A-B-A engine codes against (used only by
tests/app/test_adapt.py, test_aba*.py, test_report.py; the real pieces live in hope_kernels.models/data/train).

TinyPredictor: model(z (B, T, N, D), actions (B, T, A), states=None) -> z_hat (B, T, N, D), z_hat[:, t]
predicts z[:, t+1]; causal over time (a per-timestep MLP plus a running mean of past timesteps).
TinyHOPE adds a carried memory vector (carry_memory / reset_memory: forwards store the end state, rollouts read
it only) and two CMS levels with periods (1, 2) (cms_levels()).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from hope_kernels.ops import l1_rollout_loss


class _Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.norm = nn.LayerNorm(w)
        self.fc = nn.Linear(w, w)

    def forward(self, x):
        return x + self.fc(torch.tanh(self.norm(x)))


class TinyPredictor(nn.Module):
    kind = "ac"

    def __init__(self, D=8, A=2, width=16, depth=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(D, width)
        self.act = nn.Linear(A, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, D)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)

    def layernorm_parameters(self):
        return [p for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]

    def _extra(self, x, store):
        return x

    def forward(self, z, actions, states=None, store=True):
        x = self.inp(z) + self.act(actions)[:, :, None]
        # causal mixing over time: running mean of the past timesteps
        T = z.shape[1]
        x = x + torch.cumsum(x, dim=1) / torch.arange(1, T + 1, dtype=x.dtype).view(1, T, 1, 1)
        x = self._extra(x, store)
        for b in self.blocks:
            x = b(x)
        return self.out(self.norm(x))

    def rollout(self, z_context, actions, steps, states=None):
        cur = z_context
        outs = []
        for _ in range(steps):
            t = cur.shape[1]
            nxt = self.forward(cur, actions[:, :t], store=False)[:, -1:]
            outs.append(nxt)
            cur = torch.cat([cur, nxt], dim=1)
        return torch.cat(outs, dim=1)


class _CMSLevel(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc = nn.Linear(w, w)

    def forward(self, x):
        return x + 0.5 * torch.tanh(self.fc(x))


class TinyHOPE(TinyPredictor):
    kind = "hope"

    def __init__(self, D=8, A=2, width=16, depth=2, seed=0, cms=True):
        super().__init__(D, A, width, depth, seed)
        self.mem_init = nn.Parameter(torch.zeros(width))
        self.cms = nn.ModuleList([_CMSLevel(width), _CMSLevel(width)]) if cms else nn.ModuleList()
        self.carry_memory = False
        self._memory = None

    def reset_memory(self):
        self._memory = None

    def memory_state(self):
        return {} if self._memory is None else {"m": self._memory}

    def load_memory_state(self, tensors):
        self._memory = tensors.get("m")

    def cms_levels(self):
        return [(p, list(lvl.parameters())) for p, lvl in zip((1, 2), self.cms)]

    def _extra(self, x, store):
        m = self._memory if (self.carry_memory and self._memory is not None) else self.mem_init
        x = x + m
        if store and self.carry_memory:
            self._memory = (0.5 * m + 0.5 * x.mean(dim=(0, 1, 2))).detach()
        for lvl in self.cms:
            x = lvl(x)
        return x


def make_clip(phase, index, T=5, N=4, D=8, A=2, shift=1.0, seed=0):
    """Synthetic clip: latents follow z_{t+1} = z_t + shift * v (phase-dependent drift) with an impulse."""
    g = torch.Generator().manual_seed(1000 * seed + index)
    z0 = torch.randn(N, D, generator=g)
    v = torch.randn(N, D, generator=g) * 0.3
    z = torch.stack([z0 + shift * t * v for t in range(T)])
    a = torch.zeros(T, A)
    a[1] = torch.randn(A, generator=g)
    return {"latents": z, "actions": a, "phase": phase, "split": "stream", "index": index}


def make_stream(n_per_phase=4, phases=("A1", "B", "A2"), seed=0, heldout=2, **kw):
    shifts = {"A1": 1.0, "B": -2.0, "A2": 1.0}
    clips, idx = [], 0
    for p in phases:
        for _ in range(n_per_phase):
            clips.append(make_clip(p, idx, shift=shifts.get(p, 1.0), seed=seed, **kw))
            idx += 1
    held = {
        p: [make_clip(p, 10_000 + 10 * j + k, shift=shifts.get(p, 1.0), seed=seed, **kw) for k in range(heldout)]
        for j, p in enumerate(phases)
    }
    return types.SimpleNamespace(clips=clips, heldout=held, phases=tuple(phases))


def tiny_train(model, clips, steps=20, lr=3e-3):
    """A few AdamW steps of teacher-forcing L1 (stand-in for hope_kernels.train.train)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for s in range(steps):
        c = clips[s % len(clips)]
        z, a = c["latents"][None].float(), c["actions"][None].float()
        loss = l1_rollout_loss(model(z, a)[:, :-1], z[:, 1:])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


class StandInHooks:
    """hope_kernels.aba.Hooks stand-in: synthetic stream, tiny training, safetensors checkpoints. Counts calls."""

    def __init__(self, train_steps=10):
        self.calls = {
            "ensure_dataset": 0,
            "verify_dataset": 0,
            "make_stream": 0,
            "train": 0,
            "load_checkpoint": 0,
            "train_clips": 0,
        }
        self.train_steps = train_steps

    def ensure_dataset(self, path, preset, seed):
        self.calls["ensure_dataset"] += 1
        import pathlib

        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "manifest.json").write_text("{}")
        return path

    def verify_dataset(self, path):
        self.calls["verify_dataset"] += 1

    def make_stream(self, path, phases, clips_per_phase, seed, part="report", reserve=0):
        self.calls["make_stream"] += 1
        self.parts = getattr(self, "parts", []) + [(part, seed)]
        # validation streams: other synthetic clips than any reported seed's
        return make_stream(clips_per_phase or 3, tuple(phases), seed=seed + (7919 if part == "validation" else 0))

    def train_clips(self, path, phase, n, seed):
        self.calls["train_clips"] += 1
        return [make_clip(phase, 20_000 + i, seed=seed) for i in range(n)]

    @staticmethod
    def _build(kind, overrides):
        return TinyHOPE(cms=overrides.get("cms", True)) if kind == "hope" else TinyPredictor()

    def train(self, config):
        import json
        import pathlib

        from safetensors.torch import save_file

        self.calls["train"] += 1
        model = self._build(config["model"], config["overrides"])
        shifts = {"A1": 1.0, "B": -2.0, "A2": 1.0}
        clips = [make_clip(p, 30_000 + i, shift=shifts[p]) for p in config["phases"] for i in range(3)]
        tiny_train(model, clips, steps=self.train_steps)
        out = pathlib.Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        (out / "meta.json").write_text(json.dumps({"kind": config["model"], "overrides": config["overrides"]}))
        return types.SimpleNamespace(model=model, checkpoint=out / "model.safetensors", history=[])

    def load_checkpoint(self, path):
        import json
        import pathlib

        from safetensors.torch import load_file

        self.calls["load_checkpoint"] += 1
        meta = json.loads((pathlib.Path(path).parent / "meta.json").read_text())
        model = self._build(meta["kind"], meta["overrides"])
        model.load_state_dict(load_file(str(path)))
        return model, {}
