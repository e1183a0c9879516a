"""Atomic file writes shared by the dataset format, checkpoints' neighbours and the reports: a temp file in the
target's folder, fsync, then os.replace, so a reader never sees a half-written file and an error leaves the
previous file intact."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call write(tmp_path) to produce `path`'s new content in a temp file beside it, fsync it, then rename it
    over `path`; creates the parent folder. Any error (or interrupt) removes the temp file and leaves `path` as it
    was. Returns the path. For writers that need a file name (safetensors' save_file); bytes: atomic_write_bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600, and a writer may replace the file; datasets, checkpoints, results are shared
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically (atomic_write); creates the parent folder. Returns the path."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def read_safetensors(path, what: str) -> tuple[dict, dict]:
    """-> (metadata, {name: tensor}) of a safetensors file, read without pickle. `what` names the file in errors
    ("checkpoint", "shipped weights"): FileNotFoundError when it is missing, ValueError when it is not a readable
    safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{what} {path!r} is corrupt or not a safetensors file: {e}") from None


def check_output_dir(path, what: str) -> Path:
    """Refuse, before any work, an output folder that can never be written: `path` is an existing file, or an
    existing ancestor of it is a file. `what` names it in the error ("--out"). Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is a file, not a folder")
    _check_ancestors(path, what)
    return path


def check_output_file(path, what: str) -> Path:
    """Refuse, before any work, an output file that can never be written: `path` is an existing folder, or an
    existing ancestor of it is a file. `what` names it in the error ("--log"). Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder, expected a file path")
    _check_ancestors(path, what)
    return path


def _check_ancestors(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a folder (else no parent folder can be created)."""
    for parent in path.parents:   # relative paths end at ".", which exists
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, "
                                         f"not a folder")
            return
