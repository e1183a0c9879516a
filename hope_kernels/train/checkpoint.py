"""Checkpoints (atomic safetensors with exact-resume state) and the run folder's JSONL log."""

from __future__ import annotations

import json
import os
import random
import warnings

import numpy as np
import torch

from hope_kernels.config import PredictorConfig
from hope_kernels.io import atomic_write, read_safetensors
from hope_kernels.models import load_state_exactly, predictor_from_config

CKPT_NAME = "checkpoint.safetensors"
LOG_NAME = "train_log.jsonl"


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
    meta = {
        "format": "hope-kernels-checkpoint-1",
        "step": str(int(step)),
        "kind": model.kind,
        "predictor_config": json.dumps(model.config.to_dict()),
        "train_config": json.dumps(cfg),
        "optimizer_param_groups": json.dumps(opt_meta),
        "python_rng": json.dumps(_py_rng_to_json(random.getstate())),
        "numpy_rng": json.dumps(_np_rng_to_json(np.random.get_state())),
    }
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
    cms_grads = {k[len("cms_grad.") :]: v for k, v in tensors.items() if k.startswith("cms_grad.")}
    memory = {k[len("memory.") :]: v for k, v in tensors.items() if k.startswith("memory.")}
    return model, {
        "step": step,
        "config": train_config,
        "predictor_config": pcfg,
        "optimizer": opt,
        "rng": rng,
        "cms_grads": cms_grads,
        "memory": memory,
    }


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
                warnings.warn(
                    f"{path}: dropped its partial last line {i + 1} (a run stopped while writing it)", stacklevel=2
                )
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
    changed = sorted(
        k
        for k in stored
        if k not in _FREE_ON_RESUME
        and json.dumps(stored.get(k), sort_keys=True) != json.dumps(now.get(k), sort_keys=True, default=list)
    )
    if changed:
        diffs = ", ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in changed)
        warnings.warn(
            f"resuming {ckpt_path} with other settings than it was trained with ({diffs}); the run "
            f"will not reproduce an uninterrupted one",
            stacklevel=2,
        )
