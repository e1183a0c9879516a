"""Training (docs/design.md#training): loss = teacher-forcing L1 + w(step) * rollout L1, AdamW +
warmup-stable-decay LR, gradient clipping, bf16 autocast on GPU, atomic safetensors checkpoints with exact resume,
JSONL log, progress bar, DDP under torchrun (gloo on CPU, nccl on GPU).

    result = train({"model": "hope", "data": "data/quick", "steps": 300, "out": "runs/hope"})

Determinism: the batch of step s is a function of (seed, s) only, so a resumed run and an uninterrupted run
see the same data; under DDP each rank takes its slice of the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from hope_kernels.config import PredictorConfig, TrainConfig
from hope_kernels.io import FolderLock, atomic_write, atomic_write_bytes, read_safetensors, remove_temp_files
from hope_kernels.models import build_predictor, load_state_exactly, predictor_from_config
from hope_kernels.ops import l1_rollout_loss

try:  # the data package lands in its own branch; train() raises a clear error without it
    from hope_kernels.data import ClipDataset
except ImportError:  # pragma: no cover
    ClipDataset = None

CKPT_NAME = "checkpoint.safetensors"
LOG_NAME = "train_log.jsonl"


@dataclass
class TrainResult:
    model: torch.nn.Module
    checkpoint: str | None
    history: list = field(default_factory=list)


# ---------------------------------------------------------------- losses and schedules
def prediction_losses(model, z, actions, states=None, rollout_steps: int = 2, rollout_score: str = "last") -> dict:
    """Teacher-forcing and rollout L1 (both through `l1_rollout_loss`, targets layer-normalised).

    tf: z_hat[:, t] vs z[:, t+1] for t < T-1 (the seed's teacher-forcing loss).
    rollout: from z[:, :1] with the true actions, `rollout_steps` autoregressive steps; "last" scores only
    the last prediction against z[:, rollout_steps] (the seed's rollout loss), "all" every step. The rollout
    runs first, so a HOPE model carrying memory rolls out from the state before this clip.
    """
    T = z.shape[1]
    if T < 2:
        raise ValueError(f"prediction losses need T >= 2 timesteps, got z {tuple(z.shape)}")
    out = {}
    steps = min(int(rollout_steps), T - 1)
    if steps > 0:
        r = model.rollout(z[:, :1], actions, steps, states)
        tgt = z[:, 1:1 + steps]
        if rollout_score == "last":
            r, tgt = r[:, -1:], tgt[:, -1:]
        out["rollout"] = l1_rollout_loss(r.float(), tgt.float())[0]
    else:
        out["rollout"] = z.new_zeros((), dtype=torch.float32)
    z_hat = model(z, actions, states)
    out["tf"] = l1_rollout_loss(z_hat[:, :-1].float(), z[:, 1:].float())[0]
    return out


def copy_last_loss(z) -> torch.Tensor:
    """Copy-last-latent baseline on the teacher-forcing loss: z_hat[:, t] = layer_norm(z[:, t])."""
    zn = torch.nn.functional.layer_norm(z.float(), z.shape[-1:])
    return l1_rollout_loss(zn[:, :-1], z[:, 1:].float())[0]


def rollout_weight(step: int, total: int, w0: float, w1: float, schedule: str = "linear") -> float:
    """w ramps from w0 (step 0) to w1 (last step)."""
    frac = min(max(step / max(total - 1, 1), 0.0), 1.0)
    if schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    elif schedule != "linear":
        raise ValueError(f"rollout_schedule must be 'linear' or 'cosine', got {schedule!r}")
    return w0 + (w1 - w0) * frac


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup over `warmup` steps, constant, linear decay to 0 over the last
    `decay_frac` of the steps."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    n_decay = int(round(cfg.decay_frac * cfg.steps))
    start = cfg.steps - n_decay
    if n_decay > 0 and step >= start:
        return cfg.lr * (cfg.steps - step) / (n_decay + 1)
    return cfg.lr


# ---------------------------------------------------------------- data
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
    return perm[k * batch:(k + 1) * batch]


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


# ---------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    st = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            st[f"rng.cuda.{i}"] = s
    return st


def save_checkpoint(path, model, optimizer, step: int, config, cms_grads: dict | None = None) -> str:
    """Atomic safetensors checkpoint: model weights, AdamW state, step, RNG states, configs, the CMS
    gradients accumulated since each level's last update ({parameter name: tensor}, cms_train_periods) and a
    HOPE model's carried memory (memory_reset_every > 1)."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({f"cms_grad.{k}": v.detach().contiguous().cpu() for k, v in (cms_grads or {}).items()})
    tensors.update({f"memory.{k}": v.contiguous().cpu() for k, v in model.memory_state().items()})
    opt_meta = None
    if optimizer is not None:
        osd = optimizer.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
        opt_meta = osd["param_groups"]
    tensors.update({k: v.contiguous() for k, v in _rng_state().items()})
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    meta = {"format": "hope-kernels-checkpoint-1", "step": str(int(step)), "kind": model.kind,
            "predictor_config": json.dumps(model.config.to_dict()), "train_config": json.dumps(cfg),
            "optimizer_param_groups": json.dumps(opt_meta),
            "python_rng": json.dumps(_py_rng_to_json(random.getstate())),
            "numpy_rng": json.dumps(_np_rng_to_json(np.random.get_state()))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return os.fspath(path)


def _py_rng_to_json(st):
    return [st[0], list(st[1]), st[2]]


def _np_rng_to_json(st):
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def load_checkpoint(path, device="cpu"):
    """-> (model, state) with state = {step, config, predictor_config, optimizer (state_dict or None), rng,
    cms_grads ({parameter name: accumulated gradient}), memory (a HOPE training run's carried memory, {} if
    none)}."""
    path = os.fspath(path)
    meta, tensors = read_safetensors(path, "checkpoint")
    if meta.get("format") != "hope-kernels-checkpoint-1":
        raise ValueError(f"{path!r} is not a hope-kernels checkpoint (metadata format={meta.get('format')!r})")
    try:
        stored = json.loads(meta["predictor_config"])
        # checkpoints written before these fields existed: absolute output, no input stem
        stored.setdefault("predict_delta", False)
        stored.setdefault("stem_kernel", 0)
        pcfg = PredictorConfig.from_dict(stored)
        step, train_config = int(meta["step"]), json.loads(meta["train_config"])
        groups = json.loads(meta.get("optimizer_param_groups") or "null")
        py_rng, np_rng = json.loads(meta["python_rng"]), json.loads(meta["numpy_rng"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"checkpoint {path!r} has corrupt metadata: {type(e).__name__}: {e}") from None
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"checkpoint {path!r} holds NaN or inf in {len(bad)} tensor(s), first {bad[0]!r}")
    model = predictor_from_config(pcfg)
    try:
        load_state_exactly(model, weights)
    except ValueError as e:
        raise ValueError(f"checkpoint {path!r}: its weights do not fit its own predictor config: {e}") from None
    model.to(device)
    opt = None
    if groups is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt = {"state": state, "param_groups": groups}
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    rng["python"], rng["numpy"] = py_rng, np_rng
    cms_grads = {k[len("cms_grad."):]: v for k, v in tensors.items() if k.startswith("cms_grad.")}
    memory = {k[len("memory."):]: v for k, v in tensors.items() if k.startswith("memory.")}
    return model, {"step": step, "config": train_config, "predictor_config": pcfg, "optimizer": opt, "rng": rng,
                   "cms_grads": cms_grads, "memory": memory}


def _restore_rng(rng: dict):
    torch.set_rng_state(rng["rng.torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    p = rng["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = rng["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _read_log(path: str, upto: int) -> list:
    """Entries of the JSONL log `path` with step <= upto. A partial last line (a run killed while appending)
    is dropped with a warning; any other bad line raises naming the file and line."""
    with open(path) as f:
        lines = f.read().splitlines()
    history = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            step = rec["step"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped its partial last line {i + 1} (a run stopped while writing it)")
                break
            raise ValueError(f"{path} line {i + 1} is not a log entry: {line[:80]!r}") from None
        if step <= upto:
            history.append(rec)
    return history


# settings a resumed run may change without leaving the uninterrupted run's trajectory (not `steps`: the
# learning-rate and rollout-weight schedules are fractions of it)
_FREE_ON_RESUME = {"out", "resume", "overwrite", "progress", "ckpt_every", "log_every", "device", "data"}


def _warn_changed_settings(ckpt_path: str, stored: dict, now: dict) -> None:
    """Resuming with another seed, batch size, learning rate, ... is allowed, but it no longer reproduces the
    uninterrupted run: say which settings differ."""
    changed = sorted(k for k in stored if k not in _FREE_ON_RESUME and
                     json.dumps(stored.get(k), sort_keys=True) != json.dumps(now.get(k), sort_keys=True, default=list))
    if changed:
        diffs = ", ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in changed)
        warnings.warn(f"resuming {ckpt_path} with other settings than it was trained with ({diffs}); the run "
                      f"will not reproduce an uninterrupted one")


# ---------------------------------------------------------------- training loop
def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device. CUDA without CUDA raises here, before any work;
    'cuda' without an index means this process's LOCAL_RANK."""
    cuda_index = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        return torch.device(f"cuda:{cuda_index}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r}: CUDA requested but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", cuda_index)
    return device


def _dist_setup(device_cfg: str):
    device = resolve_device(device_cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _param_groups(model, wd):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class _CMSPeriods:
    """cms_train_periods: a level with period p > 1 keeps the sum of its (clipped) gradients between updates and
    gets their mean as its gradient on every p-th optimiser step (global step numbers, so a resumed run
    updates on the same steps); on the other steps its grads are set to None, so AdamW leaves those parameters
    and their moments untouched."""

    def __init__(self, model, enabled: bool):
        levels = model.cms_levels() if enabled and hasattr(model, "cms_levels") else []
        names = {id(p): n for n, p in model.named_parameters()}
        self.levels = [(int(period), [(names[id(p)], p) for p in ps]) for period, ps in levels if period > 1]
        self.acc: dict[str, torch.Tensor] = {}

    def apply(self, step: int) -> None:
        """Call between clipping and optimizer.step() of step index `step` (0-based)."""
        for period, params in self.levels:
            due = (step + 1) % period == 0
            for name, p in params:
                if p.grad is None:
                    continue
                total = p.grad if name not in self.acc else self.acc.pop(name) + p.grad
                if due:
                    p.grad = total / period
                else:   # p.grad is dropped here, so the stored tensor is not aliased by later steps
                    self.acc[name] = total.detach()
                    p.grad = None


def train(config, dataset=None) -> TrainResult:
    """Train a predictor. `config`: TrainConfig or dict of its fields. `dataset`: optional in-memory dataset
    (ClipDataset interface) used instead of `config.data`."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    out = cfg.out
    ckpt_path = os.path.join(out, CKPT_NAME) if out else None
    log_path = os.path.join(out, LOG_NAME) if out else None
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"out {out!r} is a file, not a folder")
    if cfg.resume and not (ckpt_path and os.path.exists(ckpt_path)):
        raise FileNotFoundError(f"resume: no checkpoint at {ckpt_path!r} to continue" if ckpt_path else
                                "resume needs 'out', the folder holding the checkpoint")
    rank, world, device = _dist_setup(cfg.device)
    if not (out and rank == 0):
        return _train(cfg, dataset, ckpt_path, log_path, rank, world, device)
    # one writer per folder; temp files a killed run left are removed once the lock is ours
    with FolderLock(out, "train --out"):
        remove_temp_files(out)
        return _train(cfg, dataset, ckpt_path, log_path, rank, world, device)


def _train(cfg: TrainConfig, dataset, ckpt_path, log_path, rank: int, world: int, device) -> TrainResult:
    if ckpt_path and os.path.exists(ckpt_path) and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{ckpt_path} already exists: pass resume (--resume) to continue it or overwrite "
                         f"(--overwrite) to start over")
    if cfg.batch_size % (world * cfg.seq_clips):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world} "
                         f"times seq_clips {cfg.seq_clips}")
    ds = dataset if dataset is not None else _load_dataset(cfg)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_predictor(cfg.model, cfg.preset, enc_dim=ds.enc_dim, grid=tuple(ds.grid),
                            action_dim=ds.action_dim, state_dim=ds.state_dim, **cfg.overrides).to(device)
    # fused: the only AdamW that honours found_inf, which skips a non-finite step on the device (below)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    start, history = 0, []
    cms = _CMSPeriods(model, cfg.cms_train_periods)
    if cfg.resume:
        loaded, st = load_checkpoint(ckpt_path)
        if loaded.config != model.config:
            raise ValueError(f"checkpoint {ckpt_path} was trained with a different predictor config: "
                             f"{loaded.config} vs {model.config}")
        model.load_state_dict(loaded.state_dict())
        if st["optimizer"] is not None:
            opt.load_state_dict(st["optimizer"])
        _restore_rng(st["rng"])
        cms.acc = {k: v.to(device) for k, v in st["cms_grads"].items()}
        model.load_memory_state({k: v.to(device) for k, v in st["memory"].items()})
        start = st["step"]
        _warn_changed_settings(ckpt_path, st["config"], cfg.to_dict())
        if os.path.exists(log_path):
            history = _read_log(log_path, start)
    if rank == 0 and log_path:
        # rewrite: drops entries past the resumed checkpoint (and a partial last line)
        atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in history).encode())

    local = cfg.batch_size // world
    sequential = cfg.seq_clips > 1 or cfg.memory_reset_every > 1
    if sequential:   # the memory carries from clip to clip with its graph; detached at the end of each step
        model.carry_memory, model.memory_grad = True, True
    amp = device.type == "cuda"
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", unit="step")
    # A step queues its work and leaves its numbers on the device: the host reads them (one synchronisation,
    # marked "sync" below) only at log steps, checkpoint steps and the last step. A non-finite loss or gradient
    # norm skips that step's update on the device (AdamW's found_inf, as torch.amp.GradScaler uses it); the next
    # read names the first such step and stops before any later checkpoint is written. Non-finite inputs are
    # found on the host, before the copy to the device, and stop at once.
    pending: list[tuple[int, float, float, torch.Tensor]] = []   # (step, lr, w, stats)
    t_last, ckpt_written = time.perf_counter(), None

    def stop(step: int, what: str):
        if bar is not None:
            bar.close()
        raise RuntimeError(f"training stopped at step {step + 1}: {what}; no checkpoint was written for this "
                           f"step" + (f" (last good checkpoint: {ckpt_written})" if ckpt_written else ""))

    def flush():
        """Reads the pending steps' numbers (one sync), stops at the first non-finite one, logs the others."""
        nonlocal t_last
        if not pending:
            return
        rows = torch.stack([p[-1] for p in pending]).tolist()   # sync
        now = time.perf_counter()
        rate = cfg.batch_size * len(pending) / max(now - t_last, 1e-9)   # the mean over the flushed steps
        t_last = now
        lines = []

        def write_log():   # one open per read; the steps before a non-finite one are logged too
            if rank == 0 and log_path and lines:
                with open(log_path, "a") as f:
                    f.writelines(lines)

        for (step, lr, w, _), (l_all, l_tf, l_ro, gn, bad) in zip(pending, rows):
            if bad:
                write_log()
                if not math.isfinite(l_all):
                    stop(step, f"loss is {l_all} (not finite)")
                if not math.isfinite(gn):
                    stop(step, f"gradient norm is {gn} (not finite); parameters left as they were")
                stop(step, "another process's loss or gradient norm is not finite")
            rec = {"step": step + 1, "loss": l_all, "tf": l_tf, "rollout": l_ro, "rollout_w": w, "lr": lr,
                   "grad_norm": None if cfg.grad_clip <= 0 else gn, "clips_per_s": rate}
            history.append(rec)
            lines.append(json.dumps(rec) + "\n")
        write_log()
        if bar is not None:
            bar.update(len(pending))
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", clips_s=f"{rate:.1f}")
        pending.clear()

    no_norm = torch.zeros((), device=device)
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = _batch_indices(step, len(ds), cfg.batch_size, cfg.seed)[rank * local:(rank + 1) * local]
        bad_in: list[str] = []
        z, a, s = _collate(ds, idx, device, bad_in)
        # non-finite inputs are named with their clips here: inside the model an op would only see, say, a NaN gate
        if bad_in:
            flush()   # an earlier pending step may have gone wrong first
            stop(step, f"the batch's {' and '.join(bad_in)} contain NaN or inf (dataset clips {idx.tolist()})")
        w = rollout_weight(step, cfg.steps, cfg.rollout_w0, cfg.rollout_w1, cfg.rollout_schedule)
        opt.zero_grad(set_to_none=True)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if sequential:
                    losses = _sequence_losses(model, z, a, s, cfg, step, cfg.rollout_steps if w > 0 else 0)
                else:
                    losses = prediction_losses(model, z, a, s, cfg.rollout_steps if w > 0 else 0, cfg.rollout_score)
                loss = losses["tf"] + w * losses["rollout"]
            loss.backward()
        except Exception:
            flush()   # a pending non-finite step (a NaN memory carried on, say) is the better answer
            raise
        if world > 1:
            _allreduce_grads(model, world)
        gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                 else no_norm)
        # clipping by a NaN norm scales every gradient by NaN: found_inf keeps such a step off the parameters
        bad = ~torch.isfinite(loss.detach()) | ~torch.isfinite(gnorm.detach())
        if world > 1:   # every process skips the update if any one must
            bad = bad.float()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        opt.found_inf = bad.float()
        cms.apply(step)
        opt.step()
        if sequential:
            model.detach_memory()
        stats = torch.stack([loss.detach().float(), losses["tf"].detach().float(), losses["rollout"].detach().float(),
                             gnorm.detach().float(), opt.found_inf])
        if world > 1:  # log the global-batch mean, as one process would
            mean = stats[:4].clone()
            dist.all_reduce(mean)
            stats = torch.cat([mean / world, stats[4:]])
        pending.append((step, lr, w, stats))
        is_ckpt = bool(ckpt_path) and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps)
        if is_ckpt or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            flush()
        if is_ckpt:
            if rank == 0:
                ckpt_written = save_checkpoint(ckpt_path, model, opt, step + 1, cfg, cms.acc)
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    if sequential:
        model.carry_memory, model.memory_grad = False, False
        model.reset_memory()
    return TrainResult(model=model, checkpoint=ckpt_path if ckpt_path and os.path.exists(ckpt_path) else None,
                       history=history)


def _sequence_losses(model, z, a, s, cfg: TrainConfig, step: int, rollout_steps: int) -> dict:
    """HOPE trained on what it meets at test time: the local batch (b = k * n clips) is n sequences of
    k = seq_clips clips, clip j of sequence i at row j * n + i. The memory runs through each sequence (the
    rollout of a clip reads the memory left by the clips before it, its teacher-forcing pass stores the new
    state) and the losses are averaged over all clips, so the gradient flows back through the carried memory
    to the start of the step. Every memory_reset_every steps the sequences start from the learned initial
    memory; otherwise from the previous step's detached end memory."""
    k = cfg.seq_clips
    n = z.shape[0] // k
    if step % cfg.memory_reset_every == 0:
        model.reset_memory()
    total = {"tf": 0.0, "rollout": 0.0}
    for j in range(k):
        rows = slice(j * n, (j + 1) * n)
        part = prediction_losses(model, z[rows], a[rows], None if s is None else s[rows], rollout_steps,
                                 cfg.rollout_score)
        for key in total:
            total[key] = total[key] + part[key] / k
    return total


def _allreduce_grads(model, world: int):
    """Average gradients over processes (one flat all-reduce). Plain all-reduce instead of the DDP wrapper
    because a step runs several forwards (rollout steps + teacher forcing) before one backward."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 16, device="cpu") -> dict:
    """Held-out teacher-forcing L1 of the model and of the copy-last baseline, averaged over clips."""
    model.eval()
    tot, base, n = 0.0, 0.0, 0
    for i in range(0, len(dataset), batch_size):
        z, a, s = _collate(dataset, range(i, min(i + batch_size, len(dataset))), device)
        b = z.shape[0]
        tot += prediction_losses(model, z, a, s, rollout_steps=0)["tf"].item() * b
        base += copy_last_loss(z).item() * b
        n += b
    model.train()
    return {"tf": tot / n, "copy_last": base / n}
