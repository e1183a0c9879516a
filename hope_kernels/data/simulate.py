"""Embedded dataset generation: simulate (physics.py) -> render -> encode (models/encoder.py) -> write (format.py).

Presets (clips per split; stream and heldout counts are per phase):

    preset  A1 train  B train  A2 train  stream  heldout  total
    tiny          16        8         4       6        4     58   (tests of other modules, seconds)
    quick        256      128        32      24       16    536   (default; ~36 MB at fp16)
    full        2048     1024       256     100       64   3820

Phases: A1 and A2 share phase-A physics (mu_a, mass_a; default 0.5, 1.0) but use different seeds; B uses
(mu_b, mass_b; default 0.1, 0.5). Every (phase, split) draws from its own generator seeded by
(seed, phase index, split index), so a split's clips do not change when another split's size changes.
Latents are stored float16 by default (`latent_dtype`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import ClassVar

import numpy as np

from hope_kernels.config import Config, at_least, non_negative, one_of, setting
from hope_kernels.data.format import LATENT_DTYPES, MANIFEST, SPLITS, DatasetWriter, manifest_is_valid, read_manifest
from hope_kernels.data.physics import Physics, simulate_clips, timestep_positions

PHASES = ("A1", "B", "A2")


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0 (the physics needs mu > 0 and mass > 0)"


@dataclasses.dataclass
class SimConfig(Config):
    """Clip counts per (phase, split), the physics of phase A (A1, A2) and B, and the storage layout."""

    WHAT: ClassVar[str] = "simulation config"
    train_a1: int = setting(256, non_negative)
    train_b: int = setting(128, non_negative)
    train_a2: int = setting(32, non_negative)
    stream: int = setting(24, non_negative)
    heldout: int = setting(16, non_negative)
    mu_a: float = setting(0.5, _positive)
    mass_a: float = setting(1.0, _positive)
    mu_b: float = setting(0.1, _positive)
    mass_b: float = setting(0.5, _positive)
    latent_dtype: str = setting("float16", one_of(*LATENT_DTYPES))
    shard_clips: int = setting(256, at_least(1))
    batch: int = setting(64, at_least(1))

    def physics(self, phase: str) -> Physics:
        return Physics(self.mu_b, self.mass_b) if phase == "B" else Physics(self.mu_a, self.mass_a)

    def count(self, phase: str, split: str) -> int:
        if split == "train":
            return {"A1": self.train_a1, "B": self.train_b, "A2": self.train_a2}[phase]
        return self.stream if split == "stream" else self.heldout


PRESETS = {
    "tiny": dict(train_a1=16, train_b=8, train_a2=4, stream=6, heldout=4),
    "quick": dict(),
    "full": dict(train_a1=2048, train_b=1024, train_a2=256, stream=100, heldout=64),
}


def make_config(preset: str = "quick", **overrides) -> SimConfig:
    """The preset's SimConfig with `overrides` (SimConfig fields) on top; unknown fields and bad values raise
    ValueError naming them."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {list(PRESETS)}")
    return SimConfig.from_dict({**PRESETS[preset], **overrides})


def _clip_meta(sim: dict, i: int) -> dict:
    sc = sim["scenes"]
    return {
        "impulse_frame": int(sc["impulse_frame"][i]),
        "J": [round(float(v), 6) for v in sc["J"][i]],
        "n_objects": int(sc["n_obj"][i]),
        "shapes": ["box" if s else "disc" for s in sc["shape"][i, : sc["n_obj"][i]]],
        "pos0": [[round(float(v), 5) for v in p] for p in sc["pos0"][i, : sc["n_obj"][i]]],
        # ground truth of the pushed object per timestep (tubelet mean), metres
        "xy": [[round(float(v), 5) for v in p] for p in timestep_positions(sim["pos"][i : i + 1])[0]],
    }


def simulate_dataset(out_dir, preset: str = "quick", seed: int = 0, progress: bool = True, **overrides) -> pathlib.Path:
    """Simulate, render and encode phases A1, B, A2 (splits train / stream / heldout) into dataset `out_dir`
    (format.py). Returns the folder. `overrides` are SimConfig fields (e.g. train_a1=64, mu_b=0.05)."""
    import torch

    from hope_kernels.models.encoder import load_embedded_encoder

    cfg = make_config(preset, **overrides)
    enc = load_embedded_encoder()
    torch_threads = torch.get_num_threads()
    jobs = [(p, s, cfg.count(p, s)) for p in PHASES for s in SPLITS if cfg.count(p, s) > 0]
    total = sum(n for _, _, n in jobs)
    bar = None
    t0 = time.perf_counter()
    gen = {
        "preset": preset,
        "seed": int(seed),
        "config": cfg.to_dict(),
        "encoder": "embedded",
        "physics": "hope_kernels.data.physics",
    }
    try:
        with DatasetWriter(
            out_dir,
            grid=(8, 8, 8),
            enc_dim=enc.dim,
            action_dim=2,
            state_dim=0,
            latent_dtype=cfg.latent_dtype,
            generator=gen,
            encoder="embedded",
        ) as w:
            if progress:  # once the folder is ours (DatasetWriter locks it)
                from tqdm import tqdm

                bar = tqdm(total=total, unit="clip", desc="simulate")
            for p in PHASES:
                w.add_phase(p, cfg.physics(p).as_dict())
            for p, s, n in jobs:
                rng = np.random.default_rng([int(seed), PHASES.index(p), SPLITS.index(s)])
                phys = cfg.physics(p)
                for a in range(0, n, cfg.shard_clips):
                    m = min(cfg.shard_clips, n - a)
                    lats, acts, metas = [], [], []
                    for b in range(0, m, cfg.batch):
                        sim = simulate_clips(min(cfg.batch, m - b), phys, rng)
                        lats.append(enc.encode(torch.from_numpy(sim["frames"])))
                        acts.append(torch.from_numpy(sim["actions"]))
                        metas += [_clip_meta(sim, i) for i in range(sim["frames"].shape[0])]
                        if bar is not None:
                            bar.update(sim["frames"].shape[0])
                    w.add_shard(torch.cat(lats), torch.cat(acts), p, s, metas=metas)
            w.manifest["generator"]["seconds"] = round(time.perf_counter() - t0, 2)
            w.manifest["generator"]["torch_threads"] = torch_threads
    finally:
        if bar is not None:
            bar.close()
    return pathlib.Path(out_dir)


def ensure_dataset(out_dir, preset: str = "quick", seed: int = 0, **overrides) -> pathlib.Path:
    """Return `out_dir` if it already holds a valid dataset, else simulate it. An existing simulated dataset
    made with another preset / seed / overrides raises (never silently reuses stale data); an imported dataset
    (no generator record) is used as is."""
    out_dir = pathlib.Path(out_dir)
    if manifest_is_valid(out_dir):
        g = read_manifest(out_dir).get("generator")
        if g is not None:
            want = make_config(preset, **overrides).to_dict()
            if g.get("seed") != int(seed) or g.get("config") != want:
                raise ValueError(
                    f"{out_dir} holds a dataset simulated with preset {g.get('preset')!r} seed "
                    f"{g.get('seed')}, not preset {preset!r} seed {seed} {overrides or ''}: "
                    f"use another folder or delete it"
                )
        return out_dir
    if (out_dir / MANIFEST).exists():
        raise ValueError(
            f"{out_dir} has a broken dataset (run `hope-kernels verify {out_dir}`); delete it to resimulate"
        )
    return simulate_dataset(out_dir, preset=preset, seed=seed, progress=False, **overrides)
