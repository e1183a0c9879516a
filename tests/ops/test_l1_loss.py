"""l1_rollout_loss: every available backend against the eager reference, forward and backward."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import HAS_CUDA, RTOL, cpu_fast_backends, rel_err, requires_cuda
from hope_kernels import backends
from hope_kernels.dispatch import BackendUnavailableError
from hope_kernels.ops import l1_rollout_loss
from hope_kernels.ops.l1_loss.reference import l1_rollout_loss_reference

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 8, 4, 100), (2, 2, 3, 1024), (3, 1, 2, 33)]
FAST_CPU = cpu_fast_backends()


def _inputs(shape, dtype, device="cpu", weight=True):
    pred = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    target = torch.randn(shape, dtype=dtype, device=device) * 3 + 1.5
    w = torch.rand(shape[1], dtype=dtype, device=device) + 0.1 if weight else None
    return pred, target, w


def _check_against_reference(backend, shape, dtype, device, normalize=True, weight=True):
    pred, target, w = _inputs(shape, dtype, device, weight)
    loss, per_step = l1_rollout_loss(pred, target, w, normalize_target=normalize, backend=backend)
    # extra weight on per_step so its own gradient path is exercised too
    (loss + per_step.sum() * 0.25).backward()
    grad = pred.grad.clone()
    pred.grad = None
    ref_loss, ref_per_step = l1_rollout_loss_reference(
        pred.double(), target.double(), None if w is None else w.double(), normalize
    )
    (ref_loss + ref_per_step.sum() * 0.25).backward()
    tol = RTOL[dtype] if dtype in (torch.float64, torch.float32) else 2e-2
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert per_step.shape == (shape[1],)
    assert rel_err(loss, ref_loss) < tol
    assert rel_err(per_step, ref_per_step) < tol
    # sign() of a difference: equal to the reference except where the float64 difference is tiny
    assert rel_err(grad, pred.grad) < (tol if dtype in (torch.float64, torch.float32) else 5e-2)


@pytest.mark.parametrize("backend", FAST_CPU + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_cpu(backend, dtype, shape):
    _check_against_reference(backend, shape, dtype, "cpu")


@pytest.mark.parametrize("backend", FAST_CPU)
@pytest.mark.parametrize("normalize,weight", [(False, True), (True, False), (False, False)])
def test_options_cpu(backend, normalize, weight):
    _check_against_reference(backend, (2, 4, 3, 20), torch.float64, "cpu", normalize, weight)


@pytest.mark.parametrize("backend", FAST_CPU + ["reference"])
def test_non_contiguous_inputs_cpu(backend):
    """pred a transposed view of a leaf, target strided along D: forward and the leaf's gradient."""
    leaf = torch.randn(2, 5, 3, 33, dtype=torch.float64, requires_grad=True)
    target = (torch.randn(2, 3, 5, 66, dtype=torch.float64) * 3 + 1.5)[..., ::2]
    w = torch.rand(3, dtype=torch.float64) + 0.1
    loss, per_step = l1_rollout_loss(leaf.transpose(1, 2), target, w, backend=backend)
    (loss + per_step.sum() * 0.25).backward()
    grad, leaf.grad = leaf.grad.clone(), None
    ref_loss, ref_per_step = l1_rollout_loss_reference(leaf.transpose(1, 2), target.contiguous(), w)
    (ref_loss + ref_per_step.sum() * 0.25).backward()
    assert rel_err(loss, ref_loss) < 1e-10 and rel_err(per_step, ref_per_step) < 1e-10
    assert rel_err(grad, leaf.grad) < 1e-10


@pytest.mark.parametrize("backend", FAST_CPU + ["reference"])
def test_zero_step_weights_cpu(backend):
    """Steps of weight 0 get gradient 0 (and still their per_step value); the others match the reference."""
    w = torch.tensor([0.0, 1.5, 0.0, 0.5], dtype=torch.float64)
    pred, target, _ = _inputs((2, 4, 3, 20), torch.float64)
    loss, per_step = l1_rollout_loss(pred, target, w, backend=backend)
    loss.backward()
    ref_pred = pred.detach().clone().requires_grad_(True)
    ref_loss, ref_per_step = l1_rollout_loss_reference(ref_pred, target, w)
    ref_loss.backward()
    assert rel_err(loss, ref_loss) < 1e-10 and rel_err(per_step, ref_per_step) < 1e-10
    assert torch.count_nonzero(pred.grad[:, [0, 2]]) == 0 and torch.count_nonzero(pred.grad[:, [1, 3]]) > 0
    assert rel_err(pred.grad, ref_pred.grad) < 1e-10


@pytest.mark.skipif("cpu" not in FAST_CPU, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1, 8, 13, 64])
def test_cpu_eager_lane_keeps_signs_for_backward(D, dtype):
    """With pred requiring a gradient the eager CPU lane saves the signs of pred - target_n for backward, not pred
    and target: two bitmaps per row (> 0, < 0), ceil(D / 8) bytes each; under no_grad it writes none. (Ties,
    which set neither bit: test_exact_ties_give_zero_gradient.)"""
    pred, target, w = _inputs((2, 3, 2, D), dtype)
    loss, _ = l1_rollout_loss(pred, target, w, backend="cpu")
    bits = loss.grad_fn.saved_tensors[0]
    assert bits.dtype == torch.uint8 and bits.shape == (2, 3, 2, 2, (D + 7) // 8)
    unpack = lambda b: ((b[..., None].long() >> torch.arange(8)) & 1).flatten(-2)[..., :D]  # noqa: E731
    sign = unpack(bits[..., 0, :]) - unpack(bits[..., 1, :])
    ref = torch.sign(pred.detach() - torch.nn.functional.layer_norm(target, (D,), eps=1e-6)).long()
    assert torch.equal(sign, ref)
    with torch.no_grad():
        assert torch.equal(l1_rollout_loss(pred, target, w, backend="cpu")[0], loss.detach())


@pytest.mark.skipif("cpu" not in FAST_CPU, reason="needs the C++ extension")
def test_cpu_large_gradient():
    """Outputs of 2 MiB or more come from the C++ huge-page block cache: right values, a freed gradient's block
    serves the next one (reused, not zeroed: every element is written again), and the gradient is an ordinary
    tensor (grown in place, freed)."""
    _check_against_reference("cpu", (1, 2, 256, 1024), torch.float32, "cpu")
    pred, target, w = _inputs((1, 2, 256, 1024), torch.float32)
    l1_rollout_loss(pred, target, w, backend="cpu")[0].backward()
    want, ptr = pred.grad.clone(), pred.grad.data_ptr()
    pred.grad.fill_(float("nan"))
    pred.grad = None
    l1_rollout_loss(pred, target, w, backend="cpu")[0].backward()
    assert pred.grad.data_ptr() == ptr and torch.equal(pred.grad, want)
    g = pred.grad
    g.resize_(2 * g.numel())
    assert torch.equal(g[: want.numel()].view_as(want), want)
    g.fill_(1.0)


@pytest.mark.skipif("cpu" not in FAST_CPU, reason="needs the C++ extension")
def test_cpu_baseline_instruction_set():
    """The C++ row loops are compiled for AVX2 and for baseline x86-64 and picked by ATen's CPU capability;
    ATEN_CPU_CAPABILITY=default (in a fresh process: it is read once) runs the baseline build."""
    code = (
        "import torch, hope_kernels\n"
        "from hope_kernels.ops import l1_rollout_loss\n"
        "from hope_kernels.ops.l1_loss.reference import l1_rollout_loss_reference as ref\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "torch.manual_seed(0)\n"
        "for shape in [(2, 3, 5, 7), (2, 2, 3, 1024), (1, 2, 256, 1024)]:\n"
        "    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):\n"
        "        p = torch.randn(shape, dtype=dtype, requires_grad=True)\n"
        "        t = torch.randn(shape, dtype=dtype) * 3 + 1.5\n"
        "        loss, ps = l1_rollout_loss(p, t, backend='cpu')\n"
        "        (loss + ps.sum()).backward()\n"
        "        q = p.detach().double().requires_grad_(True)\n"
        "        rl, rps = ref(q, t.double())\n"
        "        (rl + rps.sum()).backward()\n"
        "        for a, b in ((loss, rl), (ps, rps), (p.grad, q.grad)):\n"
        "            assert ((a.double() - b).norm() / b.norm()).item() < tol, (shape, dtype)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)


@pytest.mark.parametrize("backend", FAST_CPU)
def test_half_inputs_on_cpu(backend):
    if backend == "triton":
        pytest.skip("bf16/fp16 arithmetic is unreliable in the Triton interpreter; covered on GPU")
    for dtype in (torch.bfloat16, torch.float16):
        _check_against_reference(backend, (2, 3, 4, 64), dtype, "cpu")


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_gpu(backend, dtype, shape):
    if not backends()[backend]:
        pytest.skip(f"{backend} backend not built")
    _check_against_reference(backend, shape, dtype, "cuda")


@pytest.mark.skipif("triton" not in FAST_CPU, reason="needs triton (TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(3, 2, 700, 16)])  # the last: B*N = 2100, three reduction blocks
def test_triton_last_program_reduce_cpu(shape, dtype, monkeypatch):
    """The one-launch forward (the last program adds the row sums) against the reference."""
    from hope_kernels.ops.l1_loss.triton import REDUCE_ENV

    monkeypatch.setenv(REDUCE_ENV, "last_program")
    _check_against_reference("triton", shape, dtype, "cpu")


@requires_cuda
@pytest.mark.parametrize("reduce", ["torch_sum", "last_program"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_reduce_modes_gpu(reduce, dtype):
    """Each forward reduction at the ViT-L shape (4096 programs race for the counter) matches the float64
    reference and gives the same bits on every call (fixed order)."""
    if not backends()["triton"]:
        pytest.skip("triton backend not available")
    from hope_kernels.ops.l1_loss.reference import l1_rollout_loss_reference as ref_fn
    from hope_kernels.ops.l1_loss.triton import l1_per_step_triton

    pred, target = (torch.randn(4, 8, 256, 1024, device="cuda").to(dtype) for _ in range(2))
    got = [l1_per_step_triton(pred, target, True, 1e-6, reduce=reduce) for _ in range(3)]
    ref = ref_fn(pred.double(), target.double(), None, True, 1e-6)[1]
    assert rel_err(got[0], ref) < 1e-5
    assert all(torch.equal(g, got[0]) for g in got[1:])


def test_triton_reduce_mode_env_checked(monkeypatch):
    from hope_kernels.ops.l1_loss.triton import REDUCE_ENV, _reduce_mode

    assert _reduce_mode(None) == "torch_sum"
    monkeypatch.setenv(REDUCE_ENV, "last_program")
    assert _reduce_mode(None) == "last_program"
    assert _reduce_mode("torch_sum") == "torch_sum"
    monkeypatch.setenv(REDUCE_ENV, "atomics")
    with pytest.raises(ValueError, match="HOPE_L1_FWD_REDUCE / reduce must be one of"):
        _reduce_mode(None)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gpu(backend, dtype):
    """Low-precision error against float64 is at most 2x what eager PyTorch loses in the same dtype."""
    if not backends()[backend]:
        pytest.skip(f"{backend} backend not built")
    shape = (2, 4, 64, 1024)
    pred, target, w = _inputs(shape, dtype, "cuda")
    loss, per_step = l1_rollout_loss(pred, target, w, backend=backend)
    ref, ref_ps = l1_rollout_loss_reference(pred.double(), target.double(), w.double())
    # eager PyTorch in the low dtype itself (layer norm and difference in that dtype)
    t_lp = torch.nn.functional.layer_norm(target, target.shape[-1:], eps=1e-6)
    eager_ps = (pred.detach() - t_lp).abs().mean(dim=(0, 2, 3))
    assert rel_err(per_step, ref_ps) <= 2 * max(rel_err(eager_ps, ref_ps), 1e-4)


def test_exact_ties_give_zero_gradient():
    """pred equal to the normalised target gives gradient 0, as autograd of abs (sign(0) = 0). Rows of +-1
    have mean 0 and variance 1, so with eps=0 every implementation normalises them exactly."""
    target = (torch.randint(0, 2, (2, 3, 4, 16)) * 2 - 1).double()
    target[..., :8] = target[..., 8:] * -1  # exactly zero mean per row
    for backend in FAST_CPU + ["reference"]:
        pred = target.clone().requires_grad_(True)
        loss, _ = l1_rollout_loss(pred, target * 3.0 + 2.0, eps=0.0, backend=backend)
        loss.backward()
        assert loss.item() == 0.0, backend
        assert torch.count_nonzero(pred.grad) == 0, backend


def test_no_layernorm_ties_exact():
    """Without normalisation the tie is exact in every dtype; half the entries tie, half do not."""
    target = torch.randn(1, 2, 3, 8)
    pred = target.clone()
    pred[..., :4] += 1.0
    for backend in FAST_CPU + ["reference"]:
        p = pred.clone().requires_grad_(True)
        l1_rollout_loss(p, target, normalize_target=False, backend=backend)[0].backward()
        assert torch.count_nonzero(p.grad[..., 4:]) == 0
        assert (p.grad[..., :4] > 0).all()


@pytest.mark.parametrize("backend", FAST_CPU)
def test_every_gradient_element_written(backend, monkeypatch):
    """Output buffers pre-filled with NaN: an element the kernel forgets to write fails the test."""
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x, *a, **k: real_empty_like(x, *a, **k).fill_(float("nan")))
    pred, target, w = _inputs((2, 3, 5, 37), torch.float32)
    l1_rollout_loss(pred, target, w, backend=backend)[0].backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("backend", FAST_CPU + ["reference"])
def test_nan_in_pred_propagates(backend):
    pred, target, w = _inputs((1, 2, 3, 8), torch.float32)
    with torch.no_grad():
        pred[0, 1, 2, 5] = float("nan")
    loss, per_step = l1_rollout_loss(pred, target, w, backend=backend)
    assert torch.isnan(loss) and torch.isnan(per_step[1]) and torch.isfinite(per_step[0])
    loss.backward()
    # autograd of abs gives sign(NaN) = 0: the NaN element gets gradient 0, the others their sign
    assert pred.grad[0, 1, 2, 5] == 0 and torch.isfinite(pred.grad).all()


def test_target_and_weights_get_no_gradient():
    """docs/design.md#l1-loss: the gradient reaches pred only, on every backend (the reference once gave step_weight
    one)."""
    pred, target, w = _inputs((1, 2, 3, 8), torch.float32)
    target.requires_grad_(True)
    w.requires_grad_(True)
    for backend in FAST_CPU + ["reference"]:
        l1_rollout_loss(pred, target, w, backend=backend)[0].backward()
        assert target.grad is None and w.grad is None, backend


@pytest.mark.parametrize("for_backward", [True, False])
@pytest.mark.parametrize("backend", FAST_CPU)
def test_opcheck(backend, for_backward):
    pred, target, w = _inputs((2, 3, 4, 16), torch.float64)
    op = getattr(torch.ops.hope_kernels, f"l1_rollout_loss_{backend}").default
    torch.library.opcheck(op, (pred, target, w, True, 1e-6, for_backward))
    torch.library.opcheck(op, (pred, target, None, False, 1e-6, for_backward))


@pytest.mark.parametrize("backend", FAST_CPU)
def test_inside_torch_compile(backend):
    pred, target, w = _inputs((2, 3, 4, 16), torch.float32)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(p, t, w):
        loss, per_step = l1_rollout_loss(p, t, w, backend=backend)
        return loss * 2 + per_step[0]

    out = f(pred, target, w)
    out.backward()
    g = pred.grad.clone()
    pred.grad = None
    ref_loss, ref_ps = l1_rollout_loss_reference(pred, target, w)
    (ref_loss * 2 + ref_ps[0]).backward()
    assert rel_err(out, ref_loss * 2 + ref_ps[0]) < 1e-5
    assert rel_err(g, pred.grad) < 1e-5


@pytest.mark.parametrize("backend", FAST_CPU)
def test_registered_op_is_callable_directly(backend):
    pred, target, w = _inputs((1, 2, 3, 8), torch.float64)
    loss, per_step, _ = getattr(torch.ops.hope_kernels, f"l1_rollout_loss_{backend}")(
        pred, target, w, True, 1e-6, False
    )
    ref, ref_ps = l1_rollout_loss_reference(pred, target, w)
    assert rel_err(loss, ref) < 1e-10 and rel_err(per_step, ref_ps) < 1e-10


@pytest.mark.parametrize(
    "bad,err,msg",
    [
        (lambda p, t, w: (p[0], t[0], None), ValueError, r"pred must be \(B, T, N, D\)"),
        (lambda p, t, w: (p, t[:, :, :2], None), ValueError, "target must have the shape of pred"),
        (lambda p, t, w: (p.long(), t.long(), None), TypeError, "floating-point"),
        (lambda p, t, w: (p, t.double(), None), TypeError, "dtype"),
        (lambda p, t, w: (p, t, w[:2]), ValueError, r"step_weight must be \(T,\)"),
        (lambda p, t, w: (p, t, -w), ValueError, "step_weight must be >= 0"),
        (lambda p, t, w: (p, t, w * 0), ValueError, "must not sum to 0"),
        (lambda p, t, w: (p, t, w.to("meta")), ValueError, "device"),
    ],
)
@pytest.mark.parametrize("backend", FAST_CPU + ["reference"])
def test_bad_inputs(bad, err, msg, backend):
    p, t, w = _inputs((2, 3, 4, 8), torch.float32)
    with pytest.raises(err, match=msg):
        l1_rollout_loss(*bad(p.detach(), t, w), backend=backend)


@pytest.mark.parametrize(
    "kwargs,err,msg",
    [
        (dict(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number >= 0"),
        (dict(eps=float("inf")), ValueError, "eps must be a finite number >= 0"),
        (dict(eps="1e-6"), ValueError, "eps must be"),
        (dict(normalize_target="no"), TypeError, "normalize_target must be a bool"),
    ],
)
@pytest.mark.parametrize("backend", FAST_CPU + ["reference"])
def test_bad_options(kwargs, err, msg, backend):
    p, t, w = _inputs((2, 3, 4, 8), torch.float32)
    with pytest.raises(err, match=msg):
        l1_rollout_loss(p, t, w, backend=backend, **kwargs)


@pytest.mark.parametrize("shape", [(0, 3, 4, 8), (2, 0, 4, 8), (2, 3, 0, 8), (2, 3, 4, 0)])
@pytest.mark.parametrize("backend", FAST_CPU + ["reference"])
def test_empty_inputs_rejected(shape, backend):
    """A mean over no element: the paths used to disagree (NaN or 0) without an error."""
    p, t, _ = _inputs(shape, torch.float32, weight=False)
    with pytest.raises(ValueError, match="must not be empty"):
        l1_rollout_loss(p, t, backend=backend)


def test_explicit_unavailable_backend_raises(monkeypatch):
    p, t, w = _inputs((1, 2, 3, 8), torch.float32)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        l1_rollout_loss(p, t, backend="cuda") if not HAS_CUDA else (_ for _ in ()).throw(
            BackendUnavailableError("cuda present")
        )
    with pytest.raises(ValueError, match="backend must be one of"):
        l1_rollout_loss(p, t, backend="fast")
    monkeypatch.setenv("HOPE_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        l1_rollout_loss(p, t)


def test_env_var_selects_backend(monkeypatch):
    import hope_kernels.ops.l1_loss as mod

    calls = []
    real = mod._resolve
    monkeypatch.setattr(mod, "_resolve", lambda *a: calls.append(real(*a)) or calls[-1])
    p, t, _ = _inputs((1, 2, 3, 8), torch.float32)
    for b in FAST_CPU:
        monkeypatch.setenv("HOPE_KERNELS_BACKEND", b)
        l1_rollout_loss(p, t)
    assert calls == FAST_CPU


def test_validates_and_resolves_once_per_call(monkeypatch):
    import hope_kernels.ops.l1_loss as mod

    calls = []
    for name in ("_validate", "_resolve"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    p, t, w = _inputs((1, 2, 3, 8), torch.float32)
    for backend in FAST_CPU:
        calls.clear()
        l1_rollout_loss(p, t, w, backend=backend)[0].backward()
        assert calls == ["_validate", "_resolve"], (backend, calls)


def test_weight_values_read_off_cpu_only_in_debug(monkeypatch):
    """Reading step_weight on a GPU is a host sync per call, so off the CPU the value check runs only with
    HOPE_KERNELS_DEBUG=1. A meta tensor stands for a device tensor here: reading its values fails."""
    from hope_kernels.ops.checks import DEBUG_ENV
    from hope_kernels.ops.l1_loss import _check_weight_values

    w = torch.zeros(3, device="meta")
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    _check_weight_values(w)  # skipped: no read
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(NotImplementedError):  # the values of a meta tensor cannot be read
        _check_weight_values(w)  # read attempted


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bad_weight_values_gpu(backend, monkeypatch):
    """On GPU: no check by default (a zero sum gives a non-finite loss); HOPE_KERNELS_DEBUG=1 raises."""
    if not backends()[backend]:
        pytest.skip(f"{backend} backend not built")
    from hope_kernels.ops.checks import DEBUG_ENV

    p, t, w = _inputs((2, 3, 4, 8), torch.float32, "cuda")
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert not torch.isfinite(l1_rollout_loss(p, t, w * 0, backend=backend)[0])
    monkeypatch.setenv(DEBUG_ENV, "1")
    for bad, msg in ((w * 0, "must not sum to 0"), (-w, ">= 0"), (w * float("nan"), "finite")):
        with pytest.raises(ValueError, match=msg):
            l1_rollout_loss(p, t, bad, backend=backend)
