"""Backend choice against the device's shared memory (hope_kernels.dispatch), on CPU with a pretend CUDA device.

The CUDA kernels of dgd_memory and titans_memory keep their state tiles in shared memory. The dispatcher sizes
them from the shapes and checks the device's opt-in limit before any launcher runs: auto passes over cuda,
an explicit backend="cuda" raises ValueError."""

import pytest
import torch

import hope_kernels.dispatch as D
from hope_kernels.ops import dgd as dgd_ops
from hope_kernels.ops import titans as titans_ops

H100_OPTIN = 232448  # sm_90: 227 KiB
# the shared-memory needs of the cuda kernels come from the extension (csrc/cuda_smem.h)
needs_cpp = pytest.mark.skipif(not D.has_cpp(), reason="needs the C++ extension")


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


@needs_cpp
def test_shared_memory_needs_follow_the_documented_formulas():
    """The launchers and the dispatcher size shared memory from one source, csrc/cuda_smem.h, which the extension
    exports (built with or without CUDA); its numbers are the formulas the error messages state."""
    from hope_kernels import _C

    for dk, dv, acc in ((1, 1, 4), (64, 32, 4), (160, 160, 4), (256, 256, 8), (2048, 4, 4)):
        assert _C.cuda_shared_memory("dgd_fwd", dk, dv, acc) == (2 * dk * dv + 2 * dk) * acc
        assert _C.cuda_shared_memory("dgd_bwd", dk, dv, acc) == (3 * dk * dv + 2 * dk + 3 * dv + 128) * acc
        assert _C.cuda_shared_memory("titans_linear_fwd", dk, dv, acc) == 3 * dk * 40 * acc
        assert _C.cuda_shared_memory("titans_linear_bwd", dk, dv, acc) == (4 * dk * 40 + 12 * dk + 12) * acc
    with pytest.raises(ValueError, match="kernel must be one of .*, got 'rope'"):
        _C.cuda_shared_memory("rope", 1, 1, 4)
    q = torch.zeros(1, 1, 1, 64)
    assert titans_ops.cuda_shared_memory(q, "fwd") == (3 * 64 * 40 * 4, "forward 3 * dk * 40 * 4 with dk=64")
    assert titans_ops.cuda_shared_memory(q.double(), "bwd")[0] == (4 * 64 * 40 + 12 * 64 + 12) * 8
    v = torch.zeros(1, 1, 1, 32)
    assert dgd_ops.cuda_shared_memory(q, v, "fwd")[0] == (2 * 64 * 32 + 2 * 64) * 4
    assert dgd_ops.cuda_shared_memory(q.half(), v, "both")[0] == (3 * 64 * 32 + 2 * 64 + 3 * 32 + 128) * 4


@needs_cpp
def test_auto_passes_over_cuda_when_the_tiles_do_not_fit(pretend_cuda):
    assert dgd_ops._resolve("auto", _dgd(128, 128)) == "cuda"  # triton takes <= 64; 197 KB fit
    assert dgd_ops._resolve("auto", _dgd(256, 256)) == "reference"  # 792 KB do not
    assert dgd_ops._resolve("auto", _dgd(32, 32)) == "triton"
    assert titans_ops._resolve("auto", "linear", _titans(256, 64)) == "cuda"  # 176 KB
    assert titans_ops._resolve("auto", "linear", _titans(2048, 4)) == "reference"


@needs_cpp
def test_explicit_cuda_raises_a_clear_error(pretend_cuda):
    with pytest.raises(
        ValueError,
        match=r"dgd_memory: the cuda backend needs 792064 bytes of shared memory per "
        r"block .*dk=256, dv=256.* allows 232448",
    ):
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


def test_registry_toy_op():
    """The generic registry on a toy op, y = 2 x: one table entry per backend gives a custom op with its fake
    kernel and autograd, auto picks by priority among the backends that accept the inputs, and an explicit one
    that refuses them raises its reason."""
    from hope_kernels.ops.registry import Backend, OpTable, register

    def setup(ctx, inputs, output):
        pass

    def backward(ctx, backward_op, grad):
        return backward_op(grad)

    toy = register(
        OpTable(
            name="test_registry_toy",
            label="toy",
            schema="(Tensor x) -> Tensor",
            backward_schema="(Tensor g) -> Tensor",
            fake=torch.empty_like,
            fake_backward=torch.empty_like,
            setup_context=setup,
            backward=backward,
            backends=(
                Backend(
                    "cpu",
                    lambda x: x * 2,
                    lambda g: g * 2,
                    devices=("cpu",),
                    priority=1,
                    accepts=lambda x, device: "takes float64 only" if x.dtype != torch.float64 else None,
                ),
                Backend("triton", lambda x: x + x, lambda g: g + g, devices=("cpu",)),
            ),
        )
    )
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert toy.resolve("auto", (x,), x) == (
        "cpu" if D.has_cpp() else "triton" if D.triton_can_run(x.device) else "reference"
    )
    assert toy.resolve("auto", (x,), x.float()) in ("triton", "reference")
    assert toy.supported == ("reference", "cpu", "triton")
    with pytest.raises(
        D.BackendUnavailableError,
        match="'cuda' is not implemented for this op "
        r"\(implemented: reference, cpu, triton\)",
    ):
        toy.resolve("cuda", (x,), x)
    if D.has_cpp():
        with pytest.raises(D.BackendUnavailableError, match="takes float64 only"):
            toy.resolve("cpu", (x,), x.float())
    y = toy("cpu", x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, 2 * x) and torch.equal(g, torch.full_like(x, 2.0))
    torch.library.opcheck(toy.ops["cpu"], (x,))
    compiled = torch.compile(lambda a: toy("cpu", a), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), 2 * x)
