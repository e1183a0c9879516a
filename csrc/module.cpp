// Python entry point of hope_kernels._C. The ops themselves register through TORCH_LIBRARY
// (registration.cpp) and TORCH_LIBRARY_IMPL (one file per op family and device); importing this module
// loads them into torch.ops.hope_kernels.
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "cuda_smem.h"

namespace {

// Bytes of dynamic shared memory per block the named CUDA kernel launches with (csrc/cuda_smem.h); compiled
// with or without CUDA, so Python reads the number from the source the launchers use.
int64_t cuda_shared_memory(const std::string& kernel, int64_t dk, int64_t dv, int64_t acc_bytes) {
  namespace smem = hope_kernels::smem;
  const auto acc = static_cast<size_t>(acc_bytes);
  if (kernel == "dgd_fwd") return static_cast<int64_t>(smem::dgd_fwd(dk, dv, acc));
  if (kernel == "dgd_bwd") return static_cast<int64_t>(smem::dgd_bwd(dk, dv, acc));
  if (kernel == "titans_linear_fwd") return static_cast<int64_t>(smem::titans_linear_fwd(dk, acc));
  if (kernel == "titans_linear_bwd") return static_cast<int64_t>(smem::titans_linear_bwd(dk, acc));
  throw std::invalid_argument("cuda_shared_memory: kernel must be one of dgd_fwd, dgd_bwd, titans_linear_fwd, "
                              "titans_linear_bwd, got '" + kernel + "'");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hope-kernels compiled ops (C++ CPU, and CUDA when built with it)";
#ifdef HOPE_KERNELS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cuda_shared_memory", &cuda_shared_memory, "bytes of shared memory per block of a CUDA kernel",
        pybind11::arg("kernel"), pybind11::arg("dk"), pybind11::arg("dv"), pybind11::arg("acc_bytes"));
}
