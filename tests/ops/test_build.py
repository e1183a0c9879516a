"""Build checks that need no GPU: every CUDA source compiles with nvcc, the CMake build links against the
installed torch and registers the ops, and the package reports its backends."""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import hope_kernels
from helpers import ROOT as REPO

ROOT = str(REPO)
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)


def test_backends_reports_every_backend():
    b = hope_kernels.backends()
    assert set(b) == {"reference", "triton", "cuda", "cpu"} and b["reference"] is True
    assert b["cuda"] == (torch.cuda.is_available() and b["cuda"])


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = [
        NVCC,
        "-c",
        source,
        "-o",
        str(tmp_path / "out.o"),
        "-std=c++17",
        "-arch=sm_90",
        # CPU wheels of torch lack one generated CUDA header; the shim stands in for it (compile check only)
        "-I" + os.path.join(ROOT, "tests", "helpers", "nvcc_shim"),
        "-I" + inc,
        "-I" + os.path.join(inc, "torch", "csrc", "api", "include"),
        "-I" + os.path.join(ROOT, "csrc"),
        "-I" + sysconfig.get_paths()["include"],
        "-w",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed on {os.path.basename(source)}:\n{r.stderr[-4000:]}"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_build_registers_ops(tmp_path):
    import torch.utils

    build = tmp_path / "build"
    env = dict(os.environ, MAX_JOBS="2")
    r = subprocess.run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    libs = glob.glob(str(build / "libhope_kernels_ops*"))
    assert libs, os.listdir(build)
    # load it in a fresh interpreter (the package's own _C registers the same namespace)
    code = (
        "import torch; torch.ops.load_library(%r); "
        "x = torch.randn(2, 3, 4, 8, dtype=torch.float64); t = torch.randn(2, 3, 4, 8, dtype=torch.float64); "
        "ps = torch.ops.hope_kernels.l1_per_step(x, t, True, 1e-6); "
        "ref = (x - torch.nn.functional.layer_norm(t, (8,), eps=1e-6)).abs().mean((0, 2, 3)); "
        "assert torch.allclose(ps, ref), (ps, ref); print('ok')" % libs[0]
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def _triton_ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # no NVIDIA backend in this triton build
        return False


# One GPU configuration of every Triton kernel family, compiled for sm_90 here (no GPU): the interpreter the
# other tests use accepts code that the GPU compiler rejects (tile shapes, layouts, shared memory).
# (prefixes of compile_sm90.py case names: the launchers' default configurations, and dgd with T precomputed)
SM90_CASES = [
    "l1 D=1024 bf16",
    "rope d=64 bf16",
    "dgd C=258",
    "dgd precompute C=258",
    "titans linear C=16",
    "titans mlp",
]
SM90_KERNELS = [
    "l1_fwd_rows_kernel",
    "l1_fwd_last_program_kernel",
    "l1_bwd_rows_kernel",
    "rope_rotate_kernel",
    "rope_attn_fwd_kernel",
    "rope_attn_bwd_dkv_kernel",
    "rope_attn_bwd_dq_kernel",
    "dgd_fwd_kernel",
    "dgd_bwd_kernel",
    "dgd_tsolve_kernel",
    "titans_linear_fwd_kernel",
    "titans_linear_bwd_kernel",
    "titans_mlp_fwd_kernel",
    "titans_mlp_bwd_kernel",
]


@pytest.mark.slow(minutes=3)
@pytest.mark.skipif(not _triton_ptxas(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_triton_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    md = tmp_path / "sm90.md"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "compile_sm90.py"),
            "--only",
            ",".join(SM90_CASES),
            "--md",
            str(md),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert r.returncode == 0, f"a Triton kernel failed to compile for sm_90:\n{r.stdout[-6000:]}{r.stderr[-3000:]}"
    table = md.read_text()
    for kernel in SM90_KERNELS:
        assert f"| {kernel} |" in table, f"{kernel} was not compiled:\n{table}"
    # every row carries ptxas' register count (a report that failed to parse would show -1)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "_kernel |" in line]
    assert rows and all(" | -1 |" not in line for line in rows), table


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the smoke sweep runs in the interpreter")
def test_sweep_script_smoke(tmp_path):
    """benchmarks/sweep_gpu.py (one GPU call times every launch configuration) on tiny shapes: every
    configuration runs, computes what the default computes, and lands in the markdown and JSON outputs."""
    md, js = tmp_path / "sweep.md", tmp_path / "sweep.json"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "sweep_gpu.py"),
            "--smoke",
            "--only",
            "titans,l1",
            "--md",
            str(md),
            "--json",
            str(js),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(js.read_text())
    assert {row["family"] for row in rows} == {"titans", "l1"}
    assert all("error" not in row for row in rows), rows
    assert all(row["rel_err_vs_default"] < 1e-5 and row["fwd_ms"] > 0 and row["bwd_ms"] > 0 for row in rows)
    assert md.read_text().count("| titans |") == 3
