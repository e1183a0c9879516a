"""Backend selection shared by every op.

Order of precedence: an explicit `backend=` argument, else the `HOPE_KERNELS_BACKEND` environment variable,
else "auto". Auto picks, for CUDA tensors, the op's preferred GPU path (triton or cuda); for CPU tensors the
compiled C++ kernels when built, else the eager reference. An explicitly requested backend that cannot run
on the given tensors raises `BackendUnavailableError`: never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from typing import Iterable, Sequence

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
ENV_VAR = "HOPE_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here (not built, or wrong device)."""


@cache
def _extension():
    """The compiled module hope_kernels._C, or None when it was not built."""
    try:
        from hope_kernels import _C  # noqa: F401  (importing registers the C++/CUDA ops)
    except ImportError:
        return None
    return _C


def extension_error() -> str | None:
    """Why the compiled extension is missing (None when it loaded)."""
    try:
        from hope_kernels import _C  # noqa: F401
    except ImportError as e:
        return f"{e} (build it with `pip install --no-build-isolation -e .`)"
    return None


def has_cpp() -> bool:
    return _extension() is not None


def has_cuda_kernels() -> bool:
    ext = _extension()
    return bool(ext is not None and getattr(ext, "with_cuda", False) and torch.cuda.is_available())


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_can_run(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (tests)."""
    if not has_triton():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpret())


def backends() -> dict[str, bool]:
    """Which backends this installation can run: {"reference": True, "triton": ..., "cuda": ..., "cpu": ...}."""
    return {
        "reference": True,
        "triton": has_triton() and (torch.cuda.is_available() or triton_interpret()),
        "cuda": has_cuda_kernels(),
        "cpu": has_cpp(),
    }


def _device_of(tensors: Iterable[torch.Tensor | None]) -> torch.device:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return devices.pop() if devices else torch.device("cpu")


def needs_backward(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will run the backward of an op called now on `tensors`."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


@torch.compiler.assume_constant_result  # a device property: torch.compile reads it once while tracing
def _shared_memory_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index if index >= 0 else torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


def cuda_shared_memory_per_block(device: torch.device) -> int:
    """Bytes of dynamic shared memory one block may opt in to on `device` (227 KiB on sm_90)."""
    return _shared_memory_optin(-1 if device.index is None else device.index)


@torch.compiler.assume_constant_result  # a function of the (static) head sizes: a constant while tracing
def cuda_shared_memory_need(kernel: str, dk: int, dv: int, acc_bytes: int) -> int:
    """Bytes of shared memory per block the CUDA kernel `kernel` ("dgd_fwd", "dgd_bwd", "titans_linear_fwd",
    "titans_linear_bwd") launches with for these head sizes: read from the extension (csrc/cuda_smem.h, the
    numbers the launchers use), so no copy of the formulas lives in Python."""
    ext = _extension()
    if ext is None:
        raise BackendUnavailableError(f"the cuda backend's shared-memory need is not known: {extension_error()}")
    return ext.cuda_shared_memory(kernel, dk, dv, acc_bytes)


def cuda_shared_memory_problem(op: str, need: tuple[int, str] | None, device: torch.device) -> str | None:
    """Why the cuda kernels cannot take this call on `device`, or None. need: (bytes per block, how they
    follow from the shapes). Checked here rather than only by the kernels' launchers: an error raised in the
    compiled CUDA launcher crashed the process on an H200 (2026-11-27) instead of reaching Python."""
    if need is None or device.type != "cuda":
        return None
    limit = cuda_shared_memory_per_block(device)
    if need[0] <= limit:
        return None
    return (
        f"{op}: the cuda backend needs {need[0]} bytes of shared memory per block for these shapes "
        f"({need[1]}); {device} allows {limit}; use smaller heads or backend='reference'"
    )


def require_cuda_shared_memory(op: str, need: tuple[int, str] | None, device: torch.device) -> None:
    """Raise ValueError when the cuda kernels cannot take this call on `device` (cuda_shared_memory_problem)."""
    problem = cuda_shared_memory_problem(op, need, device)
    if problem:
        raise ValueError(problem)


def requested_backend(backend: str | None, op: str) -> tuple[str, str]:
    """(the backend asked for: `backend`, else HOPE_KERNELS_BACKEND when it is None or "auto", else "auto"; where
    it came from, for error messages). Raises ValueError for a name outside BACKENDS."""
    if backend is None:
        backend = "auto"
    source = ""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f" (from {ENV_VAR})" if backend != "auto" else ""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}{source}")
    return backend, source


def require_available(backend: str, source: str, device: torch.device, op: str, supported: Sequence[str]) -> None:
    """Raise BackendUnavailableError when the explicitly requested `backend` is not in `supported` (the op's
    backends) or cannot run on `device` tensors here."""
    if backend not in supported:
        raise BackendUnavailableError(
            f"{op}: backend {backend!r}{source} is not implemented for this op (implemented: {', '.join(supported)})"
        )
    if not _available(backend, device):
        raise BackendUnavailableError(
            f"{op}: backend {backend!r}{source} cannot run on {device} tensors here: "
            f"{_why_unavailable(backend, device)}"
        )


def _available(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "triton":
        return triton_can_run(device)
    if backend == "cuda":
        return device.type == "cuda" and has_cuda_kernels()
    if backend == "cpu":
        return device.type == "cpu" and has_cpp()
    return False


def _why_unavailable(backend: str, device: torch.device) -> str:
    if backend == "triton":
        if not has_triton():
            return "triton is not installed"
        return "Triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU tensors)"
    if backend == "cuda":
        if device.type != "cuda":
            return "the cuda backend needs CUDA tensors"
        return "the extension was built without CUDA kernels" if has_cpp() else (extension_error() or "")
    if backend == "cpu":
        if device.type != "cpu":
            return "the cpu backend needs CPU tensors"
        return extension_error() or "the compiled extension is missing"
    return "unknown"
