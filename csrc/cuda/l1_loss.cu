// Fused L1 teacher-forcing / rollout loss on CUDA.
//
// Fast path (D a multiple of the 16-byte pack width VEC, rows 16-byte aligned, D <= 32 lanes * 16 packs * VEC;
// 12 packs for 2-byte types, where 16 would spill): a group
// of LANES lanes owns one row (b, t, n) and holds it in registers. Lane l loads packs l, l + LANES, ...
// (NP per lane, a compile-time count) of the target and of pred with 16-byte loads, all issued before any
// arithmetic, so DRAM sees each byte once. The layer-norm statistics (mean, then centred variance: exact
// two-pass) and |pred - target_n| come from those registers with shuffle reductions inside the group.
// A block of 256 threads holds 256 / LANES rows. Rows of at most 16 packs use 8 or 16 lanes (several rows per
// warp) so short rows do not leave lanes idle.
// Fallback (any other D or alignment): one warp per row striding over D, three sweeps (the second and third
// hit L1/L2), as before.
//
// Forward: each row's sum |.| goes to a (T, B, N) workspace; the last block to finish (a device-scope
// counter) reduces it to per_step (T,) in a fixed order (warp per t), so the result is deterministic and the
// op is a single kernel after a 4-byte memset. Backward writes coef[t] * sign(pred - target_n) with 16-byte
// stores from the same registers. Accumulation in float for half/bf16/float, double for double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "accum.cuh"

namespace {

using hope_kernels_cuda::acc_of;

constexpr int kThreads = 256;  // __launch_bounds__(kThreads, 1): without the 1, ptxas capped big rows at 80
                                // registers and spilled
// Packs per lane beyond which the register row spills (ptxas, sm_90): 16 for 4/8-byte types, 12 for 2-byte.
template <typename scalar_t> constexpr int kMaxPacksPerLane = sizeof(scalar_t) == 2 ? 12 : 16;

// Sum over aligned groups of LANES lanes (LANES a power of two <= 32). Every lane of the warp must call it.
template <int LANES, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack { scalar_t v[VEC]; };

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* base, int64_t i) {
  return reinterpret_cast<const Pack<scalar_t, VEC>*>(base)[i];
}

// sign(0) = sign(NaN) = 0, exactly as autograd of abs (torch.sign(nan) is 0)
template <typename acc_t>
__device__ __forceinline__ acc_t signed_coef(acc_t diff, acc_t c) {
  return diff > 0 ? c : (diff < 0 ? -c : static_cast<acc_t>(0));
}

// One row in registers: lane `lane` of the row's group holds packs lane + LANES * k, k < NP, of P packs.
template <typename scalar_t, typename acc_t, int VEC, int LANES, int NP>
struct RegisterRow {
  Pack<scalar_t, VEC> p[NP], t[NP];
  acc_t mean, rstd;

  __device__ __forceinline__ bool has(int k, int lane, int64_t P) const { return lane + LANES * k < P; }

  __device__ __forceinline__ void load(const scalar_t* pred, const scalar_t* target, int64_t P, int64_t D,
                                       int lane, bool normalize, acc_t eps) {
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      if (has(k, lane, P)) {
        t[k] = load_pack<scalar_t, VEC>(target, lane + LANES * k);
        p[k] = load_pack<scalar_t, VEC>(pred, lane + LANES * k);
      }
    }
    if (!normalize) { mean = 0; rstd = 1; return; }
    acc_t s = 0;
#pragma unroll
    for (int k = 0; k < NP; ++k)
      if (has(k, lane, P)) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += static_cast<acc_t>(t[k].v[j]);
      }
    mean = group_sum<LANES>(s) / static_cast<acc_t>(D);
    acc_t v = 0;
#pragma unroll
    for (int k = 0; k < NP; ++k)
      if (has(k, lane, P)) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) { const acc_t c = static_cast<acc_t>(t[k].v[j]) - mean; v += c * c; }
      }
    v = group_sum<LANES>(v) / static_cast<acc_t>(D);
    rstd = static_cast<acc_t>(1) / sqrt(v + eps);
  }

  __device__ __forceinline__ acc_t diff(int k, int j) const {
    return static_cast<acc_t>(p[k].v[j]) - (static_cast<acc_t>(t[k].v[j]) - mean) * rstd;
  }

  // sum_d |pred - target_n| over the whole row (every lane of the group gets it)
  __device__ __forceinline__ acc_t abs_sum(int64_t P, int lane) const {
    acc_t s = 0;
#pragma unroll
    for (int k = 0; k < NP; ++k)
      if (has(k, lane, P)) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += abs(diff(k, j));
      }
    return group_sum<LANES>(s);
  }

  __device__ __forceinline__ void store_grad(scalar_t* grad, acc_t c, int64_t P, int lane) const {
#pragma unroll
    for (int k = 0; k < NP; ++k)
      if (has(k, lane, P)) {
        Pack<scalar_t, VEC> g;
#pragma unroll
        for (int j = 0; j < VEC; ++j) g.v[j] = static_cast<scalar_t>(signed_coef(diff(k, j), c));
        reinterpret_cast<Pack<scalar_t, VEC>*>(grad)[lane + LANES * k] = g;
      }
  }
};

// Fallback row: one warp (LANES = 32), strided sweeps over packs of VEC (1 when D or alignment forbids).
template <typename scalar_t, typename acc_t, int VEC>
struct StridedRow {
  acc_t mean, rstd;
  const scalar_t* pred;
  const scalar_t* target;

  __device__ __forceinline__ void load(const scalar_t* pr, const scalar_t* tr, int64_t P, int64_t D, int lane,
                                       bool normalize, acc_t eps) {
    pred = pr;
    target = tr;
    if (!normalize) { mean = 0; rstd = 1; return; }
    acc_t s = 0;
    for (int64_t i = lane; i < P; i += 32) {
      const auto x = load_pack<scalar_t, VEC>(target, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += static_cast<acc_t>(x.v[j]);
    }
    mean = group_sum<32>(s) / static_cast<acc_t>(D);
    acc_t v = 0;  // second sweep hits L1/L2: exact centred variance without a second DRAM read
    for (int64_t i = lane; i < P; i += 32) {
      const auto x = load_pack<scalar_t, VEC>(target, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) { const acc_t c = static_cast<acc_t>(x.v[j]) - mean; v += c * c; }
    }
    v = group_sum<32>(v) / static_cast<acc_t>(D);
    rstd = static_cast<acc_t>(1) / sqrt(v + eps);
  }

  __device__ __forceinline__ acc_t abs_sum(int64_t P, int lane) const {
    acc_t s = 0;
    for (int64_t i = lane; i < P; i += 32) {
      const auto p = load_pack<scalar_t, VEC>(pred, i);
      const auto x = load_pack<scalar_t, VEC>(target, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        s += abs(static_cast<acc_t>(p.v[j]) - (static_cast<acc_t>(x.v[j]) - mean) * rstd);
    }
    return group_sum<32>(s);
  }

  __device__ __forceinline__ void store_grad(scalar_t* grad, acc_t c, int64_t P, int lane) const {
    for (int64_t i = lane; i < P; i += 32) {
      const auto p = load_pack<scalar_t, VEC>(pred, i);
      const auto x = load_pack<scalar_t, VEC>(target, i);
      Pack<scalar_t, VEC> g;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        g.v[j] = static_cast<scalar_t>(
            signed_coef(static_cast<acc_t>(p.v[j]) - (static_cast<acc_t>(x.v[j]) - mean) * rstd, c));
      reinterpret_cast<Pack<scalar_t, VEC>*>(grad)[i] = g;
    }
  }
};

// NP == 0 selects the strided fallback.
template <typename scalar_t, typename acc_t, int VEC, int LANES, int NP>
using Row = std::conditional_t<NP == 0, StridedRow<scalar_t, acc_t, VEC>,
                               RegisterRow<scalar_t, acc_t, VEC, LANES, (NP > 0 ? NP : 1)>>;

// The row of this lane's group. Groups past the last row redo the last row (their results are dropped) so
// that every lane of a warp reaches the shuffles.
template <int LANES>
__device__ __forceinline__ int64_t group_row(int64_t rows, bool& valid) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / LANES) + threadIdx.x / LANES;
  valid = row < rows;
  return valid ? row : rows - 1;
}

template <typename scalar_t, typename acc_t, int VEC, int LANES, int NP>
__global__ void __launch_bounds__(kThreads, 1) l1_fwd_kernel(
    const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target, acc_t* __restrict__ row_sums,
    acc_t* __restrict__ per_step, unsigned int* __restrict__ blocks_done, int64_t rows, int64_t T, int64_t N,
    int64_t D, bool normalize, acc_t eps) {
  const int lane = threadIdx.x % LANES;
  const int64_t P = D / VEC;
  bool valid;
  const int64_t row = group_row<LANES>(rows, valid);
  Row<scalar_t, acc_t, VEC, LANES, NP> r;
  r.load(pred + row * D, target + row * D, P, D, lane, normalize, eps);
  const acc_t s = r.abs_sum(P, lane);
  // row = (b T + t) N + n is stored at t (B N) + b N + n: the last block then reads each t's sums contiguously,
  // without a 64-bit division per element in its serial loop
  if (valid && lane == 0) {
    const int64_t n = row % N, bt = row / N;
    row_sums[(bt % T) * (rows / T) + (bt / T) * N + n] = s;
    __threadfence();  // this row sum is visible device-wide before the block is counted (only writers wait)
  }

  // Last block reduces the (T, B, N) row sums to per_step (T,): warp w sums t = w, w + 8, ... over (b, n) in
  // a fixed order, so the result does not depend on which block finishes last.
  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
  const int64_t BN = rows / T;  // = B * N
  const acc_t count = static_cast<acc_t>(BN * D);
  // kUnroll independent partial sums keep kUnroll L2 loads in flight per lane: with one running sum (and the
  // (B, T, N) layout, two 64-bit divisions per element) the loads of this serial tail waited on each other (on
  // an H200 the forward took 27.5 us where the backward, which moves 1.5x the bytes without this tail, took
  // 14.7 us). The order stays fixed: deterministic.
  constexpr int kUnroll = 8;
  for (int64_t t = warp; t < T; t += kThreads / 32) {
    const acc_t* sums_t = row_sums + t * BN;
    acc_t part[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) part[u] = 0;
    int64_t k = wl;
    for (; k + 32 * (kUnroll - 1) < BN; k += 32 * kUnroll) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) part[u] += __ldcg(sums_t + k + 32 * u);
    }
    for (; k < BN; k += 32) part[0] += __ldcg(sums_t + k);
    acc_t a = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) a += part[u];
    a = group_sum<32>(a);
    if (wl == 0) per_step[t] = a / count;
  }
}

template <typename scalar_t, typename acc_t, int VEC, int LANES, int NP>
__global__ void __launch_bounds__(kThreads, 1) l1_bwd_kernel(
    const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target, const acc_t* __restrict__ coef,
    scalar_t* __restrict__ grad, int64_t rows, int64_t T, int64_t N, int64_t D, bool normalize, acc_t eps) {
  const int lane = threadIdx.x % LANES;
  const int64_t P = D / VEC;
  bool valid;
  const int64_t row = group_row<LANES>(rows, valid);
  Row<scalar_t, acc_t, VEC, LANES, NP> r;
  r.load(pred + row * D, target + row * D, P, D, lane, normalize, eps);
  if (valid) r.store_grad(grad + row * D, coef[(row / N) % T], P, lane);
}

// Calls launch(VEC, LANES, NP) with compile-time constants for this row length and these pointers.
template <typename scalar_t, typename Launch>
void dispatch_shape(int64_t D, std::initializer_list<const void*> ptrs, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  using V = std::integral_constant<int, kVec>;
  bool aligned = D % kVec == 0;
  for (const void* p : ptrs) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (!aligned) {
    launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 32>{}, std::integral_constant<int, 0>{});
    return;
  }
  const int64_t P = D / kVec;
  using L32 = std::integral_constant<int, 32>;
  if (P <= 8) launch(V{}, std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{});
  else if (P <= 16) launch(V{}, std::integral_constant<int, 16>{}, std::integral_constant<int, 1>{});
  else if (P <= 32 * 1) launch(V{}, L32{}, std::integral_constant<int, 1>{});
  else if (P <= 32 * 2) launch(V{}, L32{}, std::integral_constant<int, 2>{});
  else if (P <= 32 * 4) launch(V{}, L32{}, std::integral_constant<int, 4>{});
  else if (P <= 32 * 6) launch(V{}, L32{}, std::integral_constant<int, 6>{});
  else if (P <= 32 * 8) launch(V{}, L32{}, std::integral_constant<int, 8>{});
  else if (P <= 32 * 12) launch(V{}, L32{}, std::integral_constant<int, 12>{});
  else if constexpr (kMaxPacksPerLane<scalar_t> >= 16) {
    if (P <= 32 * 16) launch(V{}, L32{}, std::integral_constant<int, 16>{});
    else launch(V{}, L32{}, std::integral_constant<int, 0>{});
  } else {
    launch(V{}, L32{}, std::integral_constant<int, 0>{});
  }
}

template <int LANES>
dim3 grid_for(int64_t rows) {
  constexpr int64_t rows_per_block = kThreads / LANES;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= 0x7fffffff, "l1_rollout_loss (cuda): too many rows (", rows, ")");
  return dim3(static_cast<unsigned>(blocks));
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
  if (rows == 0) return at::zeros({T}, pred.options().dtype(acc_dtype));
  auto per_step = at::empty({T}, pred.options().dtype(acc_dtype));
  auto row_sums = at::empty({rows}, pred.options().dtype(acc_dtype));
  auto blocks_done = at::empty({1}, pred.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(blocks_done.data_ptr(), 0, sizeof(unsigned int), stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_cuda", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    dispatch_shape<scalar_t>(D, {pred.data_ptr(), target.data_ptr()}, [&](auto vec, auto lanes, auto np) {
      constexpr int kLanes = decltype(lanes)::value;
      l1_fwd_kernel<scalar_t, acc_t, decltype(vec)::value, kLanes, decltype(np)::value>
          <<<grid_for<kLanes>(rows), kThreads, 0, stream>>>(
              pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), row_sums.data_ptr<acc_t>(),
              per_step.data_ptr<acc_t>(), reinterpret_cast<unsigned int*>(blocks_done.data_ptr<int>()), rows, T,
              N, D, normalize, static_cast<acc_t>(eps));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return per_step;
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
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_backward_cuda", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    auto coef = coef_in.to(pred.device(), c10::CppTypeToScalarType<acc_t>::value).contiguous();
    dispatch_shape<scalar_t>(D, {pred.data_ptr(), target.data_ptr(), grad.data_ptr()},
                             [&](auto vec, auto lanes, auto np) {
      constexpr int kLanes = decltype(lanes)::value;
      l1_bwd_kernel<scalar_t, acc_t, decltype(vec)::value, kLanes, decltype(np)::value>
          <<<grid_for<kLanes>(rows), kThreads, 0, stream>>>(
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
