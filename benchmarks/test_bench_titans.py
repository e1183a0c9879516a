"""titans_memory benchmarks: token loop, eager chunked, torch.compile(eager chunked) and every fast path,
forward and forward+backward, side by side.

    pytest benchmarks/test_bench_titans.py --benchmark-only -s

Fast paths are every backend of LINEAR_BACKENDS: on GPU the chunked Triton kernel ("triton") and the fused
token-serial CUDA kernel ("cuda", the streaming path); on CPU the compiled C++ one ("cpu").
GPU shapes: one clip of the real grid (B=4, H=16, L=8*258, dk=dv=64) and 8x that length; CPU: a smaller
shape (the compiled C++ path against the eager ones). Each row's extra_info holds the ratio to the eager
chunked time of the same shape and mode, and the peak CUDA memory; a table is printed at the end.
MLP memory (`test_titans_mlp`, GPU only: its only fast path is Triton, and the interpreter is no benchmark):
same shapes with dh = 64, rows keyed "<shape>_mlp"; eager chunked and triton first, the slow baselines last.
"""
import pytest
import torch
import torch.nn.functional as F

from hope_kernels import backends
from hope_kernels.ops import titans_memory
from hope_kernels.ops.titans import LINEAR_BACKENDS, MLP_BACKENDS
from hope_kernels.ops.titans.reference import (titans_chunked, titans_linear_chunk_step, titans_mlp_chunk_step,
                                               titans_token_loop)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
C = 16
SHAPES = ({"clip": (4, 16, 8 * 258, 64), "clip_x8": (4, 16, 8 * 8 * 258, 64)} if CUDA
          else {"cpu_small": (1, 4, 512, 32)})
# eager first (the ratios' base), then the fast paths, then the slow baselines
PATHS = ["eager_chunked"] + [b for b in LINEAR_BACKENDS if b != "reference"] + ["token_loop", "compiled_chunked"]
RESULTS = {}


def _inputs(shape, grad):
    B, H, L, d = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=DEVICE)
    u = lambda *s: torch.rand(*s, generator=g, device=DEVICE)
    x = [F.normalize(r(B, H, L, d), dim=-1), F.normalize(r(B, H, L, d), dim=-1), r(B, H, L, d),
         0.1 * u(B, H, L), 0.9 * u(B, H, L), 0.1 * u(B, H, L)]
    return [t.requires_grad_(grad) for t in x]


_compiled = {}


def _fn(path, memory="linear", state=None):
    kw = dict(chunk_size=C, memory=memory, initial_state=state)
    if path == "token_loop":
        return lambda *x: titans_token_loop(*x, **kw)[0]
    if path == "eager_chunked":
        return lambda *x: titans_chunked(*x, **kw)[0]
    if path == "compiled_chunked":
        # torch.compile of the eager chunked form, applied to its chunk step: compiling the whole function
        # unrolls the loop over chunks (129 at the clip; minutes, see test_bench_dgd.py)
        if memory not in _compiled:
            step = titans_linear_chunk_step if memory == "linear" else titans_mlp_chunk_step
            _compiled[memory] = torch.compile(step)
        return lambda *x: titans_chunked(*x, **kw, chunk_step=_compiled[memory])[0]
    return lambda *x: titans_memory(*x, backend=path, **kw)[0]


def _skip(path, shape_name):
    if path in ("triton", "cuda") and not CUDA:
        pytest.skip("GPU path")
    if path == "cpu" and CUDA:
        pytest.skip("CPU path on CUDA inputs")
    if path not in ("token_loop", "eager_chunked", "compiled_chunked") and not backends()[path]:
        pytest.skip(f"{path} not available")
    if path == "token_loop" and shape_name == "clip_x8":
        pytest.skip("token loop at 8x length: minutes")


# shape by shape (the decorator nearest the function varies slowest); benchmarks/conftest.py moves the slow
# baselines' rows (token loop, torch.compile) after all others
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_titans(benchmark, bench_row, path, shape_name, mode):
    _skip(path, shape_name)
    x = _inputs(SHAPES[shape_name], mode == "fwd_bwd")
    _measure(benchmark, bench_row, _fn(path), x, path, shape_name, mode, SHAPES[shape_name])


MLP_DH = 64
MLP_PATHS = ["eager_chunked"] + [b for b in MLP_BACKENDS if b != "reference"] + ["token_loop", "compiled_chunked"]


@pytest.mark.skipif(not CUDA, reason="MLP memory: the fast path is Triton (GPU only)")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("path", MLP_PATHS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_titans_mlp(benchmark, bench_row, path, shape_name, mode):
    _skip(path, shape_name)
    B, H, L, d = SHAPES[shape_name]
    grad = mode == "fwd_bwd"
    x = _inputs((B, H, L, d), grad)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, device=DEVICE)
    state = [(0.1 * r(*s)).requires_grad_(grad) for s in ((B, H, d, MLP_DH), (B, H, MLP_DH, d),
                                                          (B, H, d, MLP_DH), (B, H, MLP_DH, d))]
    _measure(benchmark, bench_row, _fn(path, "mlp", state), x, path, f"{shape_name}_mlp", mode, (B, H, L, d))


def _measure(benchmark, bench_row, fn, x, path, shape_name, mode, shape):
    grad = mode == "fwd_bwd"

    def run():
        o = fn(*x)
        if grad:
            o.sum().backward()
        if CUDA:
            torch.cuda.synchronize()
    run()  # warm-up (compilation, autotune)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"titans {shape_name} {mode}"
    rounds = 3 if path == "token_loop" else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    ms = benchmark.stats.stats.mean * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    RESULTS[(shape_name, mode, path)] = (ms, peak)
    eager = RESULTS.get((shape_name, mode, "eager_chunked"))
    benchmark.extra_info.update(ms=ms, peak_gib=peak, speedup_vs_eager_chunked=eager[0] / ms if eager else None)
    bench_row(group=f"titans {shape_name} {tuple(shape)} C={C} {mode}", backend=path, device=DEVICE, ms=ms,
              rounds=rounds, peak_mib=peak * 1024 if CUDA else None)
    # one line per row as it finishes (the end-of-module table is lost when the time limit stops the run)
    print(f"\n[titans] {shape_name} {mode:7s} {path:16s} {ms:9.2f} ms  "
          f"x{eager[0] / ms if eager else float('nan'):6.2f} vs eager chunked  peak {peak:.2f} GiB")


def teardown_module():
    if not RESULTS:
        return
    print(f"\n{'shape':>12} {'mode':>8} {'path':>17} {'ms':>10} {'x eager':>8} {'x loop':>8} {'peak GiB':>9}")
    for (sn, mode, path), (ms, peak) in sorted(RESULTS.items()):
        e = RESULTS.get((sn, mode, "eager_chunked"), (float("nan"),))[0]
        t = RESULTS.get((sn, mode, "token_loop"), (float("nan"),))[0]
        print(f"{sn:>12} {mode:>8} {path:>17} {ms:10.2f} {e / ms:8.2f} {t / ms:8.2f} {peak:9.3f}")
