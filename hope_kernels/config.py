"""Configuration dataclasses: predictor presets (docs/design.md#predictors) and the training config
(docs/design.md#training).

Predictor presets live here (not in YAML). The YAML configs the package ships (the A-B-A presets
`aba_<name>.yaml` and the example training configs `train_*.yaml`, which name a predictor preset and override
fields) are package data in hope_kernels/configs/, read through importlib.resources so a wheel install finds them:
`shipped_configs()`, `read_shipped_config()`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KINDS = ("ac", "hope")


@dataclass
class PredictorConfig:
    """Both predictors. Fields after `init_std` are used by HOPE only."""
    kind: str = "ac"
    preset: str = "tiny"
    enc_dim: int = 64
    grid: tuple = (8, 8, 8)                 # (T, H, W)
    action_dim: int = 2
    state_dim: int = 0
    width: int = 96
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    window: int | None = None               # timesteps visible to attention, the current one included (None: all)
    rope_compat: str | None = None          # "vjepa2": the official (non-rotation) RoPE formula
    init_std: float = 0.02
    stem_kernel: int = 5                    # k x k conv over [z_t, z_t - z_{t-1}] added to the embedding; 0: off
    predict_delta: bool = True              # z_hat = layer_norm(z_t) + head(...); False: absolute output (official AC)
    # HOPE
    self_referential: bool = True           # False: static k, v, eta, alpha projections
    memory_rule: str = "dgd"                # "dgd" (HOPE) | "titans" (momentum rule, ablation)
    mem_heads: int | None = None            # None: = heads
    eta_max: float = 0.5                    # inner learning rate eta_t in (0, eta_max)
    cms: bool = True                        # False: one plain MLP per block instead of the CMS chain
    cms_periods: tuple = (1, 4, 16)         # update period of each CMS level, fastest first
    cms_ratio: float = 1.0                  # hidden width of each CMS level / width

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        self.cms_periods = tuple(int(c) for c in self.cms_periods)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be (T, H, W) with positive entries, got {self.grid}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        mh = self.mem_heads or self.heads
        if self.width % mh:
            raise ValueError(f"width {self.width} must be divisible by mem_heads {mh}")
        if self.memory_rule not in ("dgd", "titans"):
            raise ValueError(f"memory_rule must be 'dgd' or 'titans', got {self.memory_rule!r}")
        if self.rope_compat not in (None, "vjepa2"):
            raise ValueError(f"rope_compat must be None or 'vjepa2', got {self.rope_compat!r}")
        if any(b <= a for a, b in zip(self.cms_periods, self.cms_periods[1:])) or min(self.cms_periods) < 1:
            raise ValueError(f"cms_periods must be strictly increasing positive ints, got {self.cms_periods}")
        if self.stem_kernel < 0 or (self.stem_kernel and self.stem_kernel % 2 == 0):
            raise ValueError(f"stem_kernel must be 0 (off) or an odd kernel size, got {self.stem_kernel}")
        for name in ("enc_dim", "action_dim", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.state_dim < 0:
            raise ValueError(f"state_dim must be >= 0, got {self.state_dim}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"], d["cms_periods"] = list(self.grid), list(self.cms_periods)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PredictorConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown predictor config keys {sorted(unknown)}")
        return cls(**d)


# Width / depth / heads per preset. HOPE presets are sized to about the AC parameter count of the same name
# (AC block ~12 w^2; HOPE block: attention 4 w^2 + memory 2 w^2 + 3 CMS levels of 2 w^2). The input stem costs
# 2 * enc_dim * width * k^2 parameters: k = 5 for tiny (measured to learn, docs/training.md), 3 for small, and
# none for vjepa2-ac, which keeps the official architecture (absolute output, its RoPE formula) and loads official
# weights as is.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ac": {
        "tiny": dict(width=96, depth=2, heads=4),
        "small": dict(width=384, depth=6, heads=6, stem_kernel=3),
        "vjepa2-ac": dict(width=1024, depth=24, heads=16, enc_dim=1024, stem_kernel=0, predict_delta=False,
                          rope_compat="vjepa2"),
    },
    "hope": {
        "tiny": dict(width=96, depth=2, heads=4),
        "small": dict(width=384, depth=6, heads=6, stem_kernel=3),
        "vjepa2-ac": dict(width=1024, depth=24, heads=16, enc_dim=1024, stem_kernel=0, predict_delta=False),
    },
}


def predictor_config(kind: str, preset: str = "tiny", **fields) -> PredictorConfig:
    """Preset values, then `fields` on top (unknown names raise TypeError naming them)."""
    if kind not in PRESETS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if preset not in PRESETS[kind]:
        raise ValueError(f"unknown {kind} preset {preset!r}; choose one of {sorted(PRESETS[kind])}")
    names = {f.name for f in dataclasses.fields(PredictorConfig)}
    unknown = set(fields) - names
    if unknown:
        raise TypeError(f"unknown predictor option(s) {sorted(unknown)}; valid: {sorted(names - {'kind', 'preset'})}")
    values = {**PRESETS[kind][preset], **fields}
    return PredictorConfig(kind=kind, preset=preset, **values)


@dataclass
class TrainConfig:
    model: str = "ac"
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    data: str | None = None
    phases: list = field(default_factory=lambda: ["A1"])
    split: str = "train"
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.04
    warmup: int = 20
    decay_frac: float = 0.2                 # last fraction of steps with linear decay to 0 (WSD)
    grad_clip: float = 1.0
    rollout_w0: float = 0.0
    rollout_w1: float = 1.0
    rollout_schedule: str = "linear"        # "linear" | "cosine"
    rollout_steps: int = 2
    rollout_score: str = "last"             # "last" (seed formula) | "all"
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    ckpt_every: int = 100
    log_every: int = 10
    progress: bool = True
    resume: bool = False                    # continue from out/checkpoint.safetensors (which must exist)
    overwrite: bool = False                 # start over although out/ already holds a checkpoint
    # HOPE: CMS level l accumulates its gradient and applies the mean every cms_periods[l] optimiser steps
    # (docs/design.md#continuum-memory-system); off by default: every level is then updated every step (the
    # learning test's setting)
    cms_train_periods: bool = False
    # HOPE as a continual learner: each of the batch_size / seq_clips sequences is seq_clips clips in a row with
    # the memory carried from clip to clip and the loss backpropagated through all of them (truncated at the
    # step); the detached end memory carries on into the next step and is reset to the learned initial state
    # every memory_reset_every steps (1: every step starts afresh). docs/training.md
    seq_clips: int = 1
    memory_reset_every: int = 1
    # the predictor's forward runs under torch.compile (inductor; on CPU it needs a C++ compiler): the same
    # losses within float32 rounding, after a first step that compiles. docs/training.md
    compile: bool = False

    def __post_init__(self):
        if self.model not in KINDS:
            raise ValueError(f"model must be one of {KINDS}, got {self.model!r}")
        if self.rollout_schedule not in ("linear", "cosine"):
            raise ValueError(f"rollout_schedule must be 'linear' or 'cosine', got {self.rollout_schedule!r}")
        if self.rollout_score not in ("last", "all"):
            raise ValueError(f"rollout_score must be 'last' or 'all', got {self.rollout_score!r}")
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "seq_clips", "memory_reset_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_steps < 0:
            raise ValueError(f"rollout_steps must be >= 0, got {self.rollout_steps}")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"decay_frac must be in [0, 1], got {self.decay_frac}")
        if self.batch_size % self.seq_clips:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of seq_clips {self.seq_clips} "
                             f"(batch_size counts clips: batch_size / seq_clips sequences per step)")
        if self.model != "hope" and (self.seq_clips > 1 or self.memory_reset_every > 1):
            raise ValueError(f"seq_clips and memory_reset_every carry a HOPE memory across clips; model "
                             f"{self.model!r} has none (got seq_clips={self.seq_clips}, "
                             f"memory_reset_every={self.memory_reset_every})")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the checkpoint, "
                             "overwrite replaces it")
        if isinstance(self.phases, str):
            self.phases = [self.phases]
        self.phases = list(self.phases)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}; valid: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**d)


def is_int(v) -> bool:
    """A Python int that is not a bool (True would pass isinstance(v, int) as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def read_config_file(path) -> dict:
    """A YAML or JSON config file -> dict; errors name the file (and the line of a syntax error)."""
    import json
    import os

    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        cfg = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path!r} is not valid JSON: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"config file {path!r} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {path!r} must hold a mapping, got {type(cfg).__name__}")
    return cfg


SHIPPED_DIR = "configs"   # hope_kernels/configs: package data (pyproject [tool.setuptools.package-data])


def shipped_dir():
    """The folder of YAML configs shipped with the package (an importlib.resources Traversable)."""
    from importlib.resources import files
    return files("hope_kernels").joinpath(SHIPPED_DIR)


def shipped_configs(prefix: str = "") -> list[str]:
    """Names of the shipped YAML configs whose file name starts with `prefix`, without prefix and ".yaml"
    (shipped_configs("aba_") -> ["paper", "quick"])."""
    root = shipped_dir()
    if not root.is_dir():
        return []
    return sorted(f.name[len(prefix):-len(".yaml")] for f in root.iterdir()
                  if f.name.startswith(prefix) and f.name.endswith(".yaml") and f.is_file())


def read_shipped_config(name: str, prefix: str = "", what: str = "config", full_names: bool = False) -> dict:
    """The shipped config `<prefix><name>.yaml` (`name` may already start with `prefix`) as a dict. An unknown
    name raises FileNotFoundError naming it and listing the shipped ones (with the prefix if `full_names`)."""
    from importlib.resources import as_file
    stem = name if prefix and name.startswith(prefix) else prefix + name
    res = shipped_dir().joinpath(f"{stem}.yaml")
    if "/" in name or "\\" in name or not res.is_file():
        known = [prefix + n if full_names else n for n in shipped_configs(prefix)]
        raise FileNotFoundError(f"unknown {what} {name!r}: the package ships {known} "
                                f"(hope_kernels/{SHIPPED_DIR}/{prefix}<name>.yaml), or pass a YAML/JSON file path")
    with as_file(res) as path:
        return read_config_file(path)


def read_config_or_shipped(name_or_path, prefix: str = "", what: str = "config", full_names: bool = False) -> dict:
    """A YAML/JSON file path (it has a suffix or a folder part), else the name of a shipped config
    `<prefix><name>.yaml` -> dict. Which one does not depend on the working directory."""
    import os
    path = os.fspath(name_or_path)
    if os.path.splitext(path)[1] or os.sep in path or "/" in path:
        return read_config_file(path)
    return read_shipped_config(path, prefix, what, full_names)
