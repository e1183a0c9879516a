"""The researcher's own latents -> dataset folder (format.py), with validation that names the problem and file.

Accepted files: `.npy` (np.load, allow_pickle=False), `.npz` (the only array, or the one named after its role:
"latents" / "actions" / "states"), `.safetensors` (same naming rule), `.pt` / `.pth` (torch.load with
weights_only=True: a tensor or a dict of tensors; anything that needs pickle is refused).
Shapes: latents (n, T, N, D) or (n, T, H, W, D) floating point; actions (n, T, A); states (n, T, S).
Splits: `split="auto"` keeps clip order and puts the last 10% (at least 1 when n >= 3) in "heldout", the 10%
before them in "stream" and the rest in "train"; or name one split for all clips.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import torch

from hope_kernels.data.format import KNOWN_PHASES, LATENT_DTYPES, MANIFEST, SPLITS, DatasetWriter, read_manifest


class DataError(ValueError):
    """A validation error raised by this module (its message is final: file + problem)."""


_TORCH_FROM_NP = {
    np.dtype("float16"): torch.float16,
    np.dtype("float32"): torch.float32,
    np.dtype("float64"): torch.float64,
}


def load_array(path, role: str) -> torch.Tensor:
    """Load one array for `role` ("latents", "actions", "states") from .npy/.npz/.safetensors/.pt."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} file {path} does not exist")
    ext = path.suffix.lower()
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
            return _np_to_torch(arr, role, path)
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return _np_to_torch(z[_pick_key(list(z.files), role, path)], role, path)
        if ext == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(_pick_key(list(f.keys()), role, path))
        if ext in (".pt", ".pth"):
            import pickle

            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise DataError(
                    f"{role} file {path} needs pickle to load (only plain tensors / dicts of tensors "
                    f"are accepted, through torch.load(weights_only=True)): {str(e).splitlines()[0]}"
                ) from None
            if isinstance(obj, dict):
                obj = obj[_pick_key([k for k in obj if isinstance(obj[k], torch.Tensor)], role, path)]
            if not isinstance(obj, torch.Tensor):
                raise DataError(
                    f"{role} file {path} holds a {type(obj).__name__}, expected a tensor or a dict of tensors"
                )
            return obj
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):  # numpy's refusal of an object array: intact, but loading it needs pickle
            raise DataError(
                f"{role} file {path} holds Python objects, which only pickle can load (never used "
                f"here): save a numeric array"
            ) from None
        raise DataError(f"{role} file {path} is truncated or corrupt: ValueError: {str(e).splitlines()[0]}") from None
    except Exception as e:  # numpy / zipfile / safetensors / torch errors on a truncated or corrupt file
        raise DataError(
            f"{role} file {path} is truncated or corrupt: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    raise DataError(f"{role} file {path}: unsupported extension {ext!r} (expected .npy, .npz, .safetensors, .pt)")


def _pick_key(keys: list, role: str, path) -> str:
    if role in keys:
        return role
    if len(keys) == 1:
        return keys[0]
    raise DataError(f"{role} file {path} holds arrays {sorted(keys)}: name one of them {role!r} or keep a single array")


def _np_to_torch(arr: np.ndarray, role: str, path) -> torch.Tensor:
    if arr.dtype == object:
        raise DataError(f"{role} file {path} holds Python objects, expected a numeric array")
    if arr.dtype.kind == "f" and arr.dtype not in _TORCH_FROM_NP:
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _cast_checked(
    x: torch.Tensor, dtype: torch.dtype, role: str, path, phase: str, hint: str = "rescale them"
) -> torch.Tensor:
    """x cast to its stored dtype, checked AFTER the cast: NaN/Inf in the input, and finite values that overflow
    to Inf in `dtype`, are refused naming the first bad clip, the phase and the dtype (then `hint`)."""
    stored = x.to(dtype)
    bad = ~torch.isfinite(stored.flatten(1)).all(dim=1)
    if not bad.any():
        return stored
    i, n = int(bad.nonzero()[0]), x.shape[0]
    if not torch.isfinite(x[i]).all():
        raise DataError(f"{role} in {path} contain NaN or Inf (first in clip {i} of {n}, phase {phase})")
    name = str(dtype).removeprefix("torch.")
    raise DataError(
        f"{role} in {path} overflow the stored dtype {name} (first in clip {i} of {n}, phase {phase}): "
        f"|values| up to {x[i].abs().max().item():.4g}, the largest finite {name} is "
        f"{torch.finfo(dtype).max:.6g}; {hint}"
    )


def auto_splits(n: int) -> list[str]:
    """Per-clip split names for split="auto": train | stream (10%) | heldout (last 10%), order kept."""
    k = max(1, math.floor(0.1 * n)) if n >= 3 else 0
    return ["train"] * (n - 2 * k) + ["stream"] * k + ["heldout"] * k


def import_arrays(
    out,
    latents,
    actions,
    phase: str,
    *,
    states=None,
    split: str = "auto",
    append: bool = False,
    grid: tuple[int, int] | None = None,
    latent_dtype: str | None = None,
    physics: dict | None = None,
    allow_multi_step_actions: bool = False,
    shard_clips: int = 256,
    sources: dict | None = None,
):
    """Validate and write one phase of clips into dataset folder `out` (a new one, or an existing one with
    append=True). latents (n, T, N, D) | (n, T, H, W, D) float; actions (n, T, A); states (n, T, S) or None.
    `grid` (H, W) is needed for 4-D latents whose N is not a perfect square and no dataset exists yet.
    `sources` maps role -> file name, used in error messages. On any error nothing new stays on disk."""
    src = {"latents": "latents", "actions": "actions", "states": "states", **(sources or {})}
    out = pathlib.Path(out)
    if phase not in KNOWN_PHASES:
        raise ValueError(f"unknown phase {phase!r}: expected one of {', '.join(KNOWN_PHASES)}")
    if split != "auto" and split not in SPLITS:
        raise ValueError(f"split must be 'auto' or one of {SPLITS}, got {split!r}")
    existing = read_manifest(out) if (out / MANIFEST).is_file() else None
    if existing is not None and not append:
        raise ValueError(f"{out} already holds a dataset: pass --append to add a phase")
    if not latents.is_floating_point():
        raise TypeError(
            f"latents in {src['latents']} must be floating point (float16/bfloat16/float32), got {latents.dtype}"
        )
    if latents.dim() == 5:
        n, T, H, W, D = latents.shape
        latents = latents.reshape(n, T, H * W, D)
    elif latents.dim() == 4:
        n, T, N, D = latents.shape
        if existing is not None:
            H, W = existing["grid"][1:]
        elif grid is not None:
            H, W = grid
        else:
            H = W = math.isqrt(N)
        if H * W != N:
            raise ValueError(
                f"latents in {src['latents']} have N={N} patches, which is not H*W for grid "
                f"({H}, {W}): pass --grid H W or 5-D latents (n, T, H, W, D)"
            )
    else:
        raise ValueError(
            f"latents in {src['latents']} must be (n, T, N, D) or (n, T, H, W, D), got shape {tuple(latents.shape)}"
        )
    if actions.dim() != 3:
        raise ValueError(f"actions in {src['actions']} must be (n, T, A), got shape {tuple(actions.shape)}")
    if not (actions.is_floating_point() or actions.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"actions in {src['actions']} must be numeric, got {actions.dtype}")
    if actions.shape[0] != n:
        raise ValueError(
            f"clip counts differ: latents in {src['latents']} have {n} clips, "
            f"actions in {src['actions']} have {actions.shape[0]}"
        )
    if actions.shape[1] != T:
        raise ValueError(f"actions in {src['actions']} have T={actions.shape[1]} timesteps, latents have T={T}")
    if states is not None:
        if states.dim() != 3:
            raise ValueError(f"states in {src['states']} must be (n, T, S), got shape {tuple(states.shape)}")
        if states.shape[0] != n or states.shape[1] != T:
            raise ValueError(
                f"states in {src['states']} are {tuple(states.shape)}, expected ({n}, {T}, S) to match the latents"
            )
        states = _cast_checked(states, torch.float32, "states", src["states"], phase)
    if n == 0:
        raise ValueError(f"latents in {src['latents']} hold no clips")
    if existing is not None:
        latent_dtype = existing["latent_dtype"]  # an append stores the dataset's dtype
    elif latent_dtype is None:
        latent_dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(latents.dtype, "float32")
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {list(LATENT_DTYPES)}, got {latent_dtype!r}")
    hint = "rescale them"
    if latent_dtype != "float32":
        hint += (
            f", or import into a float32 dataset ({out} stores {latent_dtype})"
            if existing
            else ", or pass --latent-dtype float32"
        )
    latents = _cast_checked(latents, LATENT_DTYPES[latent_dtype], "latents", src["latents"], phase, hint)
    actions = _cast_checked(actions, torch.float32, "actions", src["actions"], phase)
    if not allow_multi_step_actions:
        steps = (actions != 0).any(dim=2).sum(dim=1)
        if (steps > 1).any():
            i = int((steps > 1).nonzero()[0])
            raise ValueError(
                f"actions in {src['actions']}: clip {i} has {int(steps[i])} non-zero timesteps, expected "
                f"at most one impulse per clip (pass --allow-multi-step-actions to accept)"
            )
    S = 0 if states is None else states.shape[2]
    if existing is not None:
        want = {"grid": [T, H, W], "enc_dim": D, "action_dim": actions.shape[2], "state_dim": S}
        for k, v in want.items():
            if existing[k] != v:
                raise ValueError(f"{k} of the new clips ({v}) disagrees with the dataset at {out} ({existing[k]})")
    names = auto_splits(n) if split == "auto" else [split] * n
    with DatasetWriter(
        out,
        grid=(T, H, W),
        enc_dim=D,
        action_dim=actions.shape[2],
        state_dim=S,
        latent_dtype=latent_dtype,
        append=append,
    ) as w:
        w.add_phase(phase, physics)
        for s in SPLITS:
            idx = [i for i, name in enumerate(names) if name == s]
            for a in range(0, len(idx), shard_clips):
                sel = torch.tensor(idx[a : a + shard_clips])
                metas = [{"source": str(src["latents"]), "source_index": int(i)} for i in sel]
                w.add_shard(
                    latents[sel], actions[sel], phase, s, states=None if states is None else states[sel], metas=metas
                )
    return out


def import_files(out, latents_path, actions_path, phase: str, states_path=None, **kw):
    """File front-end of import_arrays (used by `hope-kernels import`)."""
    lat = load_array(latents_path, "latents")
    act = load_array(actions_path, "actions")
    st = load_array(states_path, "states") if states_path else None
    sources = {"latents": str(latents_path), "actions": str(actions_path), "states": str(states_path)}
    return import_arrays(out, lat, act, phase, states=st, sources=sources, **kw)
