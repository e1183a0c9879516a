"""Benchmark harness: every benchmark of one group runs the eager baseline and each fast path in the same
session; at the end a table prints ms, speed-up over eager, GB/s or TFLOP/s, and peak memory per row.
Set HOPE_BENCH_JSON=path to also write the rows as JSON (benchmarks/run_gpu.sh does): the file is rewritten
(atomically) after every row, so a suite killed at its time limit keeps the rows it measured.
HOPE_BENCH_WARMUP=1: every benchmark runs its function once and is then skipped, nothing is timed. This fills
the Triton and Inductor caches on disk, so benchmarks/run_gpu.sh compiles every suite's kernels at once, in
parallel processes (pytest-xdist), before the timed runs, which then find them compiled.

Use the `bench` fixture:  bench(fn, group="l1 fwd (4,8,256,1024) fp32", backend="eager", nbytes=..., flops=...)
The row whose backend is "eager" (or "eager_chunked") is the baseline of its group. `calls=k` when one fn()
runs the op k times (a CUDA graph of k launches: ms is then per launch, nbytes is for all k); `ceiling_gbps`
adds "% copy" to the row.
Suites that time with pytest-benchmark themselves add their rows with the `bench_row` fixture.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from hope_kernels.io import atomic_write_bytes

ROWS: list[dict] = []
BASELINES = ("eager", "eager_chunked")  # the backend a group's speed-ups are measured against
WARMUP = os.environ.get("HOPE_BENCH_WARMUP", "0") == "1"


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_peak_bytes(fn) -> int | None:
    """Growth of the resident set over one call of fn, above the resident set before it (Linux: the peak
    counter VmHWM is reset through /proc/self/clear_refs; freed heap is trimmed first, so memory that glibc
    kept from earlier calls is not reused unseen). None where /proc is not there."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return max(_status_kib("VmHWM") - base, 0) * 1024


def _peak_bytes(fn, device: str) -> int | None:
    if device == "cpu":
        return _cpu_peak_bytes(fn)
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture
def bench(benchmark):
    def run(
        fn,
        *,
        group: str,
        backend: str,
        device: str = "cpu",
        nbytes: int | None = None,
        flops: float | None = None,
        budget_s: float = 1.0,
        calls: int = 1,
        ceiling_gbps: float | None = None,
    ):
        def call():
            fn()
            _sync(device)

        call()  # warm-up: compilation, autotuning, allocator
        t0 = time.perf_counter()
        call()
        one = max(time.perf_counter() - t0, 1e-6)
        peak = _peak_bytes(call, device)
        rounds = int(max(3, min(200, budget_s / one)))
        benchmark.group = group
        benchmark.extra_info.update(backend=backend, device=device)
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
        median = benchmark.stats.stats.median
        gbps = (nbytes / median / 1e9) if nbytes else None
        row = dict(
            group=group,
            backend=backend,
            device=device,
            ms=median * 1e3 / calls,
            rounds=rounds,
            gbps=gbps,
            tflops=(flops / median / 1e12) if flops else None,
            peak_mib=(peak / 2**20) if peak is not None else None,
            pct_copy=(100 * gbps / ceiling_gbps) if gbps and ceiling_gbps else None,
        )
        return add_row(row)

    return run


def add_row(row: dict) -> dict:
    """Append one finished row to the table (and to HOPE_BENCH_JSON at once)."""
    row = dict(dict.fromkeys(("rounds", "gbps", "tflops", "peak_mib", "pct_copy")), **row)
    ROWS.append(row)
    _write_json()
    return row


@pytest.fixture
def peak_bytes():
    """peak_bytes(fn, device) -> bytes fn() takes above what was in use before it (CPU: resident set), or None."""
    return _peak_bytes


@pytest.fixture
def bench_row():
    """add(group=, backend=, device=, ms=, peak_mib=None, ...): a row timed by the suite itself."""
    return lambda **row: add_row(row)


def _with_speedups(rows: list[dict]) -> list[dict]:
    base = {r["group"]: r["ms"] for r in rows if r["backend"] in BASELINES}
    for r in rows:
        r["speedup_vs_eager"] = (base[r["group"]] / r["ms"]) if r["group"] in base else None
    return rows


_EXISTING: dict = {}  # path -> rows already in that file when this session first wrote it (earlier suites)


def _write_json() -> None:
    path = os.environ.get("HOPE_BENCH_JSON")
    if not path:
        return
    if path not in _EXISTING:
        _EXISTING[path] = []
        if os.path.exists(path):
            with open(path) as f:
                _EXISTING[path] = json.load(f)
    atomic_write_bytes(path, json.dumps(_EXISTING[path] + _with_speedups(ROWS), indent=1).encode())


@pytest.fixture(autouse=True)
def _warmup_only(request):
    """HOPE_BENCH_WARMUP=1: `benchmark.pedantic` runs its target once (compiling what it launches), then skips."""
    if WARMUP and "benchmark" in request.fixturenames:

        def compile_only(target, args=(), kwargs=None, **_):
            target(*args, **(kwargs or {}))
            pytest.skip("HOPE_BENCH_WARMUP=1: ran once to compile, not timed")

        request.getfixturevalue("benchmark").pedantic = compile_only
    yield


# baselines that take long per row (a Python loop over tokens, torch.compile's compilation)
SLOW_BASELINES = {"token_loop", "compiled_chunked", "compile", "torch.compile"}


def pytest_collection_modifyitems(items):
    """Order within a file (stable otherwise): the regular shapes' fast and eager rows, their slow baselines
    (token loop, torch.compile), then the 8x-long shapes' rows (whose eager baselines take seconds per call).
    A run stopped by its time limit (benchmarks/run_gpu.sh) then has every ratio at the regular shapes: on an
    H200 (2026-11-27) the 8x rows used the dgd and titans suites' 70 s before any torch.compile row ran."""

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        names = [v for v in params.values() if isinstance(v, str)]
        return any("x8" in v for v in names), any(v in SLOW_BASELINES for v in names)

    items.sort(key=key)


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    _with_speedups(ROWS)
    tr = terminalreporter
    tr.section("hope-kernels benchmark summary (speed-up = eager ms / ms)")
    tr.write_line(
        f"{'group':58s} {'backend':16s} {'ms':>10s} {'speed-up':>9s} {'GB/s':>8s} {'TFLOP/s':>8s} "
        f"{'peak MiB':>9s} {'% copy':>7s}"
    )
    fmt = lambda v, f: (f % v) if v is not None else "-"
    for r in ROWS:
        tr.write_line(
            f"{r['group'][:58]:58s} {r['backend'][:16]:16s} {r['ms']:10.3f} "
            f"{fmt(r['speedup_vs_eager'], '%8.2fx'):>9s} {fmt(r['gbps'], '%8.1f'):>8s} "
            f"{fmt(r['tflops'], '%8.2f'):>8s} {fmt(r['peak_mib'], '%9.1f'):>9s} "
            f"{fmt(r.get('pct_copy'), '%6.1f%%'):>7s}"
        )
