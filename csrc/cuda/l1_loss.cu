// Fused L1 teacher-forcing / rollout loss on CUDA.
// One warp per row (b, t, n). Each lane strides over D: the target row's layer-norm statistics come from a
// first sweep (sum, then centred sum of squares: rows stay in L1, so DRAM sees each byte once), then the
// |pred - target_n| sweep (forward) or the coef[t] * sign(pred - target_n) sweep (backward). Warp-shuffle
// reductions; float accumulation for half/bf16/float, double for double. Forward writes one partial sum per
// row; the (B, T, N) -> (T,) reduction is a tiny follow-up sum.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace {

template <typename T> struct acc_of { using type = float; };
template <> struct acc_of<double> { using type = double; };

constexpr int kWarpsPerBlock = 8;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_stats(const scalar_t* __restrict__ t, int64_t D, bool normalize, acc_t eps,
                                          int lane, acc_t& mean, acc_t& rstd) {
  if (!normalize) { mean = 0; rstd = 1; return; }
  acc_t s = 0;
  for (int64_t d = lane; d < D; d += 32) s += static_cast<acc_t>(t[d]);
  mean = warp_sum(s) / static_cast<acc_t>(D);
  acc_t v = 0;
  for (int64_t d = lane; d < D; d += 32) { acc_t x = static_cast<acc_t>(t[d]) - mean; v += x * x; }
  v = warp_sum(v) / static_cast<acc_t>(D);
  rstd = static_cast<acc_t>(1) / sqrt(v + eps);
}

template <typename scalar_t, typename acc_t>
__global__ void l1_fwd_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                              acc_t* __restrict__ row_sums, int64_t rows, int64_t D, bool normalize, acc_t eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const scalar_t* p = pred + row * D;
  const scalar_t* t = target + row * D;
  acc_t mean, rstd;
  row_stats<scalar_t, acc_t>(t, D, normalize, eps, lane, mean, rstd);
  acc_t s = 0;
  for (int64_t d = lane; d < D; d += 32)
    s += abs(static_cast<acc_t>(p[d]) - (static_cast<acc_t>(t[d]) - mean) * rstd);
  s = warp_sum(s);
  if (lane == 0) row_sums[row] = s;
}

template <typename scalar_t, typename acc_t>
__global__ void l1_bwd_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                              const acc_t* __restrict__ coef, scalar_t* __restrict__ grad, int64_t rows,
                              int64_t T, int64_t N, int64_t D, bool normalize, acc_t eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const scalar_t* p = pred + row * D;
  const scalar_t* t = target + row * D;
  scalar_t* g = grad + row * D;
  const acc_t c = coef[(row / N) % T];
  acc_t mean, rstd;
  row_stats<scalar_t, acc_t>(t, D, normalize, eps, lane, mean, rstd);
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t diff = static_cast<acc_t>(p[d]) - (static_cast<acc_t>(t[d]) - mean) * rstd;
    // sign(0) = sign(NaN) = 0, exactly as autograd of abs (torch.sign(nan) is 0)
    g[d] = static_cast<scalar_t>(diff > 0 ? c : (diff < 0 ? -c : static_cast<acc_t>(0)));
  }
}

void check_inputs(const at::Tensor& pred, const at::Tensor& target) {
  TORCH_CHECK(pred.is_cuda() && target.is_cuda(), "pred and target must be CUDA tensors");
  TORCH_CHECK(pred.dim() == 4, "pred must be (B, T, N, D), got ", pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), "target must match pred ", pred.sizes(), ", got ", target.sizes());
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "pred and target dtypes differ");
}

at::Tensor l1_per_step_cuda(const at::Tensor& pred_in, const at::Tensor& target_in, bool normalize, double eps) {
  check_inputs(pred_in, target_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  auto pred = pred_in.contiguous();
  auto target = target_in.contiguous();
  const int64_t B = pred.size(0), T = pred.size(1), N = pred.size(2), D = pred.size(3);
  const int64_t rows = B * T * N;
  const auto acc_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto row_sums = at::empty({B, T, N}, pred.options().dtype(acc_dtype));
  if (rows == 0) return at::zeros({T}, pred.options().dtype(acc_dtype));
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_cuda", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    l1_fwd_kernel<scalar_t, acc_t><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), row_sums.data_ptr<acc_t>(), rows, D, normalize,
        static_cast<acc_t>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return row_sums.sum({0, 2}).div_(static_cast<double>(B * N * D));
}

at::Tensor l1_per_step_backward_cuda(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& coef_in,
                                     bool normalize, double eps) {
  check_inputs(pred_in, target_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  auto pred = pred_in.contiguous();
  auto target = target_in.contiguous();
  const int64_t B = pred.size(0), T = pred.size(1), N = pred.size(2), D = pred.size(3);
  TORCH_CHECK(coef_in.dim() == 1 && coef_in.size(0) == T, "coef must be (T,) = (", T, ",), got ", coef_in.sizes());
  const int64_t rows = B * T * N;
  auto grad = at::empty_like(pred);
  if (rows == 0) return grad;
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_backward_cuda", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    auto coef = coef_in.to(pred.device(), c10::CppTypeToScalarType<acc_t>::value).contiguous();
    l1_bwd_kernel<scalar_t, acc_t><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(),
        rows, T, N, D, normalize, static_cast<acc_t>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CUDA, m) {
  m.impl("l1_per_step", &l1_per_step_cuda);
  m.impl("l1_per_step_backward", &l1_per_step_backward_cuda);
}
