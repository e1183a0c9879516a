// HOPE's delta-gradient-descent memory (docs/design.md#dgd-memory), fused token-serial (recurrent) kernels for
// streaming use.
//
// One thread block per (batch, head); the state M (dk, dv) and the chunk-start state M_ref live in shared
// memory, thread j owns column j of both (no races in the update). Per token:
//   o_t = q^T M,  x = k^T (M + M_ref) - v^T,  M <- alpha M - eta k x.
// Forward saves the chunk-start states (B, H, N, dk, dv). Backward walks the chunks in reverse: it reloads a
// chunk's start state, recomputes the chunk's token states M_{t-1} into a global scratch (B*H, C, dk, dv), then
// runs the token rule backwards with dM and dM_ref in shared memory (docs/dgd.md, "Token-serial backward").
// Math in float32 (double for double inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <tuple>

#include "accum.cuh"
#include "cuda_smem.h"

namespace {

using at::Tensor;

using hope_kernels_cuda::acc_of;

constexpr int kThreads = hope_kernels::smem::kDgdThreads;  // 128

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* red) {
  // every thread gets the sum; red holds kThreads values
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  acc_t out = red[0];
  __syncthreads();
  return out;
}

// Forward: M, M_ref (dk*dv each), q, k (dk each) in shared memory.
template <typename scalar_t, typename acc_t, typename gate_t>
__global__ void dgd_recurrent_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                         const scalar_t* __restrict__ v, const gate_t* __restrict__ alpha,
                                         const gate_t* __restrict__ eta, const acc_t* __restrict__ m0,
                                         scalar_t* __restrict__ o, acc_t* __restrict__ mT,
                                         acc_t* __restrict__ states, int64_t L, int64_t C, int64_t N, int dk, int dv) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* M = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Mref = M + dk * dv;
  acc_t* sq = Mref + dk * dv;
  acc_t* sk = sq + dk;
  const int64_t bh = blockIdx.x;
  const int64_t S = static_cast<int64_t>(dk) * dv;
  for (int idx = threadIdx.x; idx < S; idx += blockDim.x) M[idx] = m0 ? m0[bh * S + idx] : acc_t(0);
  for (int64_t t = 0; t < L; ++t) {
    const int64_t row = bh * L + t;
    __syncthreads();
    for (int i = threadIdx.x; i < dk; i += blockDim.x) {
      sq[i] = static_cast<acc_t>(q[row * dk + i]);
      sk[i] = static_cast<acc_t>(k[row * dk + i]);
    }
    if (t % C == 0) {
      acc_t* st = states + (bh * N + t / C) * S;
      for (int idx = threadIdx.x; idx < S; idx += blockDim.x) { Mref[idx] = M[idx]; st[idx] = M[idx]; }
    }
    __syncthreads();
    const acc_t a = static_cast<acc_t>(alpha[row]), e = static_cast<acc_t>(eta[row]);
    for (int j = threadIdx.x; j < dv; j += blockDim.x) {
      acc_t oj = 0, xj = 0;
      for (int i = 0; i < dk; ++i) {
        const acc_t m = M[i * dv + j];
        oj += sq[i] * m;
        xj += sk[i] * (m + Mref[i * dv + j]);
      }
      xj -= static_cast<acc_t>(v[row * dv + j]);
      o[row * dv + j] = static_cast<scalar_t>(oj);
      for (int i = 0; i < dk; ++i) M[i * dv + j] = a * M[i * dv + j] - e * sk[i] * xj;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < S; idx += blockDim.x) mT[bh * S + idx] = M[idx];
}

// Backward: G = dM, dMref, Mref (dk*dv each) in shared memory; q, k (dk), x, dx, dO (dv); reduction buffer.
template <typename scalar_t, typename acc_t, typename gate_t>
__global__ void dgd_recurrent_bwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                         const scalar_t* __restrict__ v, const gate_t* __restrict__ alpha,
                                         const gate_t* __restrict__ eta, const acc_t* __restrict__ states,
                                         const scalar_t* __restrict__ dout, const acc_t* __restrict__ dmT,
                                         acc_t* __restrict__ scratch, scalar_t* __restrict__ dq,
                                         scalar_t* __restrict__ dk_out, scalar_t* __restrict__ dv_out,
                                         gate_t* __restrict__ dalpha, gate_t* __restrict__ deta,
                                         acc_t* __restrict__ dm0, int64_t L, int64_t C, int64_t N, int dk, int dv) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t S = static_cast<int64_t>(dk) * dv;
  acc_t* G = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* dMref = G + S;
  acc_t* Mref = dMref + S;
  acc_t* sq = Mref + S;
  acc_t* sk = sq + dk;
  acc_t* sx = sk + dk;
  acc_t* sdx = sx + dv;
  acc_t* sdo = sdx + dv;
  acc_t* red = sdo + dv;
  const int64_t bh = blockIdx.x;
  acc_t* Mt = scratch + bh * C * S;  // Mt[s] = M_{t-1} for token t = t0 + s of the current chunk
  for (int idx = threadIdx.x; idx < S; idx += blockDim.x) G[idx] = dmT[bh * S + idx];
  for (int64_t n = N - 1; n >= 0; --n) {
    const int64_t t0 = n * C;
    const int64_t t1 = (t0 + C < L) ? t0 + C : L;
    __syncthreads();
    for (int idx = threadIdx.x; idx < S; idx += blockDim.x) {
      Mref[idx] = states[(bh * N + n) * S + idx];
      dMref[idx] = 0;
      Mt[idx] = Mref[idx];
    }
    // recompute the chunk's token states; thread j owns column j of every Mt[s]
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = bh * L + t;
      __syncthreads();
      for (int i = threadIdx.x; i < dk; i += blockDim.x) sk[i] = static_cast<acc_t>(k[row * dk + i]);
      __syncthreads();
      const acc_t a = static_cast<acc_t>(alpha[row]), e = static_cast<acc_t>(eta[row]);
      const acc_t* Mp = Mt + (t - t0) * S;
      acc_t* Mn = Mt + (t - t0 + 1) * S;
      for (int j = threadIdx.x; j < dv; j += blockDim.x) {
        acc_t xj = 0;
        for (int i = 0; i < dk; ++i) xj += sk[i] * (Mp[i * dv + j] + Mref[i * dv + j]);
        xj -= static_cast<acc_t>(v[row * dv + j]);
        if (t + 1 < t1)
          for (int i = 0; i < dk; ++i) Mn[i * dv + j] = a * Mp[i * dv + j] - e * sk[i] * xj;
      }
    }
    // reverse over the chunk's tokens
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t row = bh * L + t;
      const acc_t* Mp = Mt + (t - t0) * S;
      __syncthreads();
      for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        sq[i] = static_cast<acc_t>(q[row * dk + i]);
        sk[i] = static_cast<acc_t>(k[row * dk + i]);
      }
      for (int j = threadIdx.x; j < dv; j += blockDim.x) sdo[j] = static_cast<acc_t>(dout[row * dv + j]);
      __syncthreads();
      const acc_t a = static_cast<acc_t>(alpha[row]), e = static_cast<acc_t>(eta[row]);
      acc_t part_a = 0, part_e = 0;
      for (int j = threadIdx.x; j < dv; j += blockDim.x) {
        acc_t xj = 0, sj = 0;
        for (int i = 0; i < dk; ++i) {
          const acc_t g = G[i * dv + j];
          const acc_t m = Mp[i * dv + j];
          xj += sk[i] * (m + Mref[i * dv + j]);
          sj += sk[i] * g;
          part_a += m * g;
        }
        xj -= static_cast<acc_t>(v[row * dv + j]);
        sx[j] = xj;
        sdx[j] = -e * sj;
        part_e -= sj * xj;
        dv_out[row * dv + j] = static_cast<scalar_t>(e * sj);
      }
      const acc_t da = block_sum(part_a, red);  // also orders the sx / sdx writes before their reads
      const acc_t de = block_sum(part_e, red);
      if (threadIdx.x == 0) {
        dalpha[row] = static_cast<gate_t>(da);
        deta[row] = static_cast<gate_t>(de);
      }
      for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        acc_t dqi = 0, dki = 0;
        for (int j = 0; j < dv; ++j) {
          const acc_t m = Mp[i * dv + j];
          dqi += m * sdo[j];
          dki += -e * G[i * dv + j] * sx[j] + (m + Mref[i * dv + j]) * sdx[j];
        }
        dq[row * dk + i] = static_cast<scalar_t>(dqi);
        dk_out[row * dk + i] = static_cast<scalar_t>(dki);
      }
      __syncthreads();
      for (int j = threadIdx.x; j < dv; j += blockDim.x) {
        for (int i = 0; i < dk; ++i) {
          const acc_t kdx = sk[i] * sdx[j];
          G[i * dv + j] = a * G[i * dv + j] + kdx + sq[i] * sdo[j];
          dMref[i * dv + j] += kdx;
        }
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < S; idx += blockDim.x) G[idx] += dMref[idx];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < S; idx += blockDim.x) dm0[bh * S + idx] = G[idx];
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha, const Tensor& eta,
                  int64_t C) {
  TORCH_CHECK(q.is_cuda(), "dgd_recurrent: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes(), "q, k must be (B, H, L, dk), got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(2) == q.size(2), "v must be (B, H, L, dv), got ", v.sizes());
  TORCH_CHECK(alpha.sizes() == q.sizes().slice(0, 3) && eta.sizes() == alpha.sizes(),
              "alpha, eta must be (B, H, L), got ", alpha.sizes(), " and ", eta.sizes());
  TORCH_CHECK(C >= 1, "chunk_size must be >= 1, got ", C);
  TORCH_CHECK(alpha.scalar_type() == eta.scalar_type(), "alpha and eta dtypes differ: ", alpha.scalar_type(),
              " vs ", eta.scalar_type());
}

size_t set_smem(const void* kernel, size_t bytes) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), "dgd_recurrent: the state needs ", bytes,
              " bytes of shared memory, the device allows ", optin, "; use backend='triton' or smaller heads");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return bytes;
}

std::tuple<Tensor, Tensor, Tensor> dgd_recurrent_fwd_cuda(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                          const Tensor& alpha_, const Tensor& eta_,
                                                          const c10::optional<Tensor>& initial_state, int64_t C) {
  check_inputs(q_, k_, v_, alpha_, eta_, C);
  const c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto alpha = alpha_.contiguous(), eta = eta_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  const int dk = static_cast<int>(q.size(3)), dv = static_cast<int>(v.size(3));
  const int64_t N = (L + C - 1) / C;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = q.options().dtype(acc);
  auto o = at::empty({B, H, L, dv}, q.options());
  auto mT = at::empty({B, H, dk, dv}, opts);
  auto states = at::empty({B, H, N, dk, dv}, opts);
  Tensor m0;
  if (initial_state.has_value()) m0 = initial_state->to(acc).contiguous();
  if (B * H == 0) return {o, mT, states};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, alpha.scalar_type(), "dgd_recurrent_fwd_gate", [&] {
    using gate_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "dgd_recurrent_fwd", [&] {
      using acc_t = typename acc_of<scalar_t>::type;
      auto kernel = dgd_recurrent_fwd_kernel<scalar_t, acc_t, gate_t>;
      const size_t smem = set_smem(reinterpret_cast<const void*>(kernel),
                                   hope_kernels::smem::dgd_fwd(dk, dv, sizeof(acc_t)));
      kernel<<<B * H, kThreads, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), alpha.data_ptr<gate_t>(),
          eta.data_ptr<gate_t>(), m0.defined() ? m0.data_ptr<acc_t>() : nullptr, o.data_ptr<scalar_t>(),
          mT.data_ptr<acc_t>(), states.data_ptr<acc_t>(), L, C, N, dk, dv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {o, mT, states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dgd_recurrent_bwd_cuda(
    const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& alpha_, const Tensor& eta_,
    const Tensor& states_, const Tensor& do_, const Tensor& dM_, int64_t C) {
  check_inputs(q_, k_, v_, alpha_, eta_, C);
  const c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), dout = do_.to(q_.scalar_type()).contiguous();
  auto alpha = alpha_.contiguous(), eta = eta_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  const int dk = static_cast<int>(q.size(3)), dv = static_cast<int>(v.size(3));
  const int64_t N = (L + C - 1) / C;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto states = states_.to(acc).contiguous();
  auto dM = dM_.to(acc).contiguous();
  TORCH_CHECK(states.dim() == 5 && states.size(2) == N, "states must be (B, H, N, dk, dv) with N = ", N, ", got ",
              states.sizes());
  auto dq = at::empty_like(q), dk_t = at::empty_like(k), dv_t = at::empty_like(v);
  auto dalpha = at::empty_like(alpha), deta = at::empty_like(eta);
  auto dm0 = at::empty({B, H, dk, dv}, q.options().dtype(acc));
  if (B * H == 0) return {dq, dk_t, dv_t, dalpha, deta, dm0};
  const int64_t Cs = C < L ? C : L;
  auto scratch = at::empty({B * H, Cs, dk, dv}, q.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, alpha.scalar_type(), "dgd_recurrent_bwd_gate", [&] {
    using gate_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "dgd_recurrent_bwd", [&] {
      using acc_t = typename acc_of<scalar_t>::type;
      auto kernel = dgd_recurrent_bwd_kernel<scalar_t, acc_t, gate_t>;
      const size_t smem = set_smem(reinterpret_cast<const void*>(kernel),
                                   hope_kernels::smem::dgd_bwd(dk, dv, sizeof(acc_t)));
      kernel<<<B * H, kThreads, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), alpha.data_ptr<gate_t>(),
          eta.data_ptr<gate_t>(), states.data_ptr<acc_t>(), dout.data_ptr<scalar_t>(), dM.data_ptr<acc_t>(),
          scratch.data_ptr<acc_t>(), dq.data_ptr<scalar_t>(), dk_t.data_ptr<scalar_t>(), dv_t.data_ptr<scalar_t>(),
          dalpha.data_ptr<gate_t>(), deta.data_ptr<gate_t>(), dm0.data_ptr<acc_t>(), L, C, N, dk, dv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dq, dk_t, dv_t, dalpha, deta, dm0};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CUDA, m) {
  m.impl("dgd_recurrent_fwd", &dgd_recurrent_fwd_cuda);
  m.impl("dgd_recurrent_bwd", &dgd_recurrent_bwd_cuda);
}
