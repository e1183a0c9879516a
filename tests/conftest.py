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


def _expected_minutes(item) -> float:
    mark = item.get_closest_marker("slow")
    return 0.0 if mark is None else float(mark.kwargs.get("minutes", 1.0))


def pytest_collection_modifyitems(config, items):
    """Longest first (`@pytest.mark.slow(minutes=...)`; stable order otherwise): under `-n 2 --dist loadgroup`
    the two learning runs start at once on separate workers while the short tests fill in around them."""
    items.sort(key=lambda item: -_expected_minutes(item))
