"""titans_memory benchmarks: token loop, eager chunked, torch.compile(eager chunked) and every fast path,
forward and forward+backward, side by side; on CPU also titans-pytorch's NeuralMemory (issue 22).

    pytest benchmarks/test_bench_titans.py --benchmark-only -s

Fast paths are every backend of LINEAR_BACKENDS: on GPU the chunked Triton kernel ("triton") and the fused
token-serial CUDA kernel ("cuda", the streaming path); on CPU the compiled C++ one ("cpu"), and "explicit", the
explicit chunked forward/backward of reference.py through the same custom op (the algorithm the C++ linear path ran
as a chain of ATen calls per chunk before its fused loop: the yardstick of the linear "3x" target).
GPU shapes: one clip of the real grid (B=4, H=16, L=8*258, dk=dv=64) and 8x that length; CPU: a smaller
shape (the compiled C++ path against the eager ones). Each row's extra_info holds the ratio to the eager
chunked time of the same shape and mode, and the peak memory; a table is printed at the end.
MLP memory (`test_titans_mlp`, GPU only: there its fast path is Triton, and the interpreter is no benchmark):
same shapes with dh = 64, rows keyed "<shape>_mlp"; eager chunked and triton first, the slow baselines last.

CPU, NeuralMemory's configuration of issue 22 (`test_titans_cpu_peer`, forward+backward only): B = 2, H = 4,
L = 2064, head dim 64, MLP hidden width 64, chunk 16 and 64 (rows keyed "nm_C16" / "nm_C64", "..._mlp" for the MLP
memory). Paths: "cpu" (the C++ kernels), "explicit", "eager_chunked" (autograd through the closed form) and, for the
MLP, "neural_memory": `titans_pytorch.NeuralMemory` (PyPI `titans-pytorch`, the optional extra `peer`; the row is
skipped with a message when it is not installed). It is configured as close to our memory as it goes: dim = 4 * 64,
heads 4, dim_head 64, chunk_size C, and as its memory model our own M(x) = x + silu(x W1) W2 (W1, W2 64 x 64,
`_ResidualSiluMLP`) with `mem_model_norm_add_residual=False` (no LayerNorm around it) and `pre_rmsnorm=False`;
momentum on (order 1), everything optional off (its defaults: no q/k RMSNorm, no post-norm, no per-layer lr
modulation, no attention pooling, no weight residual, no gradient clamp, no spectral norm, no gated transition).
What still differs:
  * Its module includes what ours takes as inputs: the q, k, v projections (256 -> 256, no bias), the
    per-token learning rate (sigmoid of a linear map, times max_lr 0.01), the momentum and decay gates (sigmoids
    of linear maps of the chunk-averaged input), a per-head output gate and the head-merging projection. Ours is
    the op alone, given q, k, v (L2-normalised), the gates and the initial state (W1, W2, S1, S2), and all of them
    get gradients.
  * Momentum and weight decay act once per chunk in NeuralMemory (one gate value per chunk, an associative scan
    over chunks); ours applies eta_t and alpha_t at every token inside the chunk (closed form, docs/titans.md).
  * NeuralMemory takes every token's inner gradient at the initial weights of the call (the per-head parameters,
    batched over all chunks at once with torch.func), and its inner loss is the mean over features of the squared
    error; ours takes it at the weights of the chunk's start (the Titans recurrence, chunk by chunk) with loss
    1/2 ||M(k) - v||^2.
  * NeuralMemory stores only whole chunks (at C = 64 the last 16 of the 2064 tokens update nothing), and token t
    reads the weights after the last whole chunk that ends at or before it; ours reads W_t after token t's own
    update (inside the chunk through the closed form).
Each is timed as one forward+backward of the full module / op at the same batch, heads and length (sum of the
output, backward to every input and parameter).
Peak memory on CPU (`peak_mib`): in a fresh subprocess per row (`python benchmarks/test_bench_titans.py --peak
...`; glibc's mmap threshold fixed at 128 KiB, so every large tensor is mapped and unmapped on its own), a warm-up
call on two chunks (the libraries load and initialise), then the inputs and module of the row, then the peak
resident set (VmHWM, reset through /proc/self/clear_refs; where that file cannot be written, ru_maxrss) of one
forward+backward minus the resident set just before it: what the call adds on top of its inputs and parameters.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hope_kernels import backends
from hope_kernels.ops import titans_memory
from hope_kernels.ops.titans import _LINEAR, _MLP, LINEAR_BACKENDS, MLP_BACKENDS
from hope_kernels.ops.titans.reference import (
    titans_chunked,
    titans_linear_chunk_step,
    titans_mlp_chunk_step,
    titans_token_loop,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
C = 16
SHAPES = {"clip": (4, 16, 8 * 258, 64), "clip_x8": (4, 16, 8 * 8 * 258, 64)} if CUDA else {"cpu_small": (1, 4, 512, 32)}
# eager first (the ratios' base), then the fast paths, then the slow baselines
PATHS = (
    ["eager_chunked"]
    + [b for b in LINEAR_BACKENDS if b != "reference"]
    + ["explicit", "token_loop", "compiled_chunked"]
)
RESULTS = {}


def _inputs(shape, grad):
    B, H, L, d = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=DEVICE)
    u = lambda *s: torch.rand(*s, generator=g, device=DEVICE)
    x = [
        F.normalize(r(B, H, L, d), dim=-1),
        F.normalize(r(B, H, L, d), dim=-1),
        r(B, H, L, d),
        0.1 * u(B, H, L),
        0.9 * u(B, H, L),
        0.1 * u(B, H, L),
    ]
    return [t.requires_grad_(grad) for t in x]


def _mlp_state(B, H, d, dh, grad):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, device=DEVICE)
    return [(0.1 * r(*s)).requires_grad_(grad) for s in ((B, H, d, dh), (B, H, dh, d), (B, H, d, dh), (B, H, dh, d))]


_compiled = {}


def _fn(path, memory="linear", state=None, chunk=C):
    kw = dict(chunk_size=chunk, memory=memory, initial_state=state)
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
    if path == "explicit":  # the custom op with the explicit PyTorch forward/backward of reference.py
        if memory == "mlp":
            return lambda *x: _MLP.ops["explicit"](*x, *state, chunk)[0]
        return lambda *x: _LINEAR.ops["explicit"](
            *x, *(torch.zeros(*x[0].shape[:2], x[0].shape[-1], x[2].shape[-1], device=DEVICE),) * 2, chunk
        )[0]
    return lambda *x: titans_memory(*x, backend=path, **kw)[0]


def _skip(path, shape_name):
    if path in ("triton", "cuda") and not CUDA:
        pytest.skip("GPU path")
    if path in ("cpu", "explicit") and CUDA:
        pytest.skip("CPU path on CUDA inputs")
    if path not in ("token_loop", "eager_chunked", "compiled_chunked", "explicit") and not backends()[path]:
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
MLP_PATHS = (
    ["eager_chunked"] + [b for b in MLP_BACKENDS if b not in ("reference", "cpu")] + ["token_loop", "compiled_chunked"]
)


@pytest.mark.skipif(not CUDA, reason="MLP memory on GPU (on CPU: test_titans_cpu_peer)")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("path", MLP_PATHS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_titans_mlp(benchmark, bench_row, path, shape_name, mode):
    _skip(path, shape_name)
    B, H, L, d = SHAPES[shape_name]
    grad = mode == "fwd_bwd"
    x = _inputs((B, H, L, d), grad)
    state = _mlp_state(B, H, d, MLP_DH, grad)
    _measure(benchmark, bench_row, _fn(path, "mlp", state), x, path, f"{shape_name}_mlp", mode, (B, H, L, d))


# ---------------------------------------------------------------- CPU: NeuralMemory's configuration (issue 22)

NM_SHAPE = (2, 4, 2064, 64)  # B, heads, L, head dim; MLP hidden width MLP_DH
NM_CHUNKS = (16, 64)
PEER_PATHS = ["cpu", "explicit", "eager_chunked", "neural_memory"]


class _ResidualSiluMLP(torch.nn.Module):
    """Our MLP memory, M(x) = x + silu(x W1) W2, as a NeuralMemory memory model (its weights are the memory)."""

    def __init__(self, d: int, dh: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(0.1 * torch.randn(d, dh))
        self.w2 = torch.nn.Parameter(0.1 * torch.randn(dh, d))

    def forward(self, x):
        return x + F.silu(x @ self.w1) @ self.w2


def _peer_case(memory: str, path: str, chunk: int, length: int = NM_SHAPE[2]):
    """(fn, args) of one forward+backward at NM_SHAPE (L = length); fn(*args) returns the output whose sum is
    backpropagated."""
    B, H, _, d = NM_SHAPE
    L = length
    if path == "neural_memory":
        from titans_pytorch import NeuralMemory

        torch.manual_seed(0)
        mem = NeuralMemory(
            dim=H * d,
            chunk_size=chunk,
            dim_head=d,
            heads=H,
            model=_ResidualSiluMLP(d, MLP_DH),
            pre_rmsnorm=False,
            mem_model_norm_add_residual=False,
        )
        seq = torch.randn(B, L, H * d, requires_grad=True)
        return (lambda s: mem(s)[0]), [seq]
    x = _inputs((B, H, L, d), True)
    state = _mlp_state(B, H, d, MLP_DH, True) if memory == "mlp" else None
    return _fn(path, memory, state, chunk), x


def _peer_skip(memory: str, path: str):
    if CUDA:
        pytest.skip("CPU comparison (on GPU: test_titans / test_titans_mlp)")
    if path == "neural_memory":
        if memory != "mlp":
            pytest.skip("NeuralMemory's memory is an MLP")
        try:
            import titans_pytorch  # noqa: F401
        except ImportError:
            pytest.skip(
                "titans-pytorch is not installed (pip install 'hope-kernels[peer]' or titans-pytorch): "
                "no NeuralMemory row"
            )
    if path == "cpu" and not backends()["cpu"]:
        pytest.skip("cpu not available (the C++ extension is not built)")


def _peak_mib(memory: str, path: str, chunk: int):
    """Peak memory of one forward+backward in a fresh subprocess (module docstring), MiB; None when it failed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--peak", memory, path, str(chunk)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if r.returncode != 0:
        print(f"\n[titans] peak memory of {memory} {path} C={chunk} not measured: {r.stderr[-500:]}")
        return None
    return float(r.stdout.split()[-1])


@pytest.mark.parametrize("path", PEER_PATHS)
@pytest.mark.parametrize("chunk", NM_CHUNKS)
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_titans_cpu_peer(benchmark, bench_row, memory, chunk, path):
    _peer_skip(memory, path)
    fn, args = _peer_case(memory, path, chunk)
    name = f"nm_C{chunk}" + ("_mlp" if memory == "mlp" else "")
    _measure(
        benchmark,
        bench_row,
        fn,
        args,
        path,
        name,
        "fwd_bwd",
        NM_SHAPE,
        chunk=chunk,
        peak_mib=_peak_mib(memory, path, chunk),
    )


def _measure(benchmark, bench_row, fn, x, path, shape_name, mode, shape, chunk=C, peak_mib=None):
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
    rounds = 3 if path in ("token_loop", "neural_memory") else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    ms = benchmark.stats.stats.median * 1e3
    if CUDA:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    RESULTS[(shape_name, mode, path)] = (ms, peak_mib)
    eager = RESULTS.get((shape_name, mode, "eager_chunked"))
    benchmark.extra_info.update(ms=ms, peak_mib=peak_mib, speedup_vs_eager_chunked=eager[0] / ms if eager else None)
    bench_row(
        group=f"titans {shape_name} {tuple(shape)} C={chunk} {mode}",
        backend=path,
        device=DEVICE,
        ms=ms,
        rounds=rounds,
        peak_mib=peak_mib,
    )
    # one line per row as it finishes (the end-of-module table is lost when the time limit stops the run)
    peak = "-" if peak_mib is None else f"{peak_mib:.1f} MiB"
    print(
        f"\n[titans] {shape_name} {mode:7s} {path:16s} {ms:9.2f} ms  "
        f"x{eager[0] / ms if eager else float('nan'):6.2f} vs eager chunked  peak {peak}"
    )


def teardown_module():
    if not RESULTS:
        return
    print(
        f"\n{'shape':>12} {'mode':>8} {'path':>17} {'ms':>10} {'x eager':>8} {'x loop':>8} {'x peer':>8} "
        f"{'peak MiB':>9}"
    )
    for (sn, mode, path), (ms, peak) in sorted(RESULTS.items()):
        e = RESULTS.get((sn, mode, "eager_chunked"), (float("nan"),))[0]
        t = RESULTS.get((sn, mode, "token_loop"), (float("nan"),))[0]
        p = RESULTS.get((sn, mode, "neural_memory"), (float("nan"),))[0]
        pk = "-" if peak is None else f"{peak:.1f}"
        print(f"{sn:>12} {mode:>8} {path:>17} {ms:10.2f} {e / ms:8.2f} {t / ms:8.2f} {p / ms:8.2f} {pk:>9}")


def _peak_main(memory: str, path: str, chunk: str) -> None:
    """`--peak MEMORY PATH CHUNK`: print the MiB one forward+backward adds at its peak (module docstring)."""
    import resource

    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    def run(fn, args):
        fn(*args).sum().backward()

    C = int(chunk)
    run(*_peer_case(memory, path, C, length=2 * C))  # warm-up on 2 chunks: libraries load and initialise
    fn, args = _peer_case(memory, path, C)
    base = kib("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the process's peak) to the current resident set
    except OSError:
        run(fn, args)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    else:
        run(fn, args)
        peak = kib("VmHWM:")
    print(f"{(peak - base) / 1024:.1f}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peak":
        _peak_main(*sys.argv[2:])
    else:
        print("usage: python benchmarks/test_bench_titans.py --peak {linear,mlp} PATH CHUNK", file=sys.stderr)
        sys.exit(2)
