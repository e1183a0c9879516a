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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from hope_kernels.config import TrainConfig
from hope_kernels.io import FolderLock, atomic_write_bytes, remove_temp_files
from hope_kernels.models import build_predictor
from hope_kernels.models.base import compiled_forward
from hope_kernels.models.cms import CMSPeriods
from hope_kernels.train.checkpoint import (
    CKPT_NAME,
    LOG_NAME,
    _read_log,
    _restore_rng,
    _warn_changed_settings,
    load_checkpoint,
    save_checkpoint,
)
from hope_kernels.train.data import _batch_indices, _collate, _load_dataset
from hope_kernels.train.distributed import _allreduce_grads, _dist_setup
from hope_kernels.train.losses import lr_at, prediction_losses, rollout_weight


@dataclass
class TrainResult:
    model: torch.nn.Module
    checkpoint: str | None
    history: list = field(default_factory=list)


def _param_groups(model, wd):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


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
        raise FileNotFoundError(
            f"resume: no checkpoint at {ckpt_path!r} to continue"
            if ckpt_path
            else "resume needs 'out', the folder holding the checkpoint"
        )
    rank, world, device = _dist_setup(cfg.device)
    if not (out and rank == 0):
        return _train(cfg, dataset, ckpt_path, log_path, rank, world, device)
    # one writer per folder; temp files a killed run left are removed once the lock is ours
    with FolderLock(out, "train --out"):
        remove_temp_files(out)
        return _train(cfg, dataset, ckpt_path, log_path, rank, world, device)


def _train(cfg: TrainConfig, dataset, ckpt_path, log_path, rank: int, world: int, device) -> TrainResult:
    if ckpt_path and os.path.exists(ckpt_path) and not (cfg.resume or cfg.overwrite):
        raise ValueError(
            f"{ckpt_path} already exists: pass resume (--resume) to continue it or overwrite "
            f"(--overwrite) to start over"
        )
    if cfg.batch_size % (world * cfg.seq_clips):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by the number of processes {world} "
            f"times seq_clips {cfg.seq_clips}"
        )
    ds = dataset if dataset is not None else _load_dataset(cfg)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_predictor(
        cfg.model,
        cfg.preset,
        enc_dim=ds.enc_dim,
        grid=tuple(ds.grid),
        action_dim=ds.action_dim,
        state_dim=ds.state_dim,
        **cfg.overrides,
    ).to(device)
    # fused: the only AdamW that honours found_inf, which skips a non-finite step on the device (below)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    start, history = 0, []
    # cms_train_periods: clipped gradients of a level of period p accumulate and it is updated every p-th step
    cms = CMSPeriods(model, model.cms_levels() if cfg.cms_train_periods and hasattr(model, "cms_levels") else [])
    if cfg.resume:
        loaded, st = load_checkpoint(ckpt_path)
        if loaded.config != model.config:
            raise ValueError(
                f"checkpoint {ckpt_path} was trained with a different predictor config: "
                f"{loaded.config} vs {model.config}"
            )
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
    if sequential:  # the memory carries from clip to clip with its graph; detached at the end of each step
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
    pending: list[tuple[int, float, float, torch.Tensor]] = []  # (step, lr, w, stats)
    t_last, ckpt_written = time.perf_counter(), None

    def stop(step: int, what: str):
        if bar is not None:
            bar.close()
        raise RuntimeError(
            f"training stopped at step {step + 1}: {what}; no checkpoint was written for this "
            f"step" + (f" (last good checkpoint: {ckpt_written})" if ckpt_written else "")
        )

    def flush():
        """Reads the pending steps' numbers (one sync), stops at the first non-finite one, logs the others."""
        nonlocal t_last
        if not pending:
            return
        rows = torch.stack([p[-1] for p in pending]).tolist()  # sync
        now = time.perf_counter()
        rate = cfg.batch_size * len(pending) / max(now - t_last, 1e-9)  # the mean over the flushed steps
        t_last = now
        lines = []

        def write_log():  # one open per read; the steps before a non-finite one are logged too
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
            rec = {
                "step": step + 1,
                "loss": l_all,
                "tf": l_tf,
                "rollout": l_ro,
                "rollout_w": w,
                "lr": lr,
                "grad_norm": None if cfg.grad_clip <= 0 else gn,
                "clips_per_s": rate,
            }
            history.append(rec)
            lines.append(json.dumps(rec) + "\n")
        write_log()
        if bar is not None:
            bar.update(len(pending))
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", clips_s=f"{rate:.1f}")
        pending.clear()

    no_norm = torch.zeros((), device=device)
    with compiled_forward(model, cfg.compile):  # the trained model goes back as a plain module
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = _batch_indices(step, len(ds), cfg.batch_size, cfg.seed)[rank * local : (rank + 1) * local]
            bad_in: list[str] = []
            z, a, s = _collate(ds, idx, device, bad_in)
            # non-finite inputs are named with their clips here: inside the model an op would only see, say, a NaN gate
            if bad_in:
                flush()  # an earlier pending step may have gone wrong first
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
                flush()  # a pending non-finite step (a NaN memory carried on, say) is the better answer
                raise
            if world > 1:
                _allreduce_grads(model, world)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else no_norm
            # clipping by a NaN norm scales every gradient by NaN: found_inf keeps such a step off the parameters
            bad = ~torch.isfinite(loss.detach()) | ~torch.isfinite(gnorm.detach())
            if world > 1:  # every process skips the update if any one must
                bad = bad.float()
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            opt.found_inf = bad.float()
            cms.apply(step + 1)  # between clipping and the optimizer step
            opt.step()
            if sequential:
                model.detach_memory()
            stats = torch.stack(
                [
                    loss.detach().float(),
                    losses["tf"].detach().float(),
                    losses["rollout"].detach().float(),
                    gnorm.detach().float(),
                    opt.found_inf,
                ]
            )
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
    return TrainResult(
        model=model, checkpoint=ckpt_path if ckpt_path and os.path.exists(ckpt_path) else None, history=history
    )


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
        part = prediction_losses(
            model, z[rows], a[rows], None if s is None else s[rows], rollout_steps, cfg.rollout_score
        )
        for key in total:
            total[key] = total[key] + part[key] / k
    return total
