"""Pre-trained predictors of an A-B-A preset: which pre-trainings a preset needs, their regeneration
(`hope-kernels pretrain --preset quick`) and the weights shipped with the package.

Shipped weights live in `hope_kernels/assets/pretrained/<preset>/`: one `<name>.safetensors` per pre-training
(model weights only, float16 where that moves no held-out error by 1% or more) and `index.json`:

    {"format": "hope-kernels-pretrained-1", "preset": "quick", "models": [
        {"name": "ac-A1", "file": "ac-A1.safetensors", "spec": {...}, "data_id": "874cbd1b...",
         "data": {"preset": "quick", "seed": 0}, "dtype": "float16", "steps": 2000,
         "heldout": {"A1": {"tf", "copy_last", "ratio"}, "B": ..., "A2": ...},   # of the shipped (rounded) weights
         "heldout_fp32": {...}, "code": {"trained": {"git", "train_code"} | None, "indexed": {...}},
         "train_config": {...}, "device": "cpu",
         "wall_seconds": ..., "torch": "2.13.0"}, ...]}

`spec` is what identifies a pre-training (model kind, predictor preset, overrides, training phases, training
fields, seed); the A-B-A job takes shipped weights only when its own spec and dataset id equal an entry's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch

__all__ = [
    "ASSET_ROOT",
    "spec_for",
    "spec_name",
    "pretrain_specs",
    "find_shipped",
    "load_weights",
    "load_any",
    "heldout_errors",
    "regenerate",
    "with_steps",
    "code_id",
    "data_id",
    "TRAIN_CODE",
]

ASSET_ROOT = Path(__file__).resolve().parent / "assets" / "pretrained"
INDEX = "index.json"
FORMAT = "hope-kernels-pretrained-1"
TRAIN_CODE = ("models", "train", "config.py")
# a float16 copy is shipped only if no held-out error moves by this fraction or more
DTYPE_TOLERANCE = 0.01


@functools.cache
def code_id(*modules: str) -> str:
    """A hash of these modules' source files (hope_kernels-relative, a folder: every .py in it): the code that
    decides what a stored checkpoint or run log holds, so a changed model or adaptation rule is not reused.
    Cached: the code this process runs is the code it imported."""
    root = Path(__file__).resolve().parent
    files = sorted(f for m in modules for f in ((root / m).glob("*.py") if (root / m).is_dir() else [root / m]))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def data_id(path) -> str:
    """A dataset's identity (hope_kernels.data.format.dataset_id): what shipped weights and A-B-A checkpoints are
    matched to data by."""
    from hope_kernels.data.format import dataset_id

    return dataset_id(path)


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=list)


# ------------------------------------------------------------------------------------------------ specs


def train_fields(cfg: dict, model: str) -> dict:
    """The training-config fields of `model`'s pre-training: config["pretrain"] without per_seed and the
    per-kind sections, then the "ac" / "hope" section on top."""
    pre = dict(cfg.get("pretrain") or {})
    pre.pop("per_seed", None)
    kinds = {k: pre.pop(k) for k in ("ac", "hope") if k in pre}
    extra = kinds.get(model) or {}
    if not isinstance(extra, dict):
        raise ValueError(f"pretrain.{model} must be a mapping of training fields, got {extra!r}")
    return {**pre, **extra}


def with_steps(cfg: dict, steps: int) -> dict:
    """`cfg` with every pre-training's step count set to `steps` (the shared one, each kind's own and a run's own
    `pretrain` mapping)."""
    pre = dict(cfg.get("pretrain") or {})
    pre["steps"] = steps
    for kind in ("ac", "hope"):
        if isinstance(pre.get(kind), dict) and "steps" in pre[kind]:
            pre[kind] = {**pre[kind], "steps": steps}
    runs = [
        {**r, "pretrain": {**r["pretrain"], "steps": steps}}
        if isinstance(r.get("pretrain"), dict) and "steps" in r["pretrain"]
        else r
        for r in cfg.get("runs") or []
    ]
    return {**cfg, "pretrain": pre, "runs": runs}


def spec_for(cfg: dict, run: dict, seed: int) -> dict:
    """The identity of the pre-training `run` needs (without dataset and code). A run's own `pretrain` mapping
    (for example {lr: 1.0e-3} for an ablation that diverges at the shared lr) overrides the training fields."""
    per_seed = bool((cfg.get("pretrain") or {}).get("per_seed"))
    train = {**train_fields(cfg, run["model"]), **(run.get("pretrain") or {})}
    return {
        "model": run["model"],
        "preset": cfg.get("model_preset", "tiny"),
        "overrides": run.get("overrides") or {},
        "phases": list(run.get("train_phases") or ["A1"]),
        "train": train,
        "seed": int(seed) if per_seed else 0,
    }


def spec_name(spec: dict) -> str:
    """A file-safe name: ac-A1, ac-A1+B, hope-A1[cms=False], ..., with -s<seed> for per-seed pre-trainings."""
    name = f"{spec['model']}-{'+'.join(spec['phases'])}"
    if spec["overrides"]:
        name += "[" + ",".join(f"{k}={v}" for k, v in sorted(spec["overrides"].items())) + "]"
    if spec["seed"]:
        name += f"-s{spec['seed']}"
    return re.sub(r"[^A-Za-z0-9_.+=,\[\]-]+", "_", name)


def pretrain_specs(cfg: dict, seeds=None) -> list[tuple[dict, list[str]]]:
    """[(spec, names of the runs that use it)] for every distinct pre-training of the config, in run order."""
    seeds = [int(s) for s in (seeds if seeds is not None else cfg.get("seeds") or [0])]
    out: dict[str, tuple[dict, list[str]]] = {}
    for seed in seeds:
        for run in cfg["runs"]:
            spec = spec_for(cfg, run, seed)
            out.setdefault(_canon(spec), (spec, []))[1].append(run["name"])
    return list(out.values())


def train_config(spec: dict, data_path, out, device: str = "cpu", progress: bool = False) -> dict:
    """The hope_kernels.train.train config of a spec."""
    return {
        "model": spec["model"],
        "preset": spec["preset"],
        "overrides": spec["overrides"],
        "data": str(data_path),
        "phases": spec["phases"],
        "split": "train",
        "seed": spec["seed"],
        "device": device,
        "out": str(out),
        "progress": progress,
        **spec["train"],
    }


# --------------------------------------------------------------------------------------- held-out errors


@torch.no_grad()
def heldout_errors(model, clips_by_phase: dict, batch_size: int = 16) -> dict:
    """{phase: {"tf", "copy_last", "ratio"}}: mean teacher-forcing L1 over the clips of each phase (clip dicts
    with "latents" (T, N, D) and "actions" (T, A)), beside the copy-last-latent baseline on the same clips."""
    from hope_kernels.train import copy_last_loss, prediction_losses

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for phase, clips in clips_by_phase.items():
        clips = list(clips)
        if not clips:
            continue
        tot, base = 0.0, 0.0
        for i in range(0, len(clips), batch_size):
            part = clips[i : i + batch_size]
            z = torch.stack([torch.as_tensor(c["latents"]) for c in part]).float().to(device)
            a = torch.stack([torch.as_tensor(c["actions"]) for c in part]).float().to(device)
            s = None
            if (
                part[0].get("states") is not None
                and getattr(model, "config", None) is not None
                and model.config.state_dim
            ):
                s = torch.stack([torch.as_tensor(c["states"]) for c in part]).float().to(device)
            tot += float(prediction_losses(model, z, a, s, rollout_steps=0)["tf"]) * len(part)
            base += float(copy_last_loss(z)) * len(part)
        tf, cl = tot / len(clips), base / len(clips)
        out[phase] = {"tf": tf, "copy_last": cl, "ratio": tf / cl if cl > 0 else float("nan"), "clips": len(clips)}
    model.train(was_training)
    return out


def dataset_heldout(data_path, phases=("A1", "B", "A2")) -> dict:
    """{phase: every held-out clip of that phase} of a dataset folder."""
    from hope_kernels.data import ClipDataset

    out = {}
    for p in phases:
        ds = ClipDataset(data_path, phase=p, split="heldout")
        out[p] = [ds[i] for i in range(len(ds))]
    return out


# ------------------------------------------------------------------------------------- shipped weights


def _index_path(preset: str, root=None) -> Path:
    return Path(root or ASSET_ROOT) / preset / INDEX


def read_index(preset: str, root=None) -> dict | None:
    """The shipped index of `preset` (None when there is none); a corrupt index raises naming the file."""
    path = _index_path(preset, root)
    if not path.is_file():
        return None
    try:
        idx = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"shipped weights index {path} is corrupt: {e}") from None
    if not isinstance(idx, dict) or idx.get("format") != FORMAT or not isinstance(idx.get("models"), list):
        raise ValueError(f"{path} is not a hope-kernels pretrained index (format {FORMAT!r} with a models list)")
    return idx


def find_shipped(preset: str, spec: dict, dataset_id: str, root=None) -> tuple[dict | None, str]:
    """-> (entry with "path", "") when weights for exactly this spec and dataset ship with the package, else
    (None, why not)."""
    idx = read_index(preset, root)
    name = spec_name(spec)
    if idx is None:
        return None, f"no shipped weights for preset {preset!r}"
    for e in idx["models"]:
        if _canon(e.get("spec")) == _canon(spec):
            if e.get("data_id") != dataset_id:
                return None, (
                    f"the shipped {name} was trained on dataset {e.get('data_id')}, this dataset is {dataset_id}"
                )
            path = _index_path(preset, root).parent / e["file"]
            if not path.is_file():
                return None, f"the shipped {name} is listed but {path} is missing"
            return {**e, "path": str(path)}, ""
    return None, f"no shipped weights with the config of {name} (training fields, overrides or phases differ)"


def save_weights(path, model, meta: dict, dtype: torch.dtype) -> Path:
    """Model weights (floating tensors cast to dtype) + predictor config and `meta` as metadata, atomically."""
    from safetensors.torch import save_file

    from hope_kernels.io import atomic_write

    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    md = {
        "format": FORMAT,
        "kind": model.kind,
        "predictor_config": json.dumps(model.config.to_dict()),
        "provenance": json.dumps(meta, sort_keys=True),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md))


def load_any(path, device="cpu"):
    """A `train` checkpoint or a shipped weights file -> model (what `hope-kernels adapt --checkpoint` takes)."""
    from hope_kernels.io import read_safetensors
    from hope_kernels.train import load_checkpoint

    meta, _ = read_safetensors(path, "checkpoint")
    return load_weights(path, device) if meta.get("format") == FORMAT else load_checkpoint(path, device=device)[0]


def load_weights(path, device="cpu"):
    """A shipped weights file -> model (float32). Errors name the file: missing, not safetensors, foreign
    metadata, weights that do not fit their config, NaN/inf."""
    from hope_kernels.config import PredictorConfig
    from hope_kernels.io import read_safetensors
    from hope_kernels.models import load_state_exactly, predictor_from_config

    path = os.fspath(path)
    meta, tensors = read_safetensors(path, "shipped weights")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a hope-kernels pretrained weights file (format {meta.get('format')!r})")
    try:
        pcfg = PredictorConfig.from_dict(json.loads(meta["predictor_config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"shipped weights {path!r} have corrupt metadata: {type(e).__name__}: {e}") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"shipped weights {path!r} hold NaN or inf in {len(bad)} tensor(s), first {bad[0]!r}")
    model = predictor_from_config(pcfg)
    try:
        load_state_exactly(model, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    except ValueError as e:
        raise ValueError(f"shipped weights {path!r} do not fit their own predictor config: {e}") from None
    return model.to(device)


# ------------------------------------------------------------------------------------------ regeneration


def git_version() -> str | None:
    """HEAD of the source checkout this package runs from (+ "-dirty" with uncommitted tracked changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _logged_seconds(ckpt_dir: Path, spec: dict) -> float | None:
    """Training wall time read off a finished run's log (the sum of its step times)."""
    from hope_kernels.train import LOG_NAME

    try:
        recs = [json.loads(x) for x in (ckpt_dir / LOG_NAME).read_text().splitlines() if x.strip()]
        return sum(int(spec["train"].get("batch_size", 16)) / r["clips_per_s"] for r in recs)
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return None


def _train_one(spec: dict, data_path: str, ckpt_dir: str, device: str, threads: int) -> dict:
    """One pre-training (in a worker process): resumes a checkpoint left in ckpt_dir by an interrupted run."""
    from hope_kernels.train import CKPT_NAME, load_checkpoint, train

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ckpt = Path(ckpt_dir) / CKPT_NAME
    tc = train_config(spec, data_path, ckpt_dir, device)
    started = Path(ckpt_dir) / "provenance.json"
    if not ckpt.is_file():  # the code version the training starts from (a resumed run keeps the first)
        from hope_kernels.io import atomic_write_json

        atomic_write_json(started, {"git": git_version(), "train_code": code_id(*TRAIN_CODE)})
    if ckpt.is_file():
        done = load_checkpoint(ckpt)[1]["step"]
        if done >= int(spec["train"].get("steps", 0)):
            return {"checkpoint": str(ckpt), "wall_seconds": _logged_seconds(Path(ckpt_dir), spec)}
        tc["resume"] = True
    res = train(tc)
    logged = _logged_seconds(Path(ckpt_dir), spec)  # the whole run's, across interruptions
    return {"checkpoint": str(res.checkpoint), "wall_seconds": logged or time.perf_counter() - t0}


def regenerate(
    cfg: dict, work, assets=None, workers: int = 1, only=None, device: str = "cpu", threads: int = 1, say=print
) -> dict:
    """Pre-train every distinct model of A-B-A config `cfg` on its dataset and write the shipped weights and
    index into `assets` (default: this package's assets folder for cfg["preset"]). `work` holds the dataset
    (`work/data`, simulated if absent) and resumable training checkpoints (`work/checkpoints/<name>`).
    `only`: names (spec_name) to regenerate; the index keeps the other entries. Returns the index."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from hope_kernels.data import ensure_dataset
    from hope_kernels.io import atomic_write_json
    from hope_kernels.train import load_checkpoint

    preset = cfg.get("preset") or "custom"
    assets = Path(assets) if assets else ASSET_ROOT / preset
    work = Path(work)
    dc = cfg.get("data") or {}
    data_path = ensure_dataset(work / "data", dc.get("preset", "quick"), int(dc.get("seed", 0)))
    did = data_id(data_path)
    specs = [s for s, _ in pretrain_specs(cfg)]
    names = [spec_name(s) for s in specs]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"--only names {unknown} are not pre-trainings of preset {preset!r} (it has {names})")
        specs = [s for s in specs if spec_name(s) in set(only)]
    say(
        f"pre-training {len(specs)} model(s) of preset {preset!r} on dataset {did} ({data_path}), "
        f"{workers} worker(s): {', '.join(spec_name(s) for s in specs)}"
    )
    jobs = [(s, str(data_path), str(work / "checkpoints" / spec_name(s)), device, threads) for s in specs]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(_train_one, *zip(*jobs)))
    else:
        done = [_train_one(*j) for j in jobs]

    heldout_clips = dataset_heldout(data_path)
    old = read_index(preset, assets.parent) if (assets / INDEX).is_file() else None
    entries = {e["name"]: e for e in (old or {}).get("models", [])}
    version = git_version()
    for spec, res in zip(specs, done):
        name = spec_name(spec)
        model, st = load_checkpoint(res["checkpoint"])
        started = Path(res["checkpoint"]).parent / "provenance.json"
        trained_at = json.loads(started.read_text()) if started.is_file() else None
        full = heldout_errors(model, heldout_clips)
        half = load_state_rounded(model, torch.float16)
        rounded = heldout_errors(half, heldout_clips)
        moved = max(abs(rounded[p]["tf"] - full[p]["tf"]) / full[p]["tf"] for p in full)
        dtype, kept = (torch.float16, rounded) if moved < DTYPE_TOLERANCE else (torch.float32, full)
        entry = {
            "name": name,
            "file": f"{name}.safetensors",
            "spec": spec,
            "data_id": did,
            "data": {"preset": dc.get("preset", "quick"), "seed": int(dc.get("seed", 0))},
            "dtype": str(dtype).replace("torch.", ""),
            "steps": st["step"],
            "heldout": kept,
            "heldout_fp32": full,
            "float16_max_change": moved,
            "train_config": st["config"],
            # the code a training started from (None: started outside this command) and the one that
            # evaluated the weights and wrote this entry
            "code": {"trained": trained_at, "indexed": {"git": version, "train_code": code_id(*TRAIN_CODE)}},
            "device": device,
            "wall_seconds": res["wall_seconds"],
            "torch": torch.__version__,
        }
        save_weights(assets / entry["file"], model, {k: v for k, v in entry.items() if k != "file"}, dtype)
        entries[name] = entry
        say(
            f"{name}: {st['step']} steps, held-out TF "
            + ", ".join(f"{p} {v['tf']:.4f} ({v['ratio']:.2f}x copy-last)" for p, v in kept.items())
            + f"; {entry['dtype']} (float16 moves held-out errors by {100 * moved:.2f}%)"
        )
    index = {"format": FORMAT, "preset": preset, "models": [entries[k] for k in sorted(entries)]}
    atomic_write_json(assets / INDEX, index)
    return index


def load_state_rounded(model, dtype):
    """A copy of `model` whose floating weights went through `dtype` and back (what a shipped file holds)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return m
