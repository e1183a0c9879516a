// Python entry point of hope_kernels._C. The ops themselves register through TORCH_LIBRARY
// (registration.cpp) and TORCH_LIBRARY_IMPL (one file per op family and device); importing this module
// loads them into torch.ops.hope_kernels.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hope-kernels compiled ops (C++ CPU, and CUDA when built with it)";
#ifdef HOPE_KERNELS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
