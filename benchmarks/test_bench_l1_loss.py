"""l1_rollout_loss: eager reference, torch.compile(reference) and every fast path, forward and forward+backward.
Bytes counted: forward reads pred and target once; backward reads them again and writes grad_pred. Each
forward+backward call starts from pred.grad = None, as a training step after zero_grad() does (accumulating into
the previous call's gradient would add a read and a write of it). At the ViT-L shape the forward+backward group
also has its bandwidth floor, "copy": the bytes of pred, target and grad moved once (see test_l1_copy_floor). On a
GPU the kernel-only rows (CUDA-graph timed, inputs rotated past L2) also give % of the device copy bandwidth."""

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
        return lambda: torch.no_grad()(f)() if backend in ("eager", "torch.compile") else f()

    def step():
        pred.grad = None
        f()[0].backward()

    return step


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
    bench(
        _fn(backend, pred, target, w, mode),
        group=f"l1 {mode} {tuple(shape)} {str(dtype)[6:]}",
        backend=backend,
        device=DEVICE,
        nbytes=nbytes,
    )


@pytest.mark.parametrize("backend", ["copy", "copy fresh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_l1_copy_floor(bench, backend, dtype):
    """The forward+backward's bandwidth floor at the ViT-L shape, in its group: a copy of 1.5x pred's bytes, so
    that it reads and writes what the op must at least (read pred and target, write grad). "copy" writes into
    a preallocated output, the strict floor (the op allocates its gradient on every call); "copy fresh" allocates
    its output on every call with the default CPU allocator, whose 4 KiB pages fault on first write."""
    shape = SHAPES[0]
    src = torch.randn(torch.Size(shape).numel() * 3 // 2, device=DEVICE, dtype=dtype)
    dst = torch.empty_like(src)
    fn = (lambda: dst.copy_(src)) if backend == "copy" else (lambda: src.clone())
    bench(
        fn,
        group=f"l1 fwd+bwd {tuple(shape)} {str(dtype)[6:]}",
        backend=backend,
        device=DEVICE,
        nbytes=2 * src.numel() * src.element_size(),
    )


# Kernel-only rows: GPU time of the op's kernels alone. Each timed call replays one CUDA graph of >= 48
# launches (no Python, no launch latency, no host sync in the time); the launches rotate over several input
# sets so that together they exceed the L2 cache (50 MiB on H100/H200) and every launch reads from DRAM.
ROTATE_BYTES = 256 << 20
MIN_LAUNCHES = 48
_copy_gbps: dict = {}


def _graph(calls):
    """One CUDA graph running `calls` (closures) back to back, warmed up (Triton compiles) before capture."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return g


def _rotation(per_set_bytes):
    sets = max(2, -(-ROTATE_BYTES // per_set_bytes))
    return sets, -(-MIN_LAUNCHES // sets) * sets


def _device_copy_gbps() -> float:
    """The ceiling: a 1 GiB device copy, graph-timed with CUDA events (median of 5), once per session."""
    if "gbps" not in _copy_gbps:
        src = torch.randn(1 << 28, device=DEVICE)
        dst = torch.empty_like(src)
        g = _graph([lambda: dst.copy_(src)] * 4)
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 4)
        _copy_gbps["gbps"] = 2 * src.numel() * 4 / (sorted(times)[2] * 1e-3) / 1e9
        del src, dst, g
    return _copy_gbps["gbps"]


@pytest.mark.skipif(not ON_GPU, reason="kernel-only rows are measured on the GPU")
@pytest.mark.parametrize("stage", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["copy"] + FAST + (["triton last_program"] if "triton" in FAST else []))
def test_l1_kernel_only(bench, backend, dtype, stage):
    """The kernels alone (no custom-op / autograd dispatch) at the ViT-L shape: GB/s and % of a 1 GiB device
    copy timed the same way. Bytes: fwd reads pred and target; bwd reads them and writes grad. The copy row
    moves the same bytes as the kernel rows of its group (same-size ceiling, for context).
    "triton last_program": the Triton forward reduced inside its one launch (HOPE_L1_FWD_REDUCE)."""
    from hope_kernels.ops.l1_loss.triton import l1_per_step_backward_triton, l1_per_step_triton

    # the kernels alone, without the op's weighting (as the backends of hope_kernels/ops/l1_loss/__init__.py call them)
    per_step = {"cuda": torch.ops.hope_kernels.l1_per_step, "triton": l1_per_step_triton}
    per_step_backward = {"cuda": torch.ops.hope_kernels.l1_per_step_backward, "triton": l1_per_step_backward_triton}
    if backend == "triton last_program" and stage == "bwd":
        pytest.skip("the reduce mode changes the forward only")
    ceiling = _device_copy_gbps()
    shape = SHAPES[0]
    numel, size = torch.Size(shape).numel(), torch.empty((), dtype=dtype).element_size()
    nbytes = (2 if stage == "fwd" else 3) * numel * size
    sets, launches = _rotation(nbytes)
    coef = torch.rand(shape[1], device=DEVICE)
    calls = []
    for _ in range(sets):
        if backend == "copy":  # read nbytes / 2, write nbytes / 2
            src = torch.randn(nbytes // 2 // size, device=DEVICE, dtype=dtype)
            calls.append(lambda src=src, dst=torch.empty_like(src): dst.copy_(src))
            continue
        pred = torch.randn(shape, device=DEVICE, dtype=dtype)
        target = torch.randn(shape, device=DEVICE, dtype=dtype)
        if backend == "triton last_program":
            calls.append(lambda p=pred, t=target: l1_per_step_triton(p, t, True, 1e-6, reduce="last_program"))
        elif stage == "fwd":
            calls.append(lambda p=pred, t=target: per_step[backend](p, t, True, 1e-6))
        else:
            calls.append(lambda p=pred, t=target: per_step_backward[backend](p, t, coef, True, 1e-6))
    g = _graph(calls * (launches // sets))
    row = bench(
        g.replay,
        group=f"l1 kernel {stage} {tuple(shape)} {str(dtype)[6:]}",
        backend=backend,
        device=DEVICE,
        nbytes=nbytes * launches,
        calls=launches,
        ceiling_gbps=ceiling,
    )
    row["copy_1gib_gbps"] = ceiling
