"""Compile every Triton kernel of the package for a GPU architecture on a machine without a GPU, and report
each kernel's resources: registers per thread, spill stores/loads, local (stack) and shared memory.

    python benchmarks/compile_sm90.py [--arch 90] [--only dgd,titans] [--md report.md]

The launchers (`*_triton` functions) run unchanged on small CPU tensors with the shapes' meta-parameters
(head dims, chunk sizes, dtypes) of the GPU benchmarks; a stand-in driver reports the target `cuda:<arch>`
and every kernel launch becomes a compile-only warm-up, so each kernel is compiled exactly as on the GPU
(Triton's bundled ptxas, same specialisation). Resources come from ptxas' own report (`ptxas -v` on the PTX
Triton produced). Exit status 1 when a kernel fails to compile. Must run without TRITON_INTERPRET.
Compiling is not running: a kernel that compiles can still be wrong or slow; the GPU tests and benchmarks
(benchmarks/run_gpu.sh) decide that.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_sm90.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _CompileOnlyDriver:
    """Enough of a Triton driver for the compile path: a fixed target, device 0, stream 0."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: list = []  # (case, kernel name, CompiledKernel)
_CASE = [""]


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _RUN(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((_CASE[0], self.fn.__name__, kernel))
    return kernel


_RUN = JITFunction.run


def _ptxas_resources(ptx: str, arch: int) -> dict:
    """registers, spill bytes, stack and shared memory of the kernel in `ptx`, from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [
                ptxas,
                "-v",
                f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                src,
                "-o",
                os.path.join(d, "k.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    text = out.stdout + out.stderr
    get = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else -1  # noqa: E731
    return dict(
        regs=get(r"Used (\d+) registers"),
        spill_st=get(r"(\d+) bytes spill stores"),
        spill_ld=get(r"(\d+) bytes spill loads"),
        stack=get(r"(\d+) bytes stack frame"),
    )


def _cases():
    """name -> thunk that calls the op family's launchers with the GPU meta-parameters."""
    from hope_kernels.ops.dgd import triton as dgd
    from hope_kernels.ops.l1_loss import triton as l1
    from hope_kernels.ops.rope_attention import triton as rope
    from hope_kernels.ops.rope_attention.reference import rope_freqs
    from hope_kernels.ops.titans import triton as titans

    r = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    u = lambda *s: 0.5 + 0.5 * torch.rand(*s)  # noqa: E731

    def l1_case(dtype):
        def run():
            p, t = r(2, 2, 3, 1024, dtype=dtype), r(2, 2, 3, 1024, dtype=dtype)
            l1.l1_per_step_triton(p, t, True, 1e-6)
            l1.l1_per_step_triton(p, t, True, 1e-6, reduce="last_program")
            l1.l1_per_step_backward_triton(p, t, torch.ones(2), True, 1e-6)

        return run

    def rope_case(dtype, d=64):
        def run():
            L = 2 * 258
            pos = torch.stack(
                torch.meshgrid(torch.arange(2), torch.arange(16), torch.arange(16), indexing="ij"), -1
            ).reshape(-1, 3)
            pos = torch.cat([pos[:258], pos[:258] + torch.tensor([1, 0, 0])])[:L]
            q, k, v = (r(1, 2, L, d, dtype=dtype) for _ in range(3))
            w = rope_freqs(d, None)
            o, lse = rope.rope_attention_fwd_triton(q, k, v, pos, w, 0, d**-0.5)
            rope.rope_attention_bwd_triton(r(1, 2, L, d, dtype=dtype), q, k, v, o, lse, pos, w, 0, d**-0.5)

        return run

    def dgd_case(C, d=64, dtype=torch.float32, vb=None, tsolve=None):
        def run():
            L = 2 * C
            q, k, v = (r(1, 2, L, d, dtype=dtype) for _ in range(3))
            a, e = u(1, 2, L), 0.1 * u(1, 2, L)
            o, M, states = dgd.dgd_fwd_triton(q, k, v, a, e, r(1, 2, d, d), C, vb, tsolve)
            dgd.dgd_bwd_triton(q, k, v, a, e, states, r(1, 2, L, d, dtype=dtype), r(1, 2, d, d), C, vb, tsolve)

        return run

    def titans_linear_case(C, d=64, vb=None):
        def run():
            L = 2 * C
            q, k, v = (r(1, 2, L, d) for _ in range(3))
            g = [0.1 * u(1, 2, L) for _ in range(3)]
            o, Ws, Ss = titans.titans_linear_fwd_triton(q, k, v, *g, r(1, 2, d, d), r(1, 2, d, d), C, vb)
            titans.titans_linear_bwd_triton(q, k, v, *g, Ws, Ss, r(1, 2, L, d), r(1, 2, d, d), r(1, 2, d, d), C, vb)

        return run

    def titans_mlp_case(C, d=64, dh=64):
        def run():
            L = 2 * C
            q, k, v = (r(1, 2, L, d) for _ in range(3))
            g = [0.1 * u(1, 2, L) for _ in range(3)]
            st = [r(1, 2, d, dh), r(1, 2, dh, d), r(1, 2, d, dh), r(1, 2, dh, d)]
            o, *S = titans.titans_mlp_fwd_triton(q, k, v, *g, *st, C)
            titans.titans_mlp_bwd_triton(q, k, v, *g, *S, r(1, 2, L, d), *[x.clone() for x in st], C)

        return run

    return {
        "l1 D=1024 fp32": l1_case(torch.float32),
        "l1 D=1024 bf16": l1_case(torch.bfloat16),
        "rope d=64 bf16": rope_case(torch.bfloat16),
        "rope d=64 fp32": rope_case(torch.float32),
        "rope d=128 bf16": rope_case(torch.bfloat16, d=128),
        "rope d=128 fp32": rope_case(torch.float32, d=128),
        "dgd C=16 d=64": dgd_case(16),
        "dgd vb=0 C=16 d=64 (all columns)": dgd_case(16, vb=0),
        "dgd vb=32 C=16 d=64": dgd_case(16, vb=32),
        "dgd C=258 d=64 (sub-chunks)": dgd_case(258),
        "dgd vb=0 C=258 d=64 (sub-chunks, all columns)": dgd_case(258, vb=0),
        "dgd C=65 d=24 (HOPE tiny)": dgd_case(65, d=24),
        "dgd precompute C=16 d=64": dgd_case(16, tsolve="precompute"),
        "dgd precompute C=258 d=64 (sub-chunks)": dgd_case(258, tsolve="precompute"),
        "dgd precompute C=65 d=24 (HOPE tiny)": dgd_case(65, d=24, tsolve="precompute"),
        "titans linear C=16 d=64": titans_linear_case(16),
        "titans linear vb=0 C=16 d=64 (all columns)": titans_linear_case(16, vb=0),
        "titans linear vb=32 C=16 d=64": titans_linear_case(16, vb=32),
        "titans mlp C=16 d=dh=64": titans_mlp_case(16),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    ap.add_argument("--only", default="", help="comma-separated prefixes of case names (l1, rope, dgd, titans)")
    ap.add_argument("--md", default="", help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    driver.set_active(_CompileOnlyDriver(args.arch))
    JITFunction.run = _compile_only
    cases = _cases()
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    failed = []
    for name, run in cases.items():
        if only and not any(name.startswith(p) for p in only):
            continue
        _CASE[0] = name
        t0 = time.perf_counter()
        try:
            run()
            print(f"compiled {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception:  # report every case, then fail
            failed.append(name)
            print(f"FAILED {name}:\n{traceback.format_exc()}", flush=True)
    rows = [
        "| case | kernel | warps | regs/thread | spill st/ld bytes | stack bytes | shared bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for case, kname, k in COMPILED:
        if (case, kname, k.hash) in seen:  # the same compiled kernel launched again in this case
            continue
        seen.add((case, kname, k.hash))
        res = _ptxas_resources(k.asm["ptx"], args.arch)
        rows.append(
            f"| {case} | {kname} | {k.metadata.num_warps} | {res['regs']} | {res['spill_st']} / "
            f"{res['spill_ld']} | {res['stack']} | {k.metadata.shared} |"
        )
    table = "\n".join(rows)
    print(f"\nTriton {triton.__version__}, target sm_{args.arch}\n\n{table}")
    if args.md:
        tmp = args.md + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"Triton {triton.__version__}, target sm_{args.arch} (compiled, not run)\n\n{table}\n")
        os.replace(tmp, args.md)
    if failed:
        print(f"\n{len(failed)} case(s) failed to compile: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
