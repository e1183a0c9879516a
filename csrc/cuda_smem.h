// Dynamic shared memory per block of the CUDA kernels, in one place (plain host code, no CUDA needed): the
// launchers in csrc/cuda/*.cu size their launches with it, and hope_kernels._C exports it
// (cuda_shared_memory, module.cpp) so that Python checks a call against the device's limit before any launcher
// runs (an error raised inside a launcher crashed the process on an H200). acc: bytes of the accumulation type.
#pragma once
#include <cstddef>
#include <cstdint>

namespace hope_kernels::smem {

// csrc/cuda/dgd.cu: one block of kDgdThreads threads per (batch, head).
constexpr int kDgdThreads = 128;

// forward: M, M_ref (dk dv each) and q, k (dk each)
constexpr size_t dgd_fwd(int64_t dk, int64_t dv, size_t acc) {
  return (2 * static_cast<size_t>(dk) * dv + 2 * dk) * acc;
}

// backward: dM, dM_ref, M_ref (dk dv each), q, k (dk), x, dx, dO (dv) and a reduction buffer of kDgdThreads
constexpr size_t dgd_bwd(int64_t dk, int64_t dv, size_t acc) {
  return (3 * static_cast<size_t>(dk) * dv + 2 * dk + 3 * dv + kDgdThreads) * acc;
}

// csrc/cuda/titans.cu: a block owns kTitansCols columns of (W, S); kTitansRowLanes threads share a column;
// tiles have a row stride of kTitansStride (bank spread).
constexpr int kTitansCols = 32;
constexpr int kTitansRowLanes = 4;
constexpr int kTitansThreads = kTitansCols * kTitansRowLanes;  // 128
constexpr int kTitansWarps = kTitansThreads / 32;              // 4
constexpr int kTitansStride = kTitansCols + 8;                 // 40

// forward: W, S and W_ref tiles (dk rows each)
constexpr size_t titans_linear_fwd(int64_t dk, size_t acc) {
  return 3 * static_cast<size_t>(dk) * kTitansStride * acc;
}

// backward: four tiles and the per-warp partial sums (3 per row and 3 more per warp)
constexpr size_t titans_linear_bwd(int64_t dk, size_t acc) {
  return (4 * static_cast<size_t>(dk) * kTitansStride + 3 * kTitansWarps * static_cast<size_t>(dk) +
          3 * kTitansWarps) * acc;
}

}  // namespace hope_kernels::smem
