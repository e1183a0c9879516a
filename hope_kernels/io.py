"""File safety shared by the dataset format, checkpoints and the reports.

- Atomic writes (bytes, text, strict JSON, or any writer that needs a file name): a temp file in the target's
  folder, fsync, then os.replace, so a reader never sees a half-written file and an error leaves the previous
  file intact.
- One writer per output folder: an advisory lock (`FolderLock`), and the clean-up of temp files a killed
  writer left, done only while holding that lock.
- Output paths checked before any work (`check_output_dir`, `check_output_file`)."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: folders are not locked
    fcntl = None

LOCK_FILE = ".hope-kernels.lock"


class DiskFullError(OSError):
    """No space was left to write a file (the message names it); `kept`: its previous version exists, intact."""

    def __init__(self, message: str, kept: bool = True):  # a default: exceptions are re-made from args
        super().__init__(message)
        self.kept = kept


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library re-raised it as its own error (safetensors' SafetensorError)."""
    return (
        isinstance(e, DiskFullError)
        or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left on device" in str(e)
    )


def atomic_write(path, write) -> Path:
    """Call write(tmp_path) to produce `path`'s new content in a temp file beside it, fsync it, then rename it
    over `path`; creates the parent folder. Any error (or interrupt) removes the temp file and leaves `path` as it
    was; a full disk raises DiskFullError naming the file. Returns the path. For writers that need a file name
    (safetensors' save_file); bytes: atomic_write_bytes."""
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
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(e):
            kept = path.exists()
            what = "its previous version is intact" if kept else "nothing was written"
            raise DiskFullError(f"no space left on the device while writing {str(path)!r} ({what})", kept) from None
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically (atomic_write); creates the parent folder. Returns the path."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj):
    """Replace NaN/Inf by None and tuples by lists, keys to str, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def atomic_write_json(path, obj) -> Path:
    """Write `obj` as strict JSON (jsonable: NaN/Inf -> null) to `path` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")


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
    for parent in path.parents:  # relative paths end at ".", which exists
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder"
                )
            return


class FolderInUseError(RuntimeError):
    """Another live process is writing to the folder."""


_HELD: dict[str, list] = {}  # real path -> [fd, depth]: a process may re-enter a folder it holds


class FolderLock:
    """One writer per folder: an exclusive `flock` on `folder/.hope-kernels.lock`, which holds the holder's pid.

    A second process gets FolderInUseError naming the folder and that pid. The kernel drops the lock when its
    holder exits, kill -9 included, so the file a killed process left is simply taken over. Release deletes the
    file while still holding the lock, and a process that locked a file which was deleted meanwhile tries again,
    so two processes never hold two different files. Re-entrant within a process. Use as a context manager, or
    acquire() / release()."""

    def __init__(self, folder, what: str):
        self.folder, self.what = Path(folder), what
        self._key = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.folder)
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            _HELD[key] = [self._lock_file() if fcntl is not None else None, 1]
        self._key = key
        return self

    def _lock_file(self) -> int:
        path = self.folder / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUseError(
                    f"{self.what} {str(self.folder)!r} is in use by process {holder} (lock "
                    f"{path}): wait for it to finish, or choose another folder"
                ) from None
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)  # its holder released and deleted it between our open and our lock: again

    def release(self) -> None:
        if self._key is None:
            return
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._key]
            if held[0] is not None:
                (self.folder / LOCK_FILE).unlink(missing_ok=True)
                os.close(held[0])  # closing the last descriptor drops the flock
        self._key = None

    def __enter__(self) -> Path:
        self.acquire()
        return self.folder

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def remove_temp_files(folder, recursive: bool = False) -> list[Path]:
    """Delete the temp files (`.NAME.XXXX.tmp`, atomic_write's) a killed writer left in `folder`. Call it only
    while holding the folder's FolderLock: a live writer's temp file would go too. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed = []
    for f in found:
        if f.is_file():
            f.unlink()
            removed.append(f)
    return removed
