"""Configuration dataclasses: predictor presets (docs/design.md#predictors), the training config
(docs/design.md#training), and `Config`, the one base every config of the package uses (simulation, training,
adaptation, the A-B-A job): `from_dict` names unknown keys (listing the known ones), checks each value against
its field's annotation and its declared range checks, and names the key path of a bad value
(`aba.runs[3].options.lr`); `to_dict` gives the plain mapping back.

Predictor presets live here (not in YAML). The YAML configs the package ships (the A-B-A presets
`aba_<name>.yaml` and the example training configs `train_*.yaml`, which name a predictor preset and override
fields) are package data in hope_kernels/configs/, read through importlib.resources so a wheel install finds them:
`shipped_configs()`, `read_shipped_config()`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

# ------------------------------------------------------------------------------------- the config base

Check = Callable[[Any], "str | None"]  # value -> what is wrong ("must be >= 1") or None


def at_least(lo) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def greater_than(lo) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}"


def between(lo, hi) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}]"


def one_of(*choices) -> Check:
    return lambda v: None if v in choices else f"must be one of {choices}"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be a non-negative int"


def finite_positive(v) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


REQUIRED = dataclasses.MISSING  # setting(REQUIRED, ...): a key the mapping must hold


def setting(default: Any = REQUIRED, *checks: Check, factory: Callable | None = None) -> Any:
    """A config field with its range checks, run on every construction (None, where the annotation allows it,
    is not checked). `factory`: a mutable default."""
    kw = {"default_factory": factory} if factory is not None else {"default": default}
    return field(metadata={"checks": checks}, **kw)


# the key path of the config being built by from_dict, read by __post_init__ for its error messages
_PATH: contextvars.ContextVar[str] = contextvars.ContextVar("config_path", default="")


def key_path(path: str, key) -> str:
    """ "aba" + "runs" -> "aba.runs"; "aba.runs" + 3 -> "aba.runs[3]"; "" + "lr" -> "lr"."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


_NAMES = {bool: "bool", int: "int", float: "number", str: "string", list: "list", tuple: "list", dict: "mapping"}


def _type_name(tp, article: bool = True) -> str:
    """int -> "an int", list[int] -> "a list of int", int | None -> "an int or None"."""
    if tp is type(None):
        return "None"
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a, article) for a in args)
    origin = typing.get_origin(tp) or tp
    if isinstance(origin, type) and issubclass(origin, Config):
        name = "mapping"
    else:
        name = _NAMES.get(origin, getattr(origin, "__name__", str(origin)))
    if args and origin in (list, tuple):
        name += f" of {_type_name(args[0], article=False)}"
    if not article:
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def _convert(value, tp, where: str):
    """`value` checked against the annotation `tp`; nested configs built, lists and tuples of the annotated kind.
    A type mismatch raises ValueError naming `where`, the expected type and the value."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, where)
            except ValueError:
                # an arm of the right kind whose content is wrong names the inner problem
                if _kind_matches(value, arm):
                    raise
        raise ValueError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp.from_dict(value, where)
    base = origin or tp
    if not _kind_matches(value, base):
        raise ValueError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if base in (list, tuple) and args:
        items = [_convert(v, args[0], key_path(where, i)) for i, v in enumerate(value)]
        return base(items)
    if base is tuple:
        return tuple(value)
    if base is dict and len(args) == 2:
        return {k: _convert(v, args[1], key_path(where, k)) for k, v in value.items()}
    return value


def _kind_matches(value, tp) -> bool:
    tp = typing.get_origin(tp) or tp
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(tp, type) and issubclass(tp, Config):
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


class UnknownKeysError(ValueError, TypeError):
    """A mapping (or keyword arguments) holds keys a config does not know."""


class Config:
    """Base of the package's config dataclasses. A subclass declares its fields with `setting(default, *checks)`
    (or plain defaults), cross-field rules in `check(path)`, and `WHAT` (its name in errors)."""

    WHAT: ClassVar[str] = "config"

    def __post_init__(self):
        path = _PATH.get()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            for chk in f.metadata.get("checks", ()):
                problem = chk(v)
                if problem:
                    raise ValueError(f"{key_path(path, f.name)} {problem}, got {v!r}")
        self.check(path)

    def check(self, path: str) -> None:
        """Rules across fields; errors name `path` (the config's key path, "" at the top)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d, path: str = ""):
        """The config of mapping `d`: unknown keys, missing required keys and values of the wrong type raise
        ValueError naming the key path (`path` is this config's own, e.g. "aba.runs[3]"); unknown keys raise
        UnknownKeysError, also a TypeError, as Python does for unknown keyword arguments."""
        where = path or cls.WHAT
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a mapping, got {d!r}")
        names = cls.field_names()
        unknown = sorted(set(d) - set(names))
        if unknown:
            at = f" at {path}" if path else ""
            raise UnknownKeysError(f"unknown {cls.WHAT} keys {unknown}{at}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kw[f.name] = _convert(d[f.name], hints[f.name], key_path(path, f.name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where} is missing {f.name!r}")
        token = _PATH.set(path)
        try:
            return cls(**kw)
        finally:
            _PATH.reset(token)

    def to_dict(self) -> dict:
        """Field -> value: nested configs as mappings, tuple fields as lists (as JSON and YAML hold them)."""
        return {f.name: _plain(getattr(self, f.name), top=True) for f in dataclasses.fields(self)}


def _plain(v, top: bool = False):
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        items = [_plain(x) for x in v]
        return items if top or isinstance(v, list) else tuple(items)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ------------------------------------------------------------------------------------------- predictors

KINDS = ("ac", "hope")


def _odd_or_zero(v) -> str | None:
    return None if v == 0 or (v > 0 and v % 2) else "must be 0 (off) or an odd kernel size"


def _grid(v) -> str | None:
    return None if len(v) == 3 and min(v) >= 1 else "must be (T, H, W) with positive entries"


def _increasing(v) -> str | None:
    ok = v and min(v) >= 1 and all(b > a for a, b in zip(v, v[1:]))
    return None if ok else "must be strictly increasing positive ints"


@dataclass
class PredictorConfig(Config):
    """Both predictors. Fields after `init_std` are used by HOPE only."""

    WHAT: ClassVar[str] = "predictor config"
    kind: str = setting("ac", one_of(*KINDS))
    preset: str = "tiny"
    enc_dim: int = setting(64, at_least(1))
    grid: tuple[int, ...] = setting((8, 8, 8), _grid)  # (T, H, W)
    action_dim: int = setting(2, at_least(1))
    state_dim: int = setting(0, at_least(0))
    width: int = 96
    depth: int = setting(2, at_least(1))
    heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    window: int | None = None  # timesteps visible to attention, the current one included (None: all)
    rope_compat: str | None = setting(None, lambda v: None if v == "vjepa2" else "must be None or 'vjepa2'")
    # "vjepa2": the official (non-rotation) RoPE formula
    init_std: float = 0.02
    stem_kernel: int = setting(5, _odd_or_zero)  # k x k conv over [z_t, z_t - z_{t-1}] added to the embedding; 0: off
    predict_delta: bool = True  # z_hat = layer_norm(z_t) + head(...); False: absolute output (official AC)
    # HOPE
    self_referential: bool = True  # False: static k, v, eta, alpha projections
    memory_rule: str = setting("dgd", one_of("dgd", "titans"))  # "dgd" (HOPE) | "titans" (momentum rule, ablation)
    mem_heads: int | None = None  # None: = heads
    eta_max: float = 0.5  # inner learning rate eta_t in (0, eta_max)
    cms: bool = True  # False: one plain MLP per block instead of the CMS chain
    cms_periods: tuple[int, ...] = setting((1, 4, 16), _increasing)  # update period of each CMS level, fastest first
    cms_ratio: float = 1.0  # hidden width of each CMS level / width

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        self.cms_periods = tuple(int(c) for c in self.cms_periods)
        super().__post_init__()

    def check(self, path: str) -> None:
        if self.width % self.heads:
            raise ValueError(f"{key_path(path, 'width')} {self.width} must be divisible by heads {self.heads}")
        mh = self.mem_heads or self.heads
        if self.width % mh:
            raise ValueError(f"{key_path(path, 'width')} {self.width} must be divisible by mem_heads {mh}")


# Width / depth / heads per preset. HOPE presets are sized to about the AC parameter count of the same name
# (AC block ~12 w^2; HOPE block: attention 4 w^2 + memory 2 w^2 + 3 CMS levels of 2 w^2). The input stem costs
# 2 * enc_dim * width * k^2 parameters: k = 5 for tiny (measured to learn, docs/training.md), 3 for small, and
# none for vjepa2-ac, which keeps the official architecture (absolute output, its RoPE formula) and loads official
# weights as is.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ac": {
        "tiny": dict(width=96, depth=2, heads=4),
        "small": dict(width=384, depth=6, heads=6, stem_kernel=3),
        "vjepa2-ac": dict(
            width=1024, depth=24, heads=16, enc_dim=1024, stem_kernel=0, predict_delta=False, rope_compat="vjepa2"
        ),
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
class TrainConfig(Config):
    WHAT: ClassVar[str] = "training config"
    model: str = setting("ac", one_of(*KINDS))
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    data: str | os.PathLike | None = None
    phases: list[str] | str = field(default_factory=lambda: ["A1"])  # a single phase name: [name]
    split: str = "train"
    steps: int = setting(300, at_least(1))
    batch_size: int = setting(16, at_least(1))
    lr: float = 1e-3
    weight_decay: float = 0.04
    warmup: int = 20
    decay_frac: float = setting(0.2, between(0, 1))  # last fraction of steps with linear decay to 0 (WSD)
    grad_clip: float = 1.0
    rollout_w0: float = 0.0
    rollout_w1: float = 1.0
    rollout_schedule: str = setting("linear", one_of("linear", "cosine"))
    rollout_steps: int = setting(2, at_least(0))
    rollout_score: str = setting("last", one_of("last", "all"))  # "last" (seed formula) | "all"
    seed: int = 0
    device: str = "auto"
    out: str | os.PathLike | None = None
    ckpt_every: int = setting(100, at_least(1))
    log_every: int = setting(10, at_least(1))
    progress: bool = True
    resume: bool = False  # continue from out/checkpoint.safetensors (which must exist)
    overwrite: bool = False  # start over although out/ already holds a checkpoint
    # HOPE: CMS level l accumulates its gradient and applies the mean every cms_periods[l] optimiser steps
    # (docs/design.md#continuum-memory-system); off by default: every level is then updated every step (the
    # learning test's setting)
    cms_train_periods: bool = False
    # HOPE as a continual learner: each of the batch_size / seq_clips sequences is seq_clips clips in a row with
    # the memory carried from clip to clip and the loss backpropagated through all of them (truncated at the
    # step); the detached end memory carries on into the next step and is reset to the learned initial state
    # every memory_reset_every steps (1: every step starts afresh). docs/training.md
    seq_clips: int = setting(1, at_least(1))
    memory_reset_every: int = setting(1, at_least(1))
    # the predictor's forward runs under torch.compile (inductor; on CPU it needs a C++ compiler): the same
    # losses within float32 rounding, after a first step that compiles. docs/training.md
    compile: bool = False

    def __post_init__(self):
        self.phases = [self.phases] if isinstance(self.phases, str) else list(self.phases)
        super().__post_init__()

    def check(self, path: str) -> None:
        if self.batch_size % self.seq_clips:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of seq_clips {self.seq_clips} "
                f"(batch_size counts clips: batch_size / seq_clips sequences per step)"
            )
        if self.model != "hope" and (self.seq_clips > 1 or self.memory_reset_every > 1):
            raise ValueError(
                f"seq_clips and memory_reset_every carry a HOPE memory across clips; model "
                f"{self.model!r} has none (got seq_clips={self.seq_clips}, "
                f"memory_reset_every={self.memory_reset_every})"
            )
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite exclude each other: resume continues the checkpoint, overwrite replaces it"
            )


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


SHIPPED_DIR = "configs"  # hope_kernels/configs: package data (pyproject [tool.setuptools.package-data])


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
    return sorted(
        f.name[len(prefix) : -len(".yaml")]
        for f in root.iterdir()
        if f.name.startswith(prefix) and f.name.endswith(".yaml") and f.is_file()
    )


def read_shipped_config(name: str, prefix: str = "", what: str = "config", full_names: bool = False) -> dict:
    """The shipped config `<prefix><name>.yaml` (`name` may already start with `prefix`) as a dict. An unknown
    name raises FileNotFoundError naming it and listing the shipped ones (with the prefix if `full_names`)."""
    from importlib.resources import as_file

    stem = name if prefix and name.startswith(prefix) else prefix + name
    res = shipped_dir().joinpath(f"{stem}.yaml")
    if "/" in name or "\\" in name or not res.is_file():
        known = [prefix + n if full_names else n for n in shipped_configs(prefix)]
        raise FileNotFoundError(
            f"unknown {what} {name!r}: the package ships {known} "
            f"(hope_kernels/{SHIPPED_DIR}/{prefix}<name>.yaml), or pass a YAML/JSON file path"
        )
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
