"""Shared test set-up. Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before any test module loads."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`-n N`) the workers share the machine's cores: one worker's intra-op threads would spin
# against another's, so each gets its share.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread, restoring the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cpu_fast_backends():
    """Backends that can run on CPU tensors in this environment (compiled C++ and interpreted Triton)."""
    from hope_kernels.dispatch import has_cpp, triton_can_run
    cpu = torch.device("cpu")
    return [b for b, ok in (("cpu", has_cpp()), ("triton", triton_can_run(cpu))) if ok]


def _expected_minutes(item) -> float:
    mark = item.get_closest_marker("slow")
    return 0.0 if mark is None else float(mark.kwargs.get("minutes", 1.0))


def pytest_collection_modifyitems(config, items):
    """Longest first (`@pytest.mark.slow(minutes=...)`; stable order otherwise): under `-n 2 --dist loadgroup`
    the two learning runs start at once on separate workers while the short tests fill in around them."""
    items.sort(key=lambda item: -_expected_minutes(item))
