"""Training data: in-memory clips, the dataset folder, the deterministic batch of each step and collation."""

from __future__ import annotations

import math
import os

import torch

from hope_kernels.config import TrainConfig

try:  # the data package lands in its own branch; train() raises a clear error without it
    from hope_kernels.data import ClipDataset
except ImportError:  # pragma: no cover
    ClipDataset = None


class TensorClips(torch.utils.data.Dataset):
    """In-memory clips with the ClipDataset item/attribute interface (tests, synthetic data)."""

    def __init__(self, latents, actions, states=None, grid=None):
        n, T, N, D = latents.shape
        self.latents, self.actions, self.states = latents, actions.float(), states
        self.grid = tuple(grid) if grid is not None else (T, int(math.isqrt(N)), int(math.isqrt(N)))
        self.enc_dim, self.action_dim = D, actions.shape[-1]
        self.state_dim = 0 if states is None else states.shape[-1]

    def __len__(self):
        return self.latents.shape[0]

    def __getitem__(self, i):
        item = {"latents": self.latents[i], "actions": self.actions[i], "index": i}
        if self.states is not None:
            item["states"] = self.states[i]
        return item


def _load_dataset(cfg: TrainConfig):
    if ClipDataset is None:
        raise RuntimeError("hope_kernels.data is not available in this installation: cannot read a dataset dir")
    if not cfg.data:
        raise ValueError("config 'data' (dataset folder) is required")
    if not os.path.isdir(cfg.data):
        raise FileNotFoundError(f"dataset folder {cfg.data!r} does not exist")
    parts = [ClipDataset(cfg.data, phase=p, split=cfg.split) for p in cfg.phases]
    parts = [p for p in parts if len(p) > 0]
    if not parts:
        raise ValueError(f"no clips in {cfg.data!r} for phases {cfg.phases} split {cfg.split!r}")
    return parts[0] if len(parts) == 1 else _Concat(parts)


class _Concat(torch.utils.data.ConcatDataset):
    def __init__(self, parts):
        super().__init__(parts)
        p = parts[0]
        self.grid, self.enc_dim, self.action_dim, self.state_dim = p.grid, p.enc_dim, p.action_dim, p.state_dim


def _batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Global batch of `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    per_epoch = max(n // batch, 1)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if n < batch:
        perm = perm.repeat(batch // n + 1)
    return perm[k * batch : (k + 1) * batch]


def _collate(ds, idx, device, nonfinite: list | None = None):
    """-> z (b, T, N, D), a (b, T, A), s (b, T, S) or None on `device`. `nonfinite`, if given, receives the names
    of the inputs holding NaN or inf, checked on the host before the copy (no device synchronisation)."""
    items = [ds[int(i)] for i in idx]
    out = {"latents": None, "actions": None, "states": None}
    with_states = items[0].get("states") is not None and getattr(ds, "state_dim", 0)
    for name in out if with_states else ("latents", "actions"):
        x = torch.stack([torch.as_tensor(it[name]) for it in items]).float()
        if nonfinite is not None and not torch.isfinite(x).all():
            nonfinite.append(name)
        out[name] = x.to(device)
    return out["latents"], out["actions"], out["states"]
