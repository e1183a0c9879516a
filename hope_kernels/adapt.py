"""Prequential test-time adaptation over an A1 -> B -> A2 stream (docs/design.md#test-time-adaptation).

    log = adapt_stream(model, stream, "layernorm", lr=1e-3, steps=1)

For every clip, in stream order: (1) score it with the current model (teacher-forcing L1, rollout L1 at
every horizon, and the copy-last-latent baseline), then (2) adapt on it with the chosen strategy. The score
of clip i therefore never depends on clip i itself. At the last clip of each phase the model is also
evaluated, without adapting, on the held-out clips of every phase (error matrix R[i][j]).

Strategies (`STRATEGIES`):
  none        frozen model
  layernorm   `steps` optimizer steps on the LayerNorm affine parameters (the LN-TTA baseline)
  last_block  the same on `model.blocks[-1]`
  full        the same on every parameter
  lora        the same on rank-`lora_rank` adapters added (by forward hooks) to every Linear in `model.blocks`;
              merged into the weights at the end unless `merge_lora=False`
  ewc         full + (ewc_lambda / 2) * sum_i F_i (theta_i - theta*_i)^2, theta* = the weights at stream
              start (A1), F = empirical Fisher on `fisher_clips` (A1 training clips)
  reset       full, and after every `reset_every` clips the weights and optimizer go back to the stream-start
              (A1) weights, so clips reset_every, 2 * reset_every, ... are scored by the A1 weights
  replay      full, each step on the clip plus `replay_size` clips drawn from `replay_clips` (A1; privileged)
  hope        HOPE predictors only: memory carried across clips (`carry_memory`, default True) and CMS level
              updates at their periods: level l accumulates its gradient every clip and every C_l clips
              steps its own optimizer (`optimizer`, default AdamW, lr `cms_lr`, as the baseline's LN-TTA) on
              the mean accumulated gradient. (Plain SGD at cms_lr 1e-3 moved the weights by ~1e-7 relative
              per update: `hope` scored like the frozen model.)
  hope+ttt    hope + `steps` optimizer steps on `ttt_params` ("layernorm" | "last_block" | "full"), CMS excluded
  (hope, hope+ttt: `memory_lr_scale` multiplies the memory's in-context step size eta_max for this stream)

Memory carry: with `model.carry_memory = True` a HOPE forward starts from the stored memory and stores its
end state. Scoring and held-out passes restore the memory afterwards (so clip i's scoring cannot leak into its
own rollout score), and each adaptation forward starts from the memory as it was before the clip; the state
carried to clip i+1 is the end state of clip i under the adapted weights.

Divergence guard: after adapting on a clip, the clip's adaptation loss is recomputed; if it is NaN/Inf or
more than `guard_factor` times the loss before the update, every change of that clip (weights, optimizer
state, CMS accumulators, memory) is rolled back and counted in `StreamLog.rollbacks`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import warnings
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hope_kernels.config import Config, at_least, finite_positive, greater_than, one_of, setting
from hope_kernels.models.base import compiled_forward
from hope_kernels.models.cms import CMSPeriods
from hope_kernels.ops import l1_rollout_loss

__all__ = [
    "STRATEGIES",
    "PRIVILEGED",
    "AdaptOptions",
    "StreamLog",
    "adapt_stream",
    "score_clip",
    "adaptation_loss",
    "strategy_parameters",
    "clip_tensors",
]

STRATEGIES = ("none", "layernorm", "last_block", "full", "lora", "ewc", "reset", "replay", "hope", "hope+ttt")
# Strategies (and reference models) that use information a deployed model would not have.
PRIVILEGED = ("replay", "oracle", "joint")

_TTT_PARAMS = ("layernorm", "last_block", "full")


@dataclasses.dataclass
class AdaptOptions(Config):
    """The options of adapt_stream (module docstring): what each strategy uses, with its defaults and checks."""

    WHAT: ClassVar[str] = "adaptation option"
    lr: float = setting(1e-3, at_least(0))
    steps: int = setting(1, at_least(0))
    optimizer: str = setting("adamw", one_of("adamw", "sgd"))
    weight_decay: float = setting(0.0, at_least(0))
    rollout_steps: int = setting(2, at_least(0))
    rollout_weight: float = setting(1.0, at_least(0))
    grad_clip: float | None = setting(1.0, at_least(0))  # 0 or None: no clipping
    guard_factor: float = setting(10.0, greater_than(0))
    lora_rank: int = setting(4, at_least(1))
    lora_alpha: float = 8.0
    merge_lora: bool = True
    ewc_lambda: float = setting(100.0, at_least(0))
    fisher_clips: Any = None  # A1 training clips (ewc)
    reset_every: int = setting(10, at_least(1))
    replay_clips: Any = None  # the A1 buffer (replay)
    replay_size: int = setting(2, at_least(0))
    carry_memory: bool = True
    cms_lr: float = setting(1e-3, at_least(0))
    cms_periods: list[int] | None = None  # None: the model's own
    memory_lr_scale: float = setting(1.0, finite_positive)
    ttt_params: str = setting("layernorm", one_of(*_TTT_PARAMS))
    score_horizon: int | None = setting(None, at_least(1))  # None: T - 1
    seed: int = 0
    progress: bool = False
    desc: str | None = None
    callback: Any = None  # callback(i, model) after each clip
    compile: bool = False  # the predictor's forward under torch.compile


@dataclasses.dataclass
class StreamLog:
    """Per-clip scores of one prequential run. Lists are indexed by stream position.

    tf[i]: teacher-forcing L1 of clip i (before adapting on it); rollout[i][h]: rollout L1 at horizon h+1;
    copy_tf / copy_rollout: the copy-last-latent baseline on the same clip; phases[i]: phase name;
    heldout[phase_end][phase] = {"tf": ..., "rollout": ...}: mean held-out errors after the last clip of
    phase_end (R[i][j]); rollbacks: divergence-guard rollbacks; updates: clips adapted on; nonfinite: the clips
    whose score is NaN or Inf, [{"position", "clip", "phase"}] (the metrics leave them out of every mean).
    """

    strategy: str
    phases: list = dataclasses.field(default_factory=list)
    tf: list = dataclasses.field(default_factory=list)
    rollout: list = dataclasses.field(default_factory=list)
    copy_tf: list = dataclasses.field(default_factory=list)
    copy_rollout: list = dataclasses.field(default_factory=list)
    clip_index: list = dataclasses.field(default_factory=list)
    heldout: dict = dataclasses.field(default_factory=dict)
    rollbacks: int = 0
    updates: int = 0
    seconds: float = 0.0
    options: dict = dataclasses.field(default_factory=dict)
    nonfinite: list = dataclasses.field(default_factory=list)

    def errors(self, metric: str = "tf") -> list[float]:
        """Per-clip error curve: "tf", "rollout" (mean over horizons), "rollout_last", "copy_tf", "copy_rollout"."""
        if metric == "tf":
            return list(self.tf)
        if metric == "rollout":
            return [sum(r) / len(r) for r in self.rollout]
        if metric == "rollout_last":
            return [r[-1] for r in self.rollout]
        if metric == "copy_tf":
            return list(self.copy_tf)
        if metric == "copy_rollout":
            return [sum(r) / len(r) for r in self.copy_rollout]
        raise ValueError(f"metric must be tf|rollout|rollout_last|copy_tf|copy_rollout, got {metric!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StreamLog:
        if not isinstance(d, dict) or "strategy" not in d or "tf" not in d:
            raise ValueError("not a StreamLog dict: expected keys 'strategy', 'tf', ...")
        names = {f.name for f in dataclasses.fields(cls)}
        log = cls(**{k: v for k, v in d.items() if k in names})
        # strict JSON stores a NaN/Inf score as null (io.jsonable): back to NaN, so it stays non-finite
        nan = lambda x: math.nan if x is None else x  # noqa: E731
        log.tf, log.copy_tf = [nan(x) for x in log.tf], [nan(x) for x in log.copy_tf]
        log.rollout = [[nan(x) for x in r] for r in log.rollout]
        log.copy_rollout = [[nan(x) for x in r] for r in log.copy_rollout]
        return log


# ---------------------------------------------------------------------------------------------- scoring


def clip_tensors(clip: dict, device="cpu"):
    """Clip dict -> (z (1, T, N, D) float32, actions (1, T, A) float32, states (1, T, S) or None)."""
    if not isinstance(clip, dict) or "latents" not in clip or "actions" not in clip:
        raise ValueError("a clip must be a dict with 'latents' (T, N, D) and 'actions' (T, A)")
    z = torch.as_tensor(clip["latents"]).to(device=device, dtype=torch.float32)
    a = torch.as_tensor(clip["actions"]).to(device=device, dtype=torch.float32)
    if z.ndim != 3:
        raise ValueError(f"clip latents must be (T, N, D), got {tuple(z.shape)}")
    if a.ndim != 2 or a.shape[0] != z.shape[0]:
        raise ValueError(f"clip actions must be (T, A) with T = {z.shape[0]}, got {tuple(a.shape)}")
    if z.shape[0] < 2:
        raise ValueError(f"a clip needs T >= 2 timesteps to score, got T = {z.shape[0]}")
    s = clip.get("states")
    s = None if s is None else torch.as_tensor(s).to(device=device, dtype=torch.float32)[None]
    # named here: inside a model a NaN latent shows up only as, say, a HOPE gate out of range, or as a NaN score
    bad = [
        name
        for name, x in (("latents", z), ("actions", a), ("states", s))
        if x is not None and not torch.isfinite(x).all()
    ]
    if bad:
        raise ValueError(
            f"clip {clip.get('index')} (phase {clip.get('phase')}): {' and '.join(bad)} contain NaN or inf"
        )
    return z[None], a[None], s


def _rollout(model, z, a, s, steps: int):
    kw = {} if s is None else {"states": s}
    return model.rollout(z[:, :1], a, steps, **kw)


def _forward(model, z, a, s):
    return model(z, a) if s is None else model(z, a, s)


def _copy_scores(z, horizon: int):
    """Copy-last-latent baseline: predict layer_norm(z_t) for z_{t+1} (tf) and layer_norm(z_0) for z_h (rollout)."""
    zn = F.layer_norm(z, z.shape[-1:], eps=1e-6)
    tf = l1_rollout_loss(zn[:, :-1], z[:, 1:])[0]
    ro = l1_rollout_loss(zn[:, :1].expand(-1, horizon, -1, -1), z[:, 1 : horizon + 1])[1]
    return float(tf), [float(x) for x in ro]


@torch.no_grad()
def score_clip(model: nn.Module, clip: dict, horizon: int | None = None) -> dict:
    """Score one clip without changing the model: {"tf": float, "rollout": [L1 at horizon 1..H],
    "copy_tf": float, "copy_rollout": [...]}. Rollout starts from the first timestep (H = T-1 by default)."""
    device = next(model.parameters()).device
    z, a, s = clip_tensors(clip, device)
    T = z.shape[1]
    H = T - 1 if horizon is None else int(horizon)
    if not 1 <= H <= T - 1:
        raise ValueError(f"horizon must be in [1, T-1] = [1, {T - 1}], got {H}")
    mem = _capture_memory(model)
    tf = l1_rollout_loss(_forward(model, z, a, s)[:, :-1], z[:, 1:])[0]
    _restore_memory(model, mem)
    ro = l1_rollout_loss(_rollout(model, z, a, s, H), z[:, 1 : H + 1])[1]
    _restore_memory(model, mem)
    copy_tf, copy_ro = _copy_scores(z, H)
    return {"tf": float(tf), "rollout": [float(x) for x in ro], "copy_tf": copy_tf, "copy_rollout": copy_ro}


def adaptation_loss(
    model: nn.Module, clips: Sequence[dict], rollout_steps: int = 2, rollout_weight: float = 1.0
) -> torch.Tensor:
    """Mean over `clips` of  L1_tf + rollout_weight * L1 of the last state of a `rollout_steps` rollout."""
    device = next(model.parameters()).device
    total = 0.0
    for clip in clips:
        z, a, s = clip_tensors(clip, device)
        loss = 0.0
        k = min(int(rollout_steps), z.shape[1] - 1)
        # rollout first: a carried-memory model reads its stored memory in a rollout but stores only on forward
        if rollout_weight and k >= 1:
            pred = _rollout(model, z, a, s, k)
            loss = rollout_weight * l1_rollout_loss(pred[:, -1:], z[:, k : k + 1])[0]
        loss = loss + l1_rollout_loss(_forward(model, z, a, s)[:, :-1], z[:, 1:])[0]
        total = total + loss
    return total / len(clips)


# ------------------------------------------------------------------------------------- memory snapshots


def _capture_memory(model: nn.Module) -> dict | None:
    """A copy of the memory a carried-memory model keeps between forwards (`model.memory_state()`); None when
    the model does not carry memory (nothing to protect)."""
    if not getattr(model, "carry_memory", False):
        return None
    return {k: v.detach().clone() for k, v in model.memory_state().items()}


def _restore_memory(model: nn.Module, snap: dict | None) -> None:
    if snap is not None:
        model.load_memory_state({k: v.clone() for k, v in snap.items()})


# ---------------------------------------------------------------------------------------------- strategies


def _cms_levels(model, periods=None):
    if not hasattr(model, "cms_levels"):
        return []
    levels = [(int(p), list(ps)) for p, ps in model.cms_levels()]
    if periods is not None:
        if len(periods) != len(levels):
            raise ValueError(f"cms_periods must have one period per CMS level ({len(levels)}), got {list(periods)}")
        levels = [(int(p), ps) for p, (_, ps) in zip(periods, levels)]
    return levels


def strategy_parameters(model: nn.Module, strategy: str, ttt_params: str = "layernorm") -> list[nn.Parameter]:
    """The model parameters an optimizer may change under `strategy` (CMS parameters of hope / hope+ttt are
    changed by the CMS rule, not listed here; lora trains adapters, not model parameters)."""
    if strategy in ("none", "hope", "lora"):
        return []
    if strategy == "layernorm":
        return list(model.layernorm_parameters())
    if strategy == "last_block":
        return list(model.blocks[-1].parameters())
    if strategy in ("full", "ewc", "reset", "replay"):
        return list(model.parameters())
    if strategy == "hope+ttt":
        if ttt_params not in _TTT_PARAMS:
            raise ValueError(f"ttt_params must be layernorm|last_block|full, got {ttt_params!r}")
        cms = {id(p) for _, ps in _cms_levels(model) for p in ps}
        return [p for p in strategy_parameters(model, ttt_params) if id(p) not in cms]
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


class _LoRA:
    """Low-rank adapters on every nn.Linear inside model.blocks, added by forward hooks (base weights untouched):
    y = W x + b + (alpha / r) * B (A x), A ~ N(0, 1/in) (r, in), B = 0 (out, r)."""

    def __init__(self, model: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        self.scale = alpha / rank
        self.layers, self.params, self.handles = [], [], []
        for mod in model.blocks.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight
                A = nn.Parameter(torch.randn(rank, w.shape[1], generator=generator).to(w) / math.sqrt(w.shape[1]))
                B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
                self.layers.append((mod, A, B))
                self.params += [A, B]
                self.handles.append(mod.register_forward_hook(self._hook(A, B)))

    def _hook(self, A, B):
        def hook(mod, inputs, out):
            return out + self.scale * F.linear(F.linear(inputs[0], A), B)

        return hook

    def remove(self, merge: bool) -> None:
        for h in self.handles:
            h.remove()
        if merge:
            with torch.no_grad():
                for mod, A, B in self.layers:
                    mod.weight.add_(self.scale * (B @ A))


def _fisher(model, params, clips, loss_kw) -> list[torch.Tensor]:
    """Empirical Fisher diagonal: mean over clips of the squared gradient of the adaptation loss."""
    if not clips:
        raise ValueError("strategy 'ewc' needs fisher_clips (A1 training clips), got none")
    fisher = [torch.zeros_like(p) for p in params]
    mem = _capture_memory(model)
    for clip in clips:
        grads = torch.autograd.grad(adaptation_loss(model, [clip], **loss_kw), params, allow_unused=True)
        _restore_memory(model, mem)
        for f, g in zip(fisher, grads):
            if g is not None:
                f.add_(g.detach() ** 2)
    return [f / len(clips) for f in fisher]


def _make_optimizer(params, o):
    if o["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
    if o["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], weight_decay=o["weight_decay"])
    raise ValueError(f"optimizer must be adamw|sgd, got {o['optimizer']!r}")


def _finite_loss(x: float) -> bool:
    return math.isfinite(x)


def _memory_finite(model: nn.Module) -> bool:
    """False when a carried memory holds a NaN/Inf (the next forward would fail or spread it)."""
    snap = _capture_memory(model)

    def ok(v):
        if isinstance(v, torch.Tensor):
            return bool(torch.isfinite(v).all()) if v.is_floating_point() else True
        if isinstance(v, (list, tuple)):
            return all(ok(x) for x in v)
        return True

    return snap is None or all(ok(v) for v in snap.values())


# ------------------------------------------------------------------------------------------------ stream


def _phase_ends(clips: Sequence[dict]) -> set[int]:
    ends = set()
    for i, c in enumerate(clips):
        if i == len(clips) - 1 or clips[i + 1].get("phase") != c.get("phase"):
            ends.add(i)
    return ends


@torch.no_grad()
def _heldout_errors(model, heldout: dict, horizon) -> dict:
    out = {}
    for phase, clips in heldout.items():
        if not clips:
            continue
        scores = [score_clip(model, c, horizon) for c in clips]
        out[phase] = {
            "tf": sum(s["tf"] for s in scores) / len(scores),
            "rollout": sum(sum(s["rollout"]) / len(s["rollout"]) for s in scores) / len(scores),
        }
    return out


def adapt_stream(model: nn.Module, stream, strategy: str, **options: Any) -> StreamLog:
    """Run `strategy` prequentially over `stream` (an object with `.clips`, a list of clip dicts in order, and
    optionally `.heldout`, phase -> list of clip dicts; or a plain list of clips). Adapts `model` in place and
    returns the StreamLog. Options (`AdaptOptions`, its defaults and checks): lr, steps, optimizer ("adamw" | "sgd"),
    weight_decay, rollout_steps, rollout_weight (adaptation loss), grad_clip, guard_factor, lora_rank,
    lora_alpha, merge_lora, ewc_lambda, fisher_clips, reset_every, replay_clips, replay_size, carry_memory,
    cms_lr, cms_periods, memory_lr_scale, ttt_params, score_horizon, seed, progress, desc, callback(i, model)
    after each clip, compile (the model's forward runs under torch.compile for the stream; restored after).
    """
    import time

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    opts = AdaptOptions.from_dict(options)  # unknown options: UnknownKeysError, a TypeError
    o = {k: getattr(opts, k) for k in AdaptOptions.field_names()}  # not to_dict: clip buffers, callback as they are
    clips = list(stream.clips if hasattr(stream, "clips") else stream)
    heldout = dict(getattr(stream, "heldout", None) or {})
    if not clips:
        raise ValueError("the stream has no clips")
    is_hope = strategy in ("hope", "hope+ttt")
    if is_hope and not hasattr(model, "cms_levels"):
        raise ValueError(
            f"strategy {strategy!r} needs a HOPE predictor (model.kind 'hope'), "
            f"got kind {getattr(model, 'kind', type(model).__name__)!r}"
        )
    rng = random.Random(o["seed"])
    gen = torch.Generator().manual_seed(int(o["seed"]))
    loss_kw = dict(rollout_steps=o["rollout_steps"], rollout_weight=o["rollout_weight"])
    t0 = time.perf_counter()

    scale = float(o["memory_lr_scale"])
    if scale != 1.0 and not is_hope:
        raise ValueError(f"memory_lr_scale scales a HOPE memory's step size; strategy {strategy!r} has none")
    had_carry = getattr(model, "carry_memory", None)
    if had_carry is not None:
        model.carry_memory = bool(is_hope and o["carry_memory"])
        if hasattr(model, "reset_memory"):
            model.reset_memory()
    was_training = model.training
    model.eval()

    lora = _LoRA(model, int(o["lora_rank"]), float(o["lora_alpha"]), gen) if strategy == "lora" else None
    params = lora.params if lora else strategy_parameters(model, strategy, o["ttt_params"])
    opt = _make_optimizer(params, o) if params and int(o["steps"]) > 0 else None
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_anchor = copy.deepcopy(opt.state_dict()) if opt else None
    ewc = None
    if strategy == "ewc":
        ewc = (_fisher(model, params, list(o["fisher_clips"] or []), loss_kw), [p.detach().clone() for p in params])
    replay = list(o["replay_clips"] or [])
    if strategy == "replay" and not replay:
        raise ValueError("strategy 'replay' needs replay_clips (an A1 buffer), got none")
    cms = _cms_levels(model, o["cms_periods"]) if is_hope else []
    cms_params = [p for _, ps in cms for p in ps]
    periods = CMSPeriods(model, cms)
    cms_count = [0]  # clips whose CMS gradient was accumulated (a rolled-back clip's is not)
    cms_opts = [_make_optimizer(ps, {**o, "lr": o["cms_lr"]}) for _, ps in cms]
    adapt_params = list(params) + cms_params

    log = StreamLog(
        strategy=strategy, options={k: v for k, v in o.items() if k not in ("fisher_clips", "replay_clips", "callback")}
    )
    ends = _phase_ends(clips)
    it = range(len(clips))
    if o["progress"]:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=o["desc"] or strategy, leave=False, unit="clip")
    # the memory modules read eta_max on every forward; restored below whatever happens
    mems = [m for m in model.modules() if hasattr(m, "eta_max")] if is_hope else []
    etas = [m.eta_max for m in mems]
    try:
        for m in mems:
            m.eta_max = m.eta_max * scale
        with compiled_forward(model, o["compile"]):  # plain forward again afterwards
            for i in it:
                clip = clips[i]
                # (1) predict and score first ...
                s = score_clip(model, clip, o["score_horizon"])
                log.phases.append(str(clip.get("phase", "")))
                log.clip_index.append(int(clip.get("index", i)))
                log.tf.append(s["tf"])
                log.rollout.append(s["rollout"])
                log.copy_tf.append(s["copy_tf"])
                log.copy_rollout.append(s["copy_rollout"])
                if not all(math.isfinite(x) for x in (s["tf"], *s["rollout"])):
                    _name_nonfinite(log, i, s)
                # (2) ... then adapt on the clip
                if strategy != "none":
                    _adapt_clip(
                        model,
                        clip,
                        strategy,
                        o,
                        opt,
                        params,
                        ewc,
                        replay,
                        rng,
                        periods,
                        cms_count,
                        cms_opts,
                        adapt_params,
                        loss_kw,
                        log,
                    )
                if strategy == "reset" and (i + 1) % int(o["reset_every"]) == 0:
                    # the next clip is scored by the stream-start (A1) weights again
                    model.load_state_dict(anchor)
                    if opt:
                        opt.load_state_dict(copy.deepcopy(opt_anchor))
                if i in ends and heldout:
                    log.heldout[log.phases[-1]] = _heldout_errors(model, heldout, o["score_horizon"])
                if o["callback"] is not None:
                    o["callback"](i, model)
    finally:
        for m, eta in zip(mems, etas):
            m.eta_max = eta
        if lora:
            lora.remove(bool(o["merge_lora"]))
        model.train(was_training)
    log.seconds = time.perf_counter() - t0
    return log


def _name_nonfinite(log: StreamLog, i: int, score: dict) -> None:
    bad = {"position": i, "clip": log.clip_index[-1], "phase": log.phases[-1]}
    log.nonfinite.append(bad)
    warnings.warn(
        f"clip {bad['clip']} (phase {bad['phase']}, stream position {i}) scored teacher-forcing "
        f"{score['tf']}, rollout {score['rollout']}: left out of the phase means",
        stacklevel=3,
    )


def _adapt_clip(
    model, clip, strategy, o, opt, params, ewc, replay, rng, periods, cms_count, cms_opts, adapt_params, loss_kw, log
) -> None:
    mem0 = _capture_memory(model)
    if not adapt_params:
        # hope with CMS off: only the memory moves on, via one forward over the clip
        if mem0 is not None:
            with torch.no_grad():
                loss = float(adaptation_loss(model, [clip], **loss_kw))
            if not _finite_loss(loss) or not _memory_finite(model):
                _restore_memory(model, mem0)
                log.rollbacks += 1
        return
    saved = [p.detach().clone() for p in adapt_params]
    opt_saved = copy.deepcopy(opt.state_dict()) if opt else None
    acc_saved = dict(periods.acc)
    count_saved = list(cms_count)
    cms_opts_saved = [copy.deepcopy(x.state_dict()) for x in cms_opts]

    def loss_on(batch):
        _restore_memory(model, mem0)
        loss = adaptation_loss(model, batch, **loss_kw)
        if ewc is not None:
            fisher, star = ewc
            loss = loss + 0.5 * o["ewc_lambda"] * sum((f * (p - s) ** 2).sum() for f, p, s in zip(fisher, params, star))
        return loss

    before = None
    # CMS: one gradient per clip into each level's accumulator; every C_l clips a level's optimizer steps on the
    # mean (clipped like the other strategies' gradients).
    if periods.levels:
        cms_params = [p for _, ps in periods.levels for _, p in ps]
        loss = loss_on([clip])
        before = float(loss.detach())
        grads = torch.autograd.grad(loss, cms_params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(cms_params, grads):
                p.grad = g
            cms_count[0] += 1
            for li in periods.apply(cms_count[0]):
                ps = [p for _, p in periods.levels[li][1]]
                if o["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(ps, float(o["grad_clip"]))
                cms_opts[li].step()
            for p in cms_params:
                p.grad = None
    if opt is not None:
        for _ in range(int(o["steps"])):
            batch = [clip]
            if strategy == "replay":
                batch += rng.sample(replay, min(int(o["replay_size"]), len(replay)))
            opt.zero_grad(set_to_none=True)
            loss = loss_on(batch)
            if before is None:
                before = float(loss.detach())
            loss.backward()
            if o["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, float(o["grad_clip"]))
            opt.step()
    if before is None:
        return
    with torch.no_grad():
        after = float(loss_on([clip]))  # also leaves the memory at clip i's end state under the new weights
    log.updates += 1
    if (
        not _finite_loss(after)
        or not _finite_loss(before)
        or after > o["guard_factor"] * before
        or not _memory_finite(model)
    ):
        with torch.no_grad():
            for p, v in zip(adapt_params, saved):
                p.copy_(v)
        if opt:
            opt.load_state_dict(opt_saved)
        periods.acc = acc_saved
        cms_count[:] = count_saved
        for x, st in zip(cms_opts, cms_opts_saved):
            x.load_state_dict(st)
        _restore_memory(model, mem0)
        log.rollbacks += 1
