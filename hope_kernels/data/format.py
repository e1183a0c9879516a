"""On-disk clip dataset: `manifest.json` + safetensors shards, written atomically, read lazily.

Layout of a dataset folder::

    manifest.json                     written last, atomically (temp file + os.replace)
    A1-train-0000.safetensors         one shard = clips of ONE (phase, split); keys:
                                        latents (n, T, N, D)  float16 | bfloat16 | float32
                                        actions (n, T, A)     float32
                                        states  (n, T, S)     float32 (only when S > 0)
                                        phase   (n,)          int64 id into manifest["phases"]

`manifest.json` (format "hope-kernels-clips", version 1)::

    {"format", "version", "grid": [T, H, W], "enc_dim": D, "action_dim": A, "state_dim": S,
     "latent_dtype": "float16", "phases": {"A1": {"id": 0, "physics": {...} | null}, ...},
     "generator": {...} | null,          # simulator preset/seed/config, null for imported data
     "encoder": "embedded" | "hf:..." | null,
     "shards": [{"file", "phase", "split", "n", "bytes", "sha256"}, ...],
     "clips": [{"shard": k, "row": r, "phase", "split", "meta": {...}}, ...]}   # global clip index = position

Splits: "train" (pre-training), "stream" (the online adaptation stream), "heldout" (evaluation at phase ends).
Reads go through `safetensors.safe_open` (memory-mapped): `ClipDataset[i]` touches one row of one shard.
Nothing is ever unpickled.

Integrity on read: a ClipDataset checks the size and sha256 of the shards it covers against the manifest when it
is created, unless `.hope-kernels-verified.json` beside the manifest records that this file, at this size and
mtime, already matched that sha256 (so a full hash is paid once per shard version, not on every run). Every clip
read is also checked for NaN/Inf. A failure names the shard and points to `hope-kernels verify`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hope_kernels.config import is_int
from hope_kernels.io import FolderLock, atomic_write_bytes, check_output_dir, remove_temp_files

FORMAT_NAME = "hope-kernels-clips"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "stream", "heldout")
KNOWN_PHASES = ("A1", "B", "A2")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_]+-(train|stream|heldout)-[0-9]{4,}\.safetensors")  # DatasetWriter._shard_name
LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
VERIFIED = ".hope-kernels-verified.json"  # {shard file: [bytes, mtime_ns, sha256]} of shards that matched


# ----------------------------------------------------------------------------------------------- atomic I/O
def sha256_file(path: pathlib.Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- manifest
def _parse_manifest(path) -> tuple[pathlib.Path, object]:
    """-> (path of `path/manifest.json`, its parsed JSON); errors name the file."""
    path = pathlib.Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"no dataset at {path}: {mf} does not exist")
    try:
        return mf, json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt manifest {mf}: {e}") from None


# Generator fields that describe the process that wrote a dataset, not its content (simulate.py): they differ
# between two runs that write the same bytes, so they stay out of its identity.
GENERATOR_RUN_FIELDS = ("seconds", "torch_threads")


def dataset_id(path) -> str:
    """A dataset's identity: a hash of its manifest (which records every shard's sha256), without the
    generator's run fields (wall seconds, thread count), so the same data has the same id on every machine."""
    _, m = _parse_manifest(path)
    if isinstance(m, dict) and isinstance(m.get("generator"), dict):
        m = {**m, "generator": {k: v for k, v in m["generator"].items() if k not in GENERATOR_RUN_FIELDS}}
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(path) -> dict:
    """Parse and sanity-check `path/manifest.json`; errors name the file and the problem."""
    mf, m = _parse_manifest(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{mf} is not a hope-kernels clip manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
            f"expected {FORMAT_NAME!r})"
        )
    if m.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{mf} has format version {m.get('version')}, this hope-kernels reads version {FORMAT_VERSION}"
        )
    for key in ("grid", "enc_dim", "action_dim", "state_dim", "latent_dtype", "phases", "shards", "clips"):
        if key not in m:
            raise ValueError(f"corrupt manifest {mf}: missing key {key!r}")
    if m["latent_dtype"] not in LATENT_DTYPES:
        raise ValueError(f"corrupt manifest {mf}: latent_dtype {m['latent_dtype']!r} not one of {list(LATENT_DTYPES)}")
    _check_entries(mf, m)
    return m


def _check_entries(mf, m: dict) -> None:
    """Types and ranges of the grid, the phases, and every shard and clip entry (so a bad entry is named here,
    not met later as a KeyError or an empty row)."""

    def bad(what):
        raise ValueError(f"corrupt manifest {mf}: {what}")

    g = m["grid"]
    if not (isinstance(g, list) and len(g) == 3 and all(is_int(x) and x > 0 for x in g)):
        bad(f"grid must be [T, H, W] of positive ints, got {g!r}")
    for key in ("enc_dim", "action_dim", "state_dim"):
        if not is_int(m[key]) or m[key] < (0 if key == "state_dim" else 1):
            bad(f"{key} must be a {'non-negative' if key == 'state_dim' else 'positive'} int, got {m[key]!r}")
    phases, shards, clips = m["phases"], m["shards"], m["clips"]
    if not isinstance(phases, dict) or not all(isinstance(v, dict) and is_int(v.get("id")) for v in phases.values()):
        bad(f"phases must map each phase name to {{'id': int, ...}}, got {phases!r}")
    if not isinstance(shards, list) or not isinstance(clips, list):
        bad("shards and clips must be lists")
    for k, s in enumerate(shards):
        if not isinstance(s, dict) or not {"file", "phase", "split", "n", "bytes", "sha256"} <= set(s):
            bad(f"shard entry {k} must have file, phase, split, n, bytes and sha256, got {s!r}")
        if s["phase"] not in phases:
            bad(f"shard {k} ({s['file']}) has phase {s['phase']!r}, not one of {list(phases)}")
        if s["split"] not in SPLITS:
            bad(f"shard {k} ({s['file']}) has split {s['split']!r}, not one of {SPLITS}")
        if not (is_int(s["n"]) and s["n"] >= 0 and is_int(s["bytes"]) and s["bytes"] >= 0):
            bad(f"shard {k} ({s['file']}): n and bytes must be non-negative ints, got {s['n']!r}, {s['bytes']!r}")
    for i, c in enumerate(clips):
        if not isinstance(c, dict) or not {"shard", "row", "phase", "split"} <= set(c):
            bad(f"clip entry {i} must have shard, row, phase and split, got {c!r}")
        k, r = c["shard"], c["row"]
        if not (is_int(k) and 0 <= k < len(shards)):
            bad(f"clip {i} refers to shard {k!r}, but the manifest lists {len(shards)} shards")
        if not (is_int(r) and 0 <= r < shards[k]["n"]):
            bad(f"clip {i} refers to row {r!r} of shard {k} ({shards[k]['file']}), which has {shards[k]['n']} rows")
        if (c["phase"], c["split"]) != (shards[k]["phase"], shards[k]["split"]):
            bad(
                f"clip {i} is {c['phase']}/{c['split']} but its shard {shards[k]['file']} holds "
                f"{shards[k]['phase']}/{shards[k]['split']}"
            )


def manifest_is_valid(path) -> bool:
    """Cheap check (no hashing): manifest parses and every shard file exists with its recorded size."""
    try:
        m = read_manifest(path)
    except (FileNotFoundError, ValueError):
        return False
    root = pathlib.Path(path)
    return all((root / s["file"]).is_file() and (root / s["file"]).stat().st_size == s["bytes"] for s in m["shards"])


# ----------------------------------------------------------------------------------------------- writer
@dataclass
class DatasetWriter:
    """Writes shards one by one and the manifest last. Use as a context manager: on an exception every shard
    written by this writer is deleted and the previous manifest (if any) is left untouched.

    New dataset: give grid/enc_dim/action_dim/state_dim/latent_dtype. `append=True` on an existing folder
    checks that those agree with the existing manifest (errors say expected vs given).
    """

    path: pathlib.Path
    grid: tuple[int, int, int] | None = None
    enc_dim: int | None = None
    action_dim: int | None = None
    state_dim: int = 0
    latent_dtype: str = "float16"
    append: bool = False
    generator: dict | None = None
    encoder: str | None = None
    _manifest: dict = field(default=None, init=False, repr=False)
    _new_files: list = field(default_factory=list, init=False, repr=False)
    _created_dir: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.path = check_output_dir(self.path, "dataset folder")
        self._created_dir = not self.path.exists()
        # one writer per dataset, held until commit() or abort()
        self._lock = FolderLock(self.path, "dataset folder").acquire()
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    def _open(self) -> None:
        exists = (self.path / MANIFEST).is_file()
        if exists and not self.append:
            raise ValueError(
                f"{self.path} already holds a dataset: pass append (--append) to add clips, or choose an empty folder"
            )
        if exists:
            m = read_manifest(self.path)
            given = {
                "grid": list(self.grid) if self.grid else None,
                "enc_dim": self.enc_dim,
                "action_dim": self.action_dim,
                "state_dim": self.state_dim,
            }
            for k, v in given.items():
                if v is not None and v != m[k]:
                    raise ValueError(f"{k} disagrees with the dataset at {self.path}: dataset has {m[k]}, given {v}")
            self._manifest = m
            self.latent_dtype = m["latent_dtype"]
        else:
            if self.grid is None or self.enc_dim is None or self.action_dim is None:
                raise ValueError("a new dataset needs grid, enc_dim and action_dim")
            if self.latent_dtype not in LATENT_DTYPES:
                raise ValueError(f"latent_dtype must be one of {list(LATENT_DTYPES)}, got {self.latent_dtype!r}")
            self._manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "grid": [int(g) for g in self.grid],
                "enc_dim": int(self.enc_dim),
                "action_dim": int(self.action_dim),
                "state_dim": int(self.state_dim),
                "latent_dtype": self.latent_dtype,
                "phases": {},
                "generator": self.generator,
                "encoder": self.encoder,
                "shards": [],
                "clips": [],
            }

        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temp files and shard files the manifest does not list: what a killed writer left (safe to delete: we
        hold the folder's lock)."""
        remove_temp_files(self.path)
        listed = {s["file"] for s in self._manifest["shards"]}
        for f in self.path.glob("*.safetensors"):
            if _SHARD_NAME.fullmatch(f.name) and f.name not in listed:
                f.unlink()

    def _release(self) -> None:
        self._lock.release()
        if self._created_dir and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # nothing was written: leave no folder behind

    @property
    def manifest(self) -> dict:
        return self._manifest

    def add_phase(self, name: str, physics: dict | None = None) -> int:
        phases = self._manifest["phases"]
        if name not in phases:
            phases[name] = {"id": len(phases), "physics": physics}
        elif physics is not None and phases[name]["physics"] not in (None, physics):
            raise ValueError(f"phase {name!r} already has physics {phases[name]['physics']}, given {physics}")
        return phases[name]["id"]

    def _shard_name(self, phase: str, split: str) -> str:
        used = {s["file"] for s in self._manifest["shards"]}
        k = 0
        while True:
            name = f"{phase}-{split}-{k:04d}.safetensors"
            if name not in used and not (self.path / name).exists():
                return name
            k += 1

    def add_shard(
        self,
        latents: torch.Tensor,
        actions: torch.Tensor,
        phase: str,
        split: str,
        states: torch.Tensor | None = None,
        metas: Sequence[dict] | None = None,
    ) -> str:
        """latents (n, T, N, D) float, actions (n, T, A), states (n, T, S) or None; one shard file."""
        from safetensors.torch import save

        m = self._manifest
        T, H, W = m["grid"]
        n = latents.shape[0]
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if tuple(latents.shape) != (n, T, H * W, m["enc_dim"]):
            raise ValueError(f"latents must be (n, {T}, {H * W}, {m['enc_dim']}), got {tuple(latents.shape)}")
        if tuple(actions.shape) != (n, T, m["action_dim"]):
            raise ValueError(f"actions must be ({n}, {T}, {m['action_dim']}), got {tuple(actions.shape)}")
        if m["state_dim"] > 0:
            if states is None or tuple(states.shape) != (n, T, m["state_dim"]):
                raise ValueError(
                    f"states must be ({n}, {T}, {m['state_dim']}), got "
                    f"{None if states is None else tuple(states.shape)}"
                )
        elif states is not None:
            raise ValueError(f"the dataset has no states (state_dim 0) but states {tuple(states.shape)} were given")
        pid = self.add_phase(phase)
        tensors = {
            "latents": latents.detach().to("cpu", LATENT_DTYPES[m["latent_dtype"]]).contiguous(),
            "actions": actions.detach().to("cpu", torch.float32).contiguous(),
            "phase": torch.full((n,), pid, dtype=torch.int64),
        }
        if states is not None:
            tensors["states"] = states.detach().to("cpu", torch.float32).contiguous()
        _check_stored_finite(tensors, phase, split)
        data = save(
            tensors, metadata={"hope_kernels": f"{FORMAT_NAME} phase={phase} split={split}"}
        )  # one key: deterministic bytes
        name = self._shard_name(phase, split)
        self._new_files.append(self.path / name)
        atomic_write_bytes(self.path / name, data)
        k = len(m["shards"])
        m["shards"].append(
            {
                "file": name,
                "phase": phase,
                "split": split,
                "n": int(n),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        metas = list(metas) if metas is not None else [{}] * n
        if len(metas) != n:
            raise ValueError(f"metas has {len(metas)} entries for {n} clips")
        for r in range(n):
            m["clips"].append({"shard": k, "row": r, "phase": phase, "split": split, "meta": metas[r]})
        return name

    def commit(self) -> pathlib.Path:
        try:
            atomic_write_bytes(self.path / MANIFEST, (json.dumps(self._manifest, indent=1) + "\n").encode())
            self._new_files = []
        finally:
            self._release()
        return self.path

    def abort(self) -> None:
        for f in self._new_files:
            if f.exists():
                f.unlink()
        self._new_files = []
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def _check_stored_finite(tensors: dict, phase: str, split: str) -> None:
    """Refuse a shard whose tensors, as stored (after the cast), hold NaN or Inf: a value that overflows the
    stored dtype becomes Inf silently."""
    for key, x in tensors.items():
        if x.is_floating_point():
            bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
            if bad.any():
                dtype = str(x.dtype).removeprefix("torch.")
                raise ValueError(
                    f"{key} of row {int(bad.nonzero()[0])} of a {phase}/{split} shard are NaN or Inf "
                    f"as stored in {dtype} (largest finite {dtype}: {torch.finfo(x.dtype).max:.6g})"
                )


# ----------------------------------------------------------------------------------------------- integrity
_MATCHED: set = set()  # (shard path, bytes, mtime_ns, sha256) found intact by this process


def _read_verified(root: pathlib.Path) -> dict:
    try:
        got = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):  # absent, unreadable or corrupt: a cache, so it is simply rebuilt
        return {}
    return got if isinstance(got, dict) else {}


def check_shards(root, shards: Sequence[dict]) -> None:
    """Refuse the first shard whose bytes are not the ones its manifest entry records (size, then sha256), naming
    it and the way to a full report. Each file is hashed once per (size, mtime): matches are cached in
    root/VERIFIED (best effort: a read-only dataset is hashed again by each process)."""
    root = pathlib.Path(root)
    cache, matched = None, []
    for shard in shards:
        f = root / shard["file"]
        try:
            st = f.stat()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shard {f} listed in {root / MANIFEST} is missing (run `hope-kernels verify {root}`)"
            ) from None
        stamp = [st.st_size, st.st_mtime_ns, shard["sha256"]]
        if (str(f), *stamp) in _MATCHED:
            continue
        cache = _read_verified(root) if cache is None else cache
        if cache.get(shard["file"]) != stamp:
            if st.st_size != shard["bytes"]:
                raise ValueError(
                    f"corrupt shard {f}: {st.st_size} bytes, its manifest records {shard['bytes']} "
                    f"(truncated or replaced; run `hope-kernels verify {root}`)"
                )
            if sha256_file(f) != shard["sha256"]:
                raise ValueError(
                    f"corrupt shard {f}: its sha256 differs from the one its manifest records "
                    f"(run `hope-kernels verify {root}`)"
                )
            matched.append((shard["file"], stamp))
        _MATCHED.add((str(f), *stamp))
    if matched:
        cache.update(matched)
        try:
            atomic_write_bytes(root / VERIFIED, json.dumps(cache, sort_keys=True).encode())
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------- reader
class ClipDataset:
    """Lazy view of a dataset folder, optionally filtered to one phase and/or split.

    `ds[i]` -> {"latents": (T, N, D) stored dtype, "actions": (T, A) float32, "states": (T, S) float32 (only
    when S > 0), "phase": str, "split": str, "index": int (global clip index in the manifest)}.
    Attributes: `grid` (T, H, W), `enc_dim` D, `action_dim` A, `state_dim` S, `latent_dtype`, `phases`
    (name -> {"id", "physics"}), `manifest`. Shards are opened memory-mapped on first use; a row read copies
    only that clip.
    """

    def __init__(self, path, phase: str | Sequence[str] | None = None, split: str | Sequence[str] | None = None):
        self.path = pathlib.Path(path)
        self.manifest = m = read_manifest(self.path)
        self.grid = tuple(int(g) for g in m["grid"])
        self.enc_dim = int(m["enc_dim"])
        self.action_dim = int(m["action_dim"])
        self.state_dim = int(m["state_dim"])
        self.latent_dtype = LATENT_DTYPES[m["latent_dtype"]]
        self.phases = m["phases"]
        phases = None if phase is None else ([phase] if isinstance(phase, str) else list(phase))
        splits = None if split is None else ([split] if isinstance(split, str) else list(split))
        for p in phases or []:
            if p not in self.phases:
                raise ValueError(f"phase {p!r} is not in the dataset at {self.path} (it has {list(self.phases)})")
        for s in splits or []:
            if s not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, got {s!r}")
        self.indices = [
            i
            for i, c in enumerate(m["clips"])
            if (phases is None or c["phase"] in phases) and (splits is None or c["split"] in splits)
        ]
        check_shards(self.path, [m["shards"][k] for k in sorted({m["clips"][i]["shard"] for i in self.indices})])
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def _handle(self, k: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked DataLoader worker: open its own maps
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(k)
        if h is None:
            shard = self.manifest["shards"][k]
            f = self.path / shard["file"]
            if not f.is_file():
                raise FileNotFoundError(f"shard {f} listed in {self.path / MANIFEST} is missing")
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError for truncated / corrupt headers
                raise ValueError(f"corrupt shard {f}: {e} (run `hope-kernels verify {self.path}`)") from None
            if len(self._handles) >= 16:
                self._handles.pop(next(iter(self._handles)))
            self._handles[k] = h
        return h

    def meta(self, i: int) -> dict:
        """Per-clip metadata of item i (simulator ground truth, importer source, ...)."""
        return self.manifest["clips"][self.indices[i]].get("meta", {})

    def __getitem__(self, i: int) -> dict:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        n = len(self.indices)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} clips")
        g = self.indices[int(i)]
        c = self.manifest["clips"][g]
        h = self._handle(c["shard"])
        r = c["row"]
        item = {"latents": h.get_slice("latents")[r : r + 1][0], "actions": h.get_slice("actions")[r : r + 1][0]}
        if self.state_dim > 0:
            item["states"] = h.get_slice("states")[r : r + 1][0]
        bad = [k for k, x in item.items() if not bool(torch.isfinite(x).all())]
        if bad:
            f = self.path / self.manifest["shards"][c["shard"]]["file"]
            raise ValueError(
                f"corrupt shard {f}: {' and '.join(bad)} of row {r} (clip {g}) hold NaN or Inf "
                f"(run `hope-kernels verify {self.path}`)"
            )
        item.update(phase=c["phase"], split=c["split"], index=g)
        return item

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_handles"] = {}
        return st


# ----------------------------------------------------------------------------------------------- stream
class LazyClips(Sequence):
    """A read-only list of clip dicts loaded on access (so a long stream never sits in memory at once)."""

    def __init__(self, dataset: ClipDataset, positions: Sequence[int]):
        self._ds, self._pos = dataset, list(positions)

    def __len__(self):
        return len(self._pos)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._ds[p] for p in self._pos[i]]
        return self._ds[self._pos[i]]

    def __add__(self, other):
        return list(self) + list(other)

    def __repr__(self):
        return f"LazyClips({len(self)} clips from {self._ds.path})"


@dataclass
class Stream:
    """The prequential adaptation stream: `clips` in stream order (phase after phase, each a clip dict with
    "phase"), `heldout[phase]` = that phase's held-out clips, `phases` = phase order. `grid`, `enc_dim`,
    `action_dim`, `state_dim` as in ClipDataset. `boundaries[k]` = index in `clips` where phase k starts."""

    clips: Sequence[dict]
    heldout: dict
    phases: tuple
    boundaries: tuple
    grid: tuple
    enc_dim: int
    action_dim: int
    state_dim: int


def make_stream(
    path,
    phases=("A1", "B", "A2"),
    clips_per_phase: int | dict | None = None,
    seed: int = 0,
    part: str = "report",
    reserve: int = 0,
) -> Stream:
    """Stream = the "stream" split of each phase in `phases` order; within a phase the clip order is a
    permutation drawn from `seed` (different seeds = different stream orders), truncated to clips_per_phase
    (None = all; int = same count for every phase; dict phase -> count). Held-out = the "heldout" split of each
    phase, in stored order, independent of seed.

    reserve > 0 splits each phase's stream clips (stored order) in two disjoint parts: part "validation" draws
    from the last `reserve`, part "report" from the others, so hyperparameters chosen on validation streams are
    never chosen on a reported clip."""
    if part not in ("report", "validation"):
        raise ValueError(f"part must be 'report' or 'validation', got {part!r}")
    if not (is_int(reserve) and reserve >= 0):
        raise ValueError(f"reserve must be a non-negative int, got {reserve!r}")
    if part == "validation" and reserve == 0:
        raise ValueError("a validation stream needs reserve > 0 clips per phase set apart from the reported ones")
    phases = (phases,) if isinstance(phases, str) else tuple(phases)
    ds = ClipDataset(path)
    for p in phases:
        if p not in ds.phases:
            raise ValueError(f"phase {p!r} is not in the dataset at {ds.path} (it has {list(ds.phases)})")
    clips = ds.manifest["clips"]
    pos_of = {g: k for k, g in enumerate(ds.indices)}
    order, bounds = [], []
    for pi, p in enumerate(phases):
        cand = [pos_of[g] for g, c in enumerate(clips) if c["phase"] == p and c["split"] == "stream"]
        if reserve:
            if reserve >= len(cand):
                raise ValueError(
                    f"reserve {reserve} leaves no reported stream clips of phase {p!r} ({ds.path} has {len(cand)})"
                )
            cand = cand[len(cand) - reserve :] if part == "validation" else cand[: len(cand) - reserve]
        rng = np.random.default_rng([int(seed), pi])
        cand = [cand[j] for j in rng.permutation(len(cand))]
        want = clips_per_phase.get(p) if isinstance(clips_per_phase, dict) else clips_per_phase
        if want is not None:
            if not ((is_int(want) or isinstance(want, np.integer)) and want >= 0):
                raise ValueError(f"clips_per_phase must be a non-negative int, got {want!r} for phase {p!r}")
            if int(want) > len(cand):
                raise ValueError(
                    f"clips_per_phase asks {want} stream clips of phase {p!r} but {ds.path} has {len(cand)}"
                )
            cand = cand[: int(want)]
        bounds.append(len(order))
        order += cand
    heldout = {
        p: LazyClips(ds, [pos_of[g] for g, c in enumerate(clips) if c["phase"] == p and c["split"] == "heldout"])
        for p in phases
    }
    return Stream(
        clips=LazyClips(ds, order),
        heldout=heldout,
        phases=phases,
        boundaries=tuple(bounds),
        grid=ds.grid,
        enc_dim=ds.enc_dim,
        action_dim=ds.action_dim,
        state_dim=ds.state_dim,
    )


# ----------------------------------------------------------------------------------------------- verify
def verify_dataset(path) -> dict:
    """Check every shard against the manifest (size, sha256, safetensors header, tensor shapes and dtypes, clip
    table). Raises ValueError naming the first broken shard; returns a summary dict when all is well."""
    from safetensors import safe_open

    root = pathlib.Path(path)
    m = read_manifest(root)
    T, H, W = m["grid"]
    D, A, S = m["enc_dim"], m["action_dim"], m["state_dim"]
    total = 0
    for s in m["shards"]:
        f = root / s["file"]
        if not f.is_file():
            raise ValueError(f"shard {s['file']} is missing from {root}")
        size = f.stat().st_size
        if size != s["bytes"]:
            raise ValueError(
                f"shard {s['file']} has {size} bytes, manifest records {s['bytes']} (truncated or replaced)"
            )
        digest = sha256_file(f)
        if digest != s["sha256"]:
            raise ValueError(f"shard {s['file']} is corrupt: sha256 {digest[:16]}... != manifest {s['sha256'][:16]}...")
        n = s["n"]
        expect = {
            "latents": ((n, T, H * W, D), LATENT_DTYPES[m["latent_dtype"]]),
            "actions": ((n, T, A), torch.float32),
            "phase": ((n,), torch.int64),
        }
        if S > 0:
            expect["states"] = ((n, T, S), torch.float32)
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
                if keys != set(expect):
                    raise ValueError(f"shard {s['file']} has tensors {sorted(keys)}, expected {sorted(expect)}")
                for key, (shape, _dtype) in expect.items():
                    t = h.get_slice(key)
                    got = tuple(t.get_shape())
                    if got != shape:
                        raise ValueError(f"shard {s['file']}: {key} has shape {got}, expected {shape}")
                pid = h.get_tensor("phase")
                lat = h.get_slice("latents")[0:1]
                if lat.dtype != expect["latents"][1]:
                    raise ValueError(f"shard {s['file']}: latents dtype {lat.dtype}, expected {expect['latents'][1]}")
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"shard {s['file']} is unreadable: {e}") from None
        want_id = m["phases"][s["phase"]]["id"]
        if not bool((pid == want_id).all()):
            raise ValueError(f"shard {s['file']}: phase ids disagree with its phase {s['phase']!r} (id {want_id})")
        total += n
    rows = [(c["shard"], c["row"]) for c in m["clips"]]
    expect_rows = [(k, r) for k, s in enumerate(m["shards"]) for r in range(s["n"])]
    if sorted(rows) != expect_rows:
        raise ValueError(
            f"manifest clip table of {root} does not match its shards ({len(rows)} clips listed, "
            f"{total} rows in shards)"
        )
    return {
        "clips": total,
        "shards": len(m["shards"]),
        "bytes": sum(s["bytes"] for s in m["shards"]),
        "phases": {p: sum(1 for c in m["clips"] if c["phase"] == p) for p in m["phases"]},
    }
