"""l1_rollout_loss: eager reference, torch.compile(reference) and every fast path, forward and forward+backward.
Bytes counted: forward reads pred and target once; backward reads them again and writes grad_pred."""
import pytest
import torch

from hope_kernels import backends
from hope_kernels.ops import l1_rollout_loss
from hope_kernels.ops.l1_loss.reference import l1_rollout_loss_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SHAPES = [(4, 8, 256, 1024), (2, 8, 64, 64)]
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
FAST = [b for b in (("triton", "cuda") if ON_GPU else ("cpu",)) if backends()[b]]
_compiled = torch.compile(l1_rollout_loss_reference)


def _fn(backend, pred, target, w, mode):
    if backend == "eager":
        f = lambda: l1_rollout_loss_reference(pred, target, w)
    elif backend == "torch.compile":
        f = lambda: _compiled(pred, target, w)
    else:
        f = lambda: l1_rollout_loss(pred, target, w, backend=backend)
    if mode == "fwd":
        return lambda: (torch.no_grad()(f)() if backend in ("eager", "torch.compile") else f())
    return lambda: f()[0].backward()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["eager", "torch.compile"] + FAST)
def test_l1_rollout_loss(bench, backend, shape, dtype, mode):
    if backend == "torch.compile" and shape != SHAPES[0]:
        pytest.skip("torch.compile baseline at the ViT-L shape only (each shape recompiles)")
    pred = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=(mode != "fwd"))
    target = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = torch.linspace(0.5, 2.0, shape[1], device=DEVICE)
    nbytes = pred.numel() * pred.element_size() * (2 if mode == "fwd" else 5)
    bench(_fn(backend, pred, target, w, mode), group=f"l1 {mode} {tuple(shape)} {str(dtype)[6:]}",
          backend=backend, device=DEVICE, nbytes=nbytes)


@pytest.mark.skipif(not ON_GPU, reason="kernel-only rows are measured on the GPU")
@pytest.mark.parametrize("stage", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_l1_kernel_only(bench, backend, dtype, stage):
    """The kernels alone (no custom-op / autograd dispatch), at the ViT-L shape: compare GB/s with the copy row."""
    from hope_kernels.ops.l1_loss import _per_step, _per_step_backward
    shape = SHAPES[0]
    pred = torch.randn(shape, device=DEVICE, dtype=dtype)
    target = torch.randn(shape, device=DEVICE, dtype=dtype)
    coef = torch.rand(shape[1], device=DEVICE)
    if stage == "fwd":
        fn, nbytes = (lambda: _per_step(backend, pred, target, True, 1e-6)), 2 * pred.numel() * pred.element_size()
    else:
        fn = lambda: _per_step_backward(backend, pred, target, coef, True, 1e-6)
        nbytes = 3 * pred.numel() * pred.element_size()
    bench(fn, group=f"l1 kernel {stage} {tuple(shape)} {str(dtype)[6:]}", backend=backend, device=DEVICE,
          nbytes=nbytes)
