"""Helpers shared by the tests (imported as `helpers`: tests/ is on pytest's path): the repository root,
tolerances and error measure of fast paths against their reference, and which backends run here."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Relative-error tolerances of a fast path against the reference, per dtype. Low precision is compared with
# a float64 reference and allowed at most 2x what PyTorch's own low-precision eager run loses (checked in tests).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (NaN anywhere gives inf)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cpu_fast_backends():
    """Backends that can run on CPU tensors in this environment (compiled C++ and interpreted Triton)."""
    from hope_kernels.dispatch import has_cpp, triton_can_run

    cpu = torch.device("cpu")
    return [b for b, ok in (("cpu", has_cpp()), ("triton", triton_can_run(cpu))) if ok]
