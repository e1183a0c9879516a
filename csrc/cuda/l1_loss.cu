// Fused L1 teacher-forcing / rollout loss on CUDA.
// One warp per row (b, t, n). Each lane strides over D in 16-byte packs (when D allows): the target row's layer-norm statistics come from a
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

#include <cstdint>
#include <type_traits>

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

// VEC elements per 16-byte load when the row length allows it (D % VEC == 0), else 1.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack { scalar_t v[VEC]; };

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void row_stats(const scalar_t* __restrict__ t, int64_t D, bool normalize, acc_t eps,
                                          int lane, acc_t& mean, acc_t& rstd) {
  if (!normalize) { mean = 0; rstd = 1; return; }
  const auto* tp = reinterpret_cast<const Pack<scalar_t, VEC>*>(t);
  acc_t s = 0;
  for (int64_t i = lane; i < D / VEC; i += 32) {
    const auto x = tp[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += static_cast<acc_t>(x.v[j]);
  }
  mean = warp_sum(s) / static_cast<acc_t>(D);
  acc_t v = 0;  // second sweep hits L1: exact centred variance without a second DRAM read
  for (int64_t i = lane; i < D / VEC; i += 32) {
    const auto x = tp[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) { const acc_t c = static_cast<acc_t>(x.v[j]) - mean; v += c * c; }
  }
  v = warp_sum(v) / static_cast<acc_t>(D);
  rstd = static_cast<acc_t>(1) / sqrt(v + eps);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void l1_fwd_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                              acc_t* __restrict__ row_sums, int64_t rows, int64_t D, bool normalize, acc_t eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const scalar_t* t = target + row * D;
  acc_t mean, rstd;
  row_stats<scalar_t, acc_t, VEC>(t, D, normalize, eps, lane, mean, rstd);
  const auto* pp = reinterpret_cast<const Pack<scalar_t, VEC>*>(pred + row * D);
  const auto* tp = reinterpret_cast<const Pack<scalar_t, VEC>*>(t);
  acc_t s = 0;
  for (int64_t i = lane; i < D / VEC; i += 32) {
    const auto p = pp[i];
    const auto x = tp[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      s += abs(static_cast<acc_t>(p.v[j]) - (static_cast<acc_t>(x.v[j]) - mean) * rstd);
  }
  s = warp_sum(s);
  if (lane == 0) row_sums[row] = s;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void l1_bwd_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                              const acc_t* __restrict__ coef, scalar_t* __restrict__ grad, int64_t rows,
                              int64_t T, int64_t N, int64_t D, bool normalize, acc_t eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const scalar_t* t = target + row * D;
  const acc_t c = coef[(row / N) % T];
  acc_t mean, rstd;
  row_stats<scalar_t, acc_t, VEC>(t, D, normalize, eps, lane, mean, rstd);
  const auto* pp = reinterpret_cast<const Pack<scalar_t, VEC>*>(pred + row * D);
  const auto* tp = reinterpret_cast<const Pack<scalar_t, VEC>*>(t);
  auto* gp = reinterpret_cast<Pack<scalar_t, VEC>*>(grad + row * D);
  for (int64_t i = lane; i < D / VEC; i += 32) {
    const auto p = pp[i];
    const auto x = tp[i];
    Pack<scalar_t, VEC> g;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t diff = static_cast<acc_t>(p.v[j]) - (static_cast<acc_t>(x.v[j]) - mean) * rstd;
      // sign(0) = sign(NaN) = 0, exactly as autograd of abs (torch.sign(nan) is 0)
      g.v[j] = static_cast<scalar_t>(diff > 0 ? c : (diff < 0 ? -c : static_cast<acc_t>(0)));
    }
    gp[i] = g;
  }
}

// Launch with 16-byte packs when every row starts 16-byte aligned, else one element at a time.
template <typename scalar_t, typename Launch>
void with_vec(int64_t D, const void* a, const void* b, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = D % kVec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(b) % 16 == 0;
  if (aligned) launch(std::integral_constant<int, kVec>{});
  else launch(std::integral_constant<int, 1>{});
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
    with_vec<scalar_t>(D, pred.data_ptr(), target.data_ptr(), [&](auto vec) {
      l1_fwd_kernel<scalar_t, acc_t, decltype(vec)::value><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), row_sums.data_ptr<acc_t>(), rows, D, normalize,
          static_cast<acc_t>(eps));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return row_sums.sum(at::IntArrayRef{0, 2}).div_(static_cast<double>(B * N * D));
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
    with_vec<scalar_t>(D, pred.data_ptr(), target.data_ptr(), [&](auto vec) {
      l1_bwd_kernel<scalar_t, acc_t, decltype(vec)::value><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(),
          grad.data_ptr<scalar_t>(), rows, T, N, D, normalize, static_cast<acc_t>(eps));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CUDA, m) {
  m.impl("l1_per_step", &l1_per_step_cuda);
  m.impl("l1_per_step_backward", &l1_per_step_backward_cuda);
}
