// Accumulation type shared by the CUDA kernels: float for half / bfloat16 / float inputs, double for double.
#pragma once

namespace hope_kernels_cuda {

template <typename T>
struct acc_of { using type = float; };
template <>
struct acc_of<double> { using type = double; };

}  // namespace hope_kernels_cuda
