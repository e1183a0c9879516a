"""Benchmarks of dgd_memory: every available path vs the token loop and the eager chunked reference.

GPU: one clip of the real grid (B=4, H=16, L=8*258, dk=dv=64, chunk 16), 8x that length, and HOPE's own call
at the real grid (one timestep of 258 tokens as one chunk, the five memories of 16 heads stacked: H=80);
CPU: a smaller shape. Forward and forward+backward. Each row reports ms, the ratio to the eager chunked
reference and to the token loop (measured in the same session), and peak memory (GPU only). The eager and fast
rows of every shape run before the slow baselines (token loop, torch.compile), so a run cut by its time limit
still has the fast paths' numbers.
Speed is reported, never asserted.

    pytest benchmarks/test_bench_dgd.py --benchmark-only -s
"""

from __future__ import annotations

import os
import time
from unittest import mock

import pytest
import torch

from hope_kernels import backends
from hope_kernels.ops.dgd import dgd_memory, dgd_memory_chunked_reference, dgd_memory_token_loop
from hope_kernels.ops.dgd.reference import dgd_chunk_step

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# name -> ((B, H, L, dk, dv), chunk_size)
if HAS_CUDA:
    SHAPES = {
        "clip": ((4, 16, 8 * 258, 64, 64), 16),
        "hope_step": ((4, 80, 258, 64, 64), 258),
        "clip_x8": ((4, 16, 8 * 8 * 258, 64, 64), 16),
    }
else:
    SHAPES = {"cpu_small": ((1, 4, 512, 32, 32), 16)}
_BASE: dict = {}


def _inputs(shape, grad):
    B, H, L, dk, dv = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)
    q = torch.nn.functional.normalize(r(B, H, L, dk), dim=-1)
    k = torch.nn.functional.normalize(r(B, H, L, dk), dim=-1)
    v = r(B, H, L, dv)
    alpha = 0.9 + 0.1 * torch.rand(B, H, L, device=DEVICE, generator=g)
    eta = 0.5 * torch.rand(B, H, L, device=DEVICE, generator=g)
    M0 = r(B, H, dk, dv) * 0.1
    return [x.requires_grad_(grad) for x in (q, k, v, alpha, eta, M0)]


# torch.compile of the eager chunked form, applied to its chunk step: compiling the whole function unrolls
# the loop over chunks (129 at the clip) and took 253 s (forward) + 194 s (backward) on the 2-core CPU
_compiled_step = torch.compile(dgd_chunk_step)


TRITON_PRE_T = "triton precompute_t"
# environment a path runs under, forward and backward: HOPE_DGD_TSOLVE picks where the Triton kernels solve T
PATH_ENV = {TRITON_PRE_T: {"HOPE_DGD_TSOLVE": "precompute"}}


def _paths():
    """name -> fn(C) -> callable(q, k, v, alpha, eta, M0); eager first (the ratios' base), then the fast paths,
    then the slow baselines."""
    avail = backends()
    paths = {"eager_chunked": lambda C: lambda *x: dgd_memory_chunked_reference(*x[:5], C, x[5])}
    fast = ("triton", "cuda") if HAS_CUDA else ("cpu",)
    for b in fast:
        if avail[b]:
            paths[b] = (
                lambda b: (
                    lambda C: (
                        lambda *x: dgd_memory(
                            *x[:5], chunk_size=C, initial_state=x[5], output_final_state=True, backend=b
                        )
                    )
                )
            )(b)
            if b == "triton":  # the same backend with each sub-chunk's T solved before the walk (PATH_ENV)
                paths[TRITON_PRE_T] = paths[b]
    paths["token_loop"] = lambda C: lambda *x: dgd_memory_token_loop(*x[:5], C, x[5])
    paths["compiled_chunked"] = lambda C: (
        lambda *x: dgd_memory_chunked_reference(*x[:5], C, x[5], chunk_step=_compiled_step)
    )
    return paths


PATHS = _paths()
WARMUP = os.environ.get("HOPE_BENCH_WARMUP", "0") == "1"  # conftest.py: run once, time nothing


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _step(fn, inputs, backward, env=None):
    with mock.patch.dict(os.environ, env or {}):  # restored afterwards, also on an error
        o, M = fn(*inputs)
        if backward:
            (o.float().square().mean() + M.square().mean()).backward()
            for x in inputs:
                x.grad = None
        _sync()


def _time(fn, inputs, backward, reps=3):
    _step(fn, inputs, backward)  # warm-up (and compilation)
    t = time.perf_counter()
    for _ in range(reps):
        _step(fn, inputs, backward)
    return (time.perf_counter() - t) / reps * 1e3


# shape by shape (the decorator nearest the function varies slowest); benchmarks/conftest.py moves the slow
# baselines' rows (token loop, torch.compile) after all others
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_bench_dgd(benchmark, bench_row, path, shape_name, mode):
    shape, C = SHAPES[shape_name]
    if path == "token_loop" and shape_name.endswith("x8"):
        pytest.skip("token loop over 8x258*8 tokens: too slow to be a useful baseline")
    backward = mode == "fwd_bwd"
    inputs = _inputs(shape, backward)
    fn = PATHS[path](C)
    ctx = torch.enable_grad() if backward else torch.no_grad()
    with ctx:
        for base in ("eager_chunked", "token_loop"):
            key = (base, shape_name, mode)
            if key not in _BASE and not (base == "token_loop" and shape_name.endswith("x8")) and not WARMUP:
                _BASE[key] = _time(PATHS[base](C), inputs, backward, reps=1)
        if HAS_CUDA:
            torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(
            _step, args=(fn, inputs, backward, PATH_ENV.get(path)), rounds=3, iterations=1, warmup_rounds=1
        )
    ms = benchmark.stats.stats.mean * 1e3
    if path in ("eager_chunked", "token_loop"):
        _BASE[(path, shape_name, mode)] = ms  # baselines run first: later rows compare with these
    peak = torch.cuda.max_memory_allocated() / 2**30 if HAS_CUDA else float("nan")
    eager = _BASE.get(("eager_chunked", shape_name, mode), float("nan"))
    loop = _BASE.get(("token_loop", shape_name, mode), float("nan"))
    benchmark.extra_info.update(
        shape=shape,
        chunk_size=C,
        mode=mode,
        ms=ms,
        vs_eager_chunked=eager / ms,
        vs_token_loop=loop / ms,
        peak_gib=peak,
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
    )
    bench_row(
        group=f"dgd {shape_name} {tuple(shape)} C={C} {mode}",
        backend=path,
        device=DEVICE,
        ms=ms,
        rounds=3,
        peak_mib=peak * 1024 if HAS_CUDA else None,
    )
    print(
        f"\n[dgd] {shape_name} {tuple(shape)} C={C} {mode:7s} {path:16s} {ms:9.2f} ms  "
        f"x{eager / ms:6.2f} vs eager chunked  x{loop / ms:7.2f} vs token loop  peak {peak:.2f} GiB"
    )
