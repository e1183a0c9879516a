"""Benchmarks of rope_attention: eager (rope + SDPA with a materialised (L, L) mask), torch.compile of it, and
each fast path, forward and forward+backward; and the rotation alone (eager vs compiled rope3d).

Each row: shape, backend, mode, ms, ratio to eager (eager ms / ms, > 1 = faster), TFLOP/s counted over the
visible (unmasked) score pairs only, peak memory (GPU). GPU rows skip without CUDA; a small CPU shape runs on
the CPU. Run: pytest benchmarks/test_bench_rope_attention.py --benchmark-only -s
"""

import pytest
import torch

from hope_kernels import backends
from hope_kernels.ops import rope3d, rope_attention
from hope_kernels.ops.rope_attention.reference import block_causal_mask, rope3d_reference, rope_attention_reference

HAS_CUDA = torch.cuda.is_available()
AVAIL = backends()
RESULTS: dict = {}

GPU_SHAPES = {"clip": (4, 16, 8, 64), "clip-x8": (4, 16, 64, 64)}  # (B, H, T, d); tokens per step 258
CPU_SHAPES = {"cpu-small": (1, 4, 4, 64)}


def _pos(T, device):
    rows = []
    for t in range(T):
        rows += [(t, 0, 0), (t, 0, 0)] + [(t, h, w) for h in range(16) for w in range(16)]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _visible_pairs(pos, window):
    return int(block_causal_mask(pos[:, 0].cpu(), window).sum())


def _make(shape, device, dtype, grad):
    B, H, T, d = shape
    pos = _pos(T, device)
    q, k, v = (torch.randn(B, H, pos.shape[0], d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
    return pos, q, k, v


_compiled = {}


def _attention_fn(backend):
    if backend == "eager":
        return rope_attention_reference
    if backend == "compile":
        if "f" not in _compiled:
            _compiled["f"] = torch.compile(rope_attention_reference)
        return _compiled["f"]
    return lambda q, k, v, pos, window: rope_attention(q, k, v, pos, window=window, backend=backend)


def _report(benchmark, key, flops):
    ms = benchmark.stats.stats.mean * 1e3
    RESULTS[key] = ms
    base = RESULTS.get(key[:-1] + ("eager",))
    ratio = base / ms if base else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if key[0] != "cpu-small" and HAS_CUDA else float("nan")
    tflops = flops / (ms * 1e-3) / 1e12
    benchmark.extra_info.update(ms=ms, ratio_to_eager=ratio, tflops_visible=tflops, peak_gib=peak)
    print(
        f"\n{key[0]:>10} {key[2]:>7} {key[3]:>8}  {ms:9.3f} ms  x{ratio:5.2f}  {tflops:7.2f} TFLOP/s  "
        f"peak {peak:6.2f} GiB"
    )


def _run(benchmark, shape_name, shape, device, dtype, backend, mode, window=None):
    pos, q, k, v = _make(shape, device, dtype, mode == "fwd+bwd")
    fn = _attention_fn(backend)
    g = torch.randn_like(q)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v, pos, window)
        else:
            o = fn(q, k, v, pos, window)
            torch.autograd.grad(o, (q, k, v), g)
        sync()

    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=5 if device == "cuda" else 3, warmup_rounds=1)
    B, H, _, d = shape
    fwd_flops = 4 * B * H * d * _visible_pairs(pos, window)
    _report(benchmark, (shape_name, dtype, mode, backend), fwd_flops * (1 if mode == "fwd" else 3.5))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["eager", "compile", "triton", "cuda"])
@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
def test_bench_gpu(benchmark, shape_name, backend, mode):
    if backend in ("triton", "cuda") and not AVAIL[backend]:
        pytest.skip(f"{backend} not available")
    _run(benchmark, shape_name, GPU_SHAPES[shape_name], "cuda", torch.bfloat16, backend, mode)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_bench_cpu(benchmark, backend, mode):
    if backend == "cpu" and not AVAIL["cpu"]:
        pytest.skip("compiled C++ extension not built")
    _run(benchmark, "cpu-small", CPU_SHAPES["cpu-small"], "cpu", torch.float32, backend, mode)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_bench_cpu_rotation(benchmark, backend):
    """The rotation alone, forward+backward, on one q of the real clip shape (B=4, H=16, L=2064, d=64)."""
    if backend == "cpu" and not AVAIL["cpu"]:
        pytest.skip("compiled C++ extension not built")
    pos = _pos(8, "cpu")
    x = torch.randn(4, 16, pos.shape[0], 64, requires_grad=True)
    g = torch.randn_like(x)
    fn = rope3d_reference if backend == "eager" else (lambda a, p: rope3d(a, p, backend="cpu"))

    def step():
        torch.autograd.grad(fn(x, pos), x, g)

    step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    ms = benchmark.stats.stats.mean * 1e3
    RESULTS[("rot", backend)] = ms
    base = RESULTS.get(("rot", "eager"))
    gbs = 4 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9  # read x, write y, read g, write dx
    benchmark.extra_info.update(ms=ms, ratio_to_eager=base / ms if base else float("nan"), gb_s=gbs)
    print(
        f"\n  rotation {backend:>7} fwd+bwd  {ms:9.3f} ms  x{(base / ms if base else float('nan')):5.2f}  "
        f"{gbs:6.2f} GB/s"
    )
