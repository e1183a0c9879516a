"""Build of hope_kernels._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Install with `pip install --no-build-isolation -e .` (see README). Environment switches:
  HOPE_KERNELS_SKIP_EXT=1    build no extension (reference and Triton paths only)
  HOPE_KERNELS_SKIP_CUDA=1   build the C++ CPU kernels only
  HOPE_KERNELS_FORCE_CUDA=1  build the CUDA kernels even without a visible GPU (needs torch with CUDA + nvcc)
  TORCH_CUDA_ARCH_LIST       CUDA targets, default "9.0" (Hopper)
  MAX_JOBS                   parallel compile jobs (read by torch's build)
"""

import glob
import os
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("HOPE_KERNELS_SKIP_EXT"):
        print("hope-kernels: HOPE_KERNELS_SKIP_EXT set, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "hope-kernels: torch is not installed in the build environment; building no extension. "
            "Install torch first and use `pip install --no-build-isolation -e .`",
            file=sys.stderr,
        )
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx_flags = ["-O3", "-std=c++17"]
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"]

    want_cuda = not _flag("HOPE_KERNELS_SKIP_CUDA")
    torch_has_cuda = torch.version.cuda is not None
    nvcc_found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    gpu_visible = torch_has_cuda and torch.cuda.is_available()
    build_cuda = want_cuda and torch_has_cuda and nvcc_found and (gpu_visible or _flag("HOPE_KERNELS_FORCE_CUDA"))
    if _flag("HOPE_KERNELS_FORCE_CUDA") and not (torch_has_cuda and nvcc_found):
        raise RuntimeError(
            f"HOPE_KERNELS_FORCE_CUDA=1 but torch has CUDA={torch_has_cuda} and nvcc found={nvcc_found} "
            f"(CUDA_HOME={CUDA_HOME}); install a CUDA build of torch and the CUDA toolkit"
        )
    if not build_cuda:
        why = (
            "HOPE_KERNELS_SKIP_CUDA set"
            if not want_cuda
            else "torch is a CPU build"
            if not torch_has_cuda
            else "nvcc not found (set CUDA_HOME)"
            if not nvcc_found
            else "no GPU visible"
        )
        print(f"hope-kernels: building C++ CPU kernels only ({why})", file=sys.stderr)
        ext = CppExtension(
            "hope_kernels._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
        )
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        print(
            f"hope-kernels: building C++ and CUDA kernels for TORCH_CUDA_ARCH_LIST="
            f"{os.environ['TORCH_CUDA_ARCH_LIST']}",
            file=sys.stderr,
        )
        ext = CUDAExtension(
            "hope_kernels._C",
            cpp_sources + cuda_sources,
            define_macros=[("HOPE_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    ext.include_dirs.append(os.path.join(here, "csrc"))
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
