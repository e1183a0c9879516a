"""hope-kernels: training and test-time adaptation of adaptive world models on V-JEPA 2 latents.

Ops live in `hope_kernels.ops` (one folder per op family: eager reference, Triton, compiled C++/CUDA, one
dispatcher). `hope_kernels.backends()` says which fast paths this installation has.
"""

from hope_kernels.dispatch import BACKENDS, backends

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backends", "__version__"]
