"""Input validation shared by the ops: errors name the argument, what was expected and what was given."""

from __future__ import annotations

import os
from typing import Sequence

import torch


def check_tensor(name: str, x, *, ndim: int | None = None, shape_doc: str = "", floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc or f'{ndim}-D'}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    ref = tensors[0].shape
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape != ref:
            raise ValueError(f"{n} must have the shape of {names[0]} {tuple(ref)}, got {tuple(t.shape)}")


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor | None]) -> None:
    pairs = [(n, t) for n, t in zip(names, tensors) if isinstance(t, torch.Tensor)]
    dev = pairs[0][1].device
    for n, t in pairs[1:]:
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {pairs[0][0]} is on {dev}: all inputs must share a device")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    dt = tensors[0].dtype
    for n, t in zip(names[1:], tensors[1:]):
        if t.dtype != dt:
            raise TypeError(f"{n} has dtype {t.dtype} but {names[0]} has {dt}: they must match")


DEBUG_ENV = "HOPE_KERNELS_DEBUG"


def reads_values(*tensors: torch.Tensor | None) -> bool:
    """Whether an op should check these tensors' values (gate ranges, weights, orders). Reading a value off a
    GPU is a host sync that stalls the launch queue in every layer, so there the checks run only with
    HOPE_KERNELS_DEBUG=1; CPU tensors are always checked. Never while torch.compile traces (fake tensors)."""
    if torch.compiler.is_compiling():
        return False
    on_cpu = all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))
    return on_cpu or os.environ.get(DEBUG_ENV) == "1"


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / reduction dtype: float64 stays float64, everything else reduces in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def env_int(name: str, default: int) -> int:
    """An integer setting from the environment variable `name` (unset or empty: default)."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def env_choice(op: str, arg: str, value: str | None, name: str, choices: tuple[str, ...]) -> str:
    """A kernel mode: `value` (the launcher's argument `arg`), else the environment variable `name`, else
    choices[0]; anything not in `choices` is a ValueError that names both."""
    mode = value or os.environ.get(name) or choices[0]
    if mode not in choices:
        raise ValueError(f"{op}: {name} / {arg} must be one of {choices}, got {mode!r}")
    return mode
