"""Backend choice against the device's shared memory (hope_kernels.dispatch), on CPU with a pretend CUDA device.

The CUDA kernels of dgd_memory and titans_memory keep their state tiles in shared memory. The dispatcher sizes
them from the shapes and checks the device's opt-in limit before any launcher runs: auto passes over cuda,
an explicit backend="cuda" raises ValueError."""
import re
from pathlib import Path

import pytest
import torch

import hope_kernels.dispatch as D
from hope_kernels.ops import dgd as dgd_ops
from hope_kernels.ops import titans as titans_ops

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
H100_OPTIN = 232448  # sm_90: 227 KiB


@pytest.fixture
def pretend_cuda(monkeypatch):
    """Every tensor counts as a CUDA tensor on a device with H100_OPTIN bytes; every backend is built."""
    monkeypatch.setattr(D, "_device_of", lambda tensors: torch.device("cuda", 0))
    monkeypatch.setattr(D, "_available", lambda backend, device: True)
    monkeypatch.setattr(D, "cuda_shared_memory_per_block", lambda device: H100_OPTIN)


def _dgd(dk, dv, dtype=torch.float32):
    q, v = torch.zeros(1, 1, 3, dk, dtype=dtype), torch.zeros(1, 1, 3, dv, dtype=dtype)
    a = torch.ones(1, 1, 3, dtype=dtype)
    return (q, q, v, a, a, None)


def _titans(dk, dv, dtype=torch.float32):
    q, v = torch.zeros(1, 1, 3, dk, dtype=dtype), torch.zeros(1, 1, 3, dv, dtype=dtype)
    a = torch.ones(1, 1, 3, dtype=dtype)
    return (q, q, v, a, a, a)


def test_shared_memory_sizes_follow_the_cuda_sources():
    """The Python sizes mirror the launchers: the tile constants they assume are the ones in the .cu files."""
    titans = (CSRC / "titans.cu").read_text()
    assert re.search(r"constexpr int kCols = 32;", titans)
    assert re.search(r"constexpr int kStride = kCols \+ 8;", titans)
    assert re.search(r"constexpr int kThreads = kCols \* kRowLanes;", titans)
    assert re.search(r"constexpr int kRowLanes = 4;", titans)
    assert "3 * static_cast<size_t>(dk) * kStride * sizeof(acc_t)" in titans
    assert "(4 * static_cast<size_t>(dk) * kStride + 3 * kWarps * static_cast<size_t>(dk) + 3 * kWarps)" in titans
    dgd = (CSRC / "dgd.cu").read_text()
    assert re.search(r"constexpr int kThreads = 128;", dgd)
    assert "(2 * static_cast<size_t>(dk) * dv + 2 * dk) * sizeof(acc_t)" in dgd
    assert "(3 * static_cast<size_t>(dk) * dv + 2 * dk + 3 * dv + kThreads) * sizeof(acc_t)" in dgd
    q = torch.zeros(1, 1, 1, 64)
    assert titans_ops.cuda_shared_memory(q, "fwd")[0] == 3 * 64 * 40 * 4
    assert titans_ops.cuda_shared_memory(q.double(), "bwd")[0] == (4 * 64 * 40 + 12 * 64 + 12) * 8
    v = torch.zeros(1, 1, 1, 32)
    assert dgd_ops.cuda_shared_memory(q, v, "fwd")[0] == (2 * 64 * 32 + 2 * 64) * 4
    assert dgd_ops.cuda_shared_memory(q.half(), v, "both")[0] == (3 * 64 * 32 + 2 * 64 + 3 * 32 + 128) * 4


def test_auto_passes_over_cuda_when_the_tiles_do_not_fit(pretend_cuda):
    assert dgd_ops._resolve("auto", _dgd(128, 128)) == "cuda"          # triton takes <= 64; 197 KB fit
    assert dgd_ops._resolve("auto", _dgd(256, 256)) == "reference"     # 792 KB do not
    assert dgd_ops._resolve("auto", _dgd(32, 32)) == "triton"
    assert titans_ops._resolve("auto", "linear", _titans(256, 64)) == "cuda"     # 176 KB
    assert titans_ops._resolve("auto", "linear", _titans(2048, 4)) == "reference"


def test_explicit_cuda_raises_a_clear_error(pretend_cuda):
    with pytest.raises(ValueError, match=r"dgd_memory: the cuda backend needs 792064 bytes of shared memory per "
                                         r"block .*dk=256, dv=256.* allows 232448"):
        dgd_ops._resolve("cuda", _dgd(256, 256))
    with pytest.raises(ValueError, match=r"titans_memory: .* shared memory .*dk=2048"):
        titans_ops._resolve("cuda", "linear", _titans(2048, 4))
    # dk = dv = 160: the forward's 206 KB fit, the backward's 311 KB do not
    assert dgd_ops._resolve("cuda", _dgd(160, 160), "fwd") == "cuda"
    with pytest.raises(ValueError, match="backward"):
        dgd_ops._resolve("cuda", _dgd(160, 160), "bwd")
    assert dgd_ops._resolve("auto", _dgd(160, 160), "fwd") == "cuda"
    assert dgd_ops._resolve("auto", _dgd(160, 160), "both") == "reference"


def test_needs_backward():
    x = torch.zeros(2)
    assert not D.needs_backward(x, None)
    assert D.needs_backward(x, x.clone().requires_grad_(True))
    with torch.no_grad():
        assert not D.needs_backward(x.clone().requires_grad_(True))


def test_cpu_tensors_never_consult_the_cuda_limit(monkeypatch):
    monkeypatch.setattr(D, "cuda_shared_memory_per_block", lambda device: pytest.fail("queried on CPU"))
    assert D.cuda_shared_memory_problem("op", (1 << 40, "huge"), torch.device("cpu")) is None
    assert dgd_ops._resolve("reference", _dgd(256, 256)) == "reference"


def test_errors_name_the_environment_variable(monkeypatch):
    """A backend forced through HOPE_KERNELS_BACKEND that an op lacks says where the choice came from."""
    x = torch.zeros(1, 1, 2, 6)
    pos = torch.zeros(2, 3, dtype=torch.int64)
    monkeypatch.setenv(D.ENV_VAR, "triton")
    from hope_kernels.ops import rope3d
    with pytest.raises(D.BackendUnavailableError, match="'triton' \\(from HOPE_KERNELS_BACKEND\\) is not implemented"):
        rope3d(x, pos)
    monkeypatch.setenv(D.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="got 'fastest' \\(from HOPE_KERNELS_BACKEND\\)"):
        rope3d(x, pos)
    with pytest.raises(D.BackendUnavailableError, match="'triton' is not implemented"):
        rope3d(x, pos, backend="triton")


def test_value_checks_read_gpu_tensors_only_in_debug(monkeypatch):
    """Gate ranges, L1 weights: reading values off a GPU is a host sync per call, so only HOPE_KERNELS_DEBUG=1
    reads them there (a meta tensor stands in for a GPU one); CPU tensors are always read."""
    from hope_kernels.ops.checks import DEBUG_ENV, reads_values
    cpu, dev = torch.zeros(2), torch.zeros(2, device="meta")
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert reads_values(cpu, None) and not reads_values(dev) and not reads_values(cpu, dev)
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert reads_values(dev)


@pytest.mark.parametrize("op", ["dgd", "titans"])
def test_gate_checks_follow_reads_values(op, monkeypatch):
    """The memory ops consult reads_values before their gate checks: with it off, alpha = 2 is not read."""
    mod, args = (dgd_ops, _dgd(4, 4)[:5]) if op == "dgd" else (titans_ops, _titans(4, 4))
    bad = list(args)
    bad[3] = torch.full_like(args[3], 2.0)
    fn = dgd_ops.dgd_memory if op == "dgd" else titans_ops.titans_memory
    with pytest.raises(ValueError, match="alpha must be"):
        fn(*bad, backend="reference")
    monkeypatch.setattr(mod, "reads_values", lambda *t: False)
    fn(*bad, backend="reference")
