// Titans LINEAR memory (docs/design.md#titans-memory), fused token-serial (recurrent) CUDA kernels, forward and
// backward, for streaming use. Same op names, inputs and outputs as the chunked CPU kernel (csrc/titans_*_cpu.cpp):
//   titans_linear_fwd -> (o, Ws, Ss),  Ws, Ss (B, H, N+1, dk, dv) the chunk-boundary states;
//   titans_linear_bwd -> (dq, dk, dv, dalpha, deta, dtheta, dW0, dS0).
// Per token t of a chunk that starts with weights W_ref (docs/titans.md, "Semantics"):
//   e = k W_ref - v,  S <- eta S - theta k^T e,  W <- (1 - alpha) W + S,  o = q W.
//
// Thread mapping (both kernels). The columns of (W, S) are independent in the forward: column j of e, S, W
// and o only needs column j of W_ref. So one block owns a tile of kCols = 32 columns of one (batch, head),
// grid (B*H, ceil(dv / 32)), and kRowLanes = 4 consecutive threads share a column: thread
// (r = tid % 4, c = tid / 4) owns the elements (i, c) with i = r, r + 4, r + 8, ... of every (dk, 32) tile.
// Each tile element is therefore read and written by ONE thread only: the state updates need no barrier.
// The sums over i (e_j, o_j) are 4-lane shuffles inside a warp. Tiles live in shared memory with a row
// stride of 40 floats, so that the 4 row-lanes x 8 columns of a warp hit 32 different banks.
//
// Forward: W, S and W_ref tiles in shared memory; no __syncthreads at all. The state is written to Ws, Ss at
// every chunk start and at the end. All math in float32 (double for double inputs).
//
// Backward (same mapping): the adjoints dW, dS (carried across chunks), the chunk's W_ref and the chunk's
// accumulated dW_ref live in shared memory. The token states inside a chunk are recomputed, not saved:
// per chunk (start state from Ws, Ss), a first pass advances through the chunk and keeps the state at the
// start of every segment of R = ceil(sqrt(min(C, L))) tokens (checkpoints, global scratch); then segment by
// segment in reverse, the R + 1 token states of the segment are recomputed into global scratch and the
// token rule is run backwards. Scratch per block: (ceil(Cs / R) + R + 1) * 2 * dk * 32 values (Cs = min(C, L))
// instead of C states; cost: the chunk is advanced about twice more than in the forward. The scratch is
// thread-private too (same element ownership). Sums over columns (dq_t, dk_t: a row of the tile) go through
// a warp shuffle over the 8 columns of a warp, then shared memory over the 4 warps (2 barriers per token);
// dq, dk and the gate gradients are per-tile partial sums (B*H, ntiles, ...) added up on the host.
// Gate gradients are the exact derivatives of the token rule (no division: exact at alpha = 1, eta = 0).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <tuple>

#include "accum.cuh"
#include "cuda_smem.h"

namespace {

using at::Tensor;

using hope_kernels_cuda::acc_of;

namespace smem = hope_kernels::smem;
constexpr int kCols = smem::kTitansCols;          // 32 columns of (W, S) per block
constexpr int kRowLanes = smem::kTitansRowLanes;  // 4 threads per column; thread (r, c) owns rows i = r (mod 4)
constexpr int kThreads = smem::kTitansThreads;    // 128
constexpr int kWarps = smem::kTitansWarps;        // 4; warp w holds columns 8w .. 8w+7
constexpr int kStride = smem::kTitansStride;      // 40: shared-memory row stride of a tile (bank spread, see header)
constexpr unsigned kFull = 0xffffffffu;

// Sum over the 4 row-lanes of a column (lanes 4c' .. 4c'+3 of a warp). Every lane must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t sum_rowlanes(acc_t x) {
  x += __shfl_xor_sync(kFull, x, 1);
  x += __shfl_xor_sync(kFull, x, 2);
  return x;
}

// Sum over the 8 columns of a warp for one row phase r (lanes with the same lane % 4). Every lane must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t sum_warp_cols(acc_t x) {
  x += __shfl_xor_sync(kFull, x, 4);
  x += __shfl_xor_sync(kFull, x, 8);
  x += __shfl_xor_sync(kFull, x, 16);
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t sum_warp(acc_t x) {
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(kFull, x, m);
  return x;
}

// e_j = k_t W_ref[:, j] - v_t[j] for the caller's column, W_ref a shared tile; the same value in all 4 lanes.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t error_col(const scalar_t* kt, const scalar_t* v, int64_t row, const acc_t* Wr,
                                           int r, int c, int j, bool col, int dk, int dv) {
  acc_t p = 0;
  for (int i = r; i < dk; i += kRowLanes) p += static_cast<acc_t>(kt[i]) * Wr[i * kStride + c];
  p = sum_rowlanes(p);
  return p - (col ? static_cast<acc_t>(v[row * dv + j]) : acc_t(0));
}

// ------------------------------------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
titans_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                  const acc_t* __restrict__ alpha, const acc_t* __restrict__ eta, const acc_t* __restrict__ theta,
                  const acc_t* __restrict__ W0, const acc_t* __restrict__ S0, scalar_t* __restrict__ o,
                  acc_t* __restrict__ Ws, acc_t* __restrict__ Ss, int64_t L, int64_t C, int64_t N, int dk, int dv) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* W = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* S = W + dk * kStride;
  acc_t* Wr = S + dk * kStride;
  const int r = threadIdx.x % kRowLanes, c = threadIdx.x / kRowLanes;
  const int64_t bh = blockIdx.x;
  const int j = blockIdx.y * kCols + c;
  const bool col = j < dv;  // threads past dv carry zeros and still join the shuffles
  const int64_t Sz = static_cast<int64_t>(dk) * dv;
  for (int i = r; i < dk; i += kRowLanes) {
    W[i * kStride + c] = col ? W0[bh * Sz + i * dv + j] : acc_t(0);
    S[i * kStride + c] = col ? S0[bh * Sz + i * dv + j] : acc_t(0);
  }
  for (int64_t t = 0; t < L; ++t) {
    const int64_t row = bh * L + t;
    if (t % C == 0) {  // chunk start: W_ref = W, and the boundary state is saved
      acc_t* wn = Ws + (bh * (N + 1) + t / C) * Sz;
      acc_t* sn = Ss + (bh * (N + 1) + t / C) * Sz;
      for (int i = r; i < dk; i += kRowLanes) {
        Wr[i * kStride + c] = W[i * kStride + c];
        if (col) {
          wn[i * dv + j] = W[i * kStride + c];
          sn[i * dv + j] = S[i * kStride + c];
        }
      }
    }
    const scalar_t* kt = k + row * dk;
    const scalar_t* qt = q + row * dk;
    const acc_t e = error_col(kt, v, row, Wr, r, c, j, col, dk, dv);
    const acc_t a = acc_t(1) - alpha[row], et = eta[row], th = theta[row];
    acc_t po = 0;
    for (int i = r; i < dk; i += kRowLanes) {
      const int idx = i * kStride + c;
      const acc_t s = et * S[idx] - th * static_cast<acc_t>(kt[i]) * e;
      const acc_t w = a * W[idx] + s;
      S[idx] = s;
      W[idx] = w;
      po += static_cast<acc_t>(qt[i]) * w;
    }
    po = sum_rowlanes(po);
    if (r == 0 && col) o[row * dv + j] = static_cast<scalar_t>(po);
  }
  acc_t* wn = Ws + (bh * (N + 1) + N) * Sz;
  acc_t* sn = Ss + (bh * (N + 1) + N) * Sz;
  if (col)
    for (int i = r; i < dk; i += kRowLanes) {
      wn[i * dv + j] = W[i * kStride + c];
      sn[i * dv + j] = S[i * kStride + c];
    }
}

// ------------------------------------------------------------------------------------------------ backward

// One token of the forward rule on the caller's elements of a scratch tile pair (row stride kCols):
// (Win, Sin) -> (Wout, Sout); in and out may be the same tile.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void advance(const scalar_t* k, const scalar_t* v, const acc_t* alpha, const acc_t* eta,
                                        const acc_t* theta, int64_t row, const acc_t* Wr, const acc_t* Win,
                                        const acc_t* Sin, acc_t* Wout, acc_t* Sout, int r, int c, int j, bool col,
                                        int dk, int dv) {
  const scalar_t* kt = k + row * dk;
  const acc_t e = error_col(kt, v, row, Wr, r, c, j, col, dk, dv);
  const acc_t a = acc_t(1) - alpha[row], et = eta[row], th = theta[row];
  for (int i = r; i < dk; i += kRowLanes) {
    const int x = i * kCols + c;
    const acc_t s = et * Sin[x] - th * static_cast<acc_t>(kt[i]) * e;
    Sout[x] = s;
    Wout[x] = a * Win[x] + s;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
titans_bwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                  const acc_t* __restrict__ alpha, const acc_t* __restrict__ eta, const acc_t* __restrict__ theta,
                  const acc_t* __restrict__ Ws, const acc_t* __restrict__ Ss, const scalar_t* __restrict__ dout,
                  const acc_t* __restrict__ dWT, const acc_t* __restrict__ dST,
                  acc_t* scratch,  // not __restrict__: read back through derived pointers after writes
                  acc_t* __restrict__ dq_part, acc_t* __restrict__ dk_part, scalar_t* __restrict__ dv_out,
                  acc_t* __restrict__ dal_part, acc_t* __restrict__ deta_part, acc_t* __restrict__ dth_part,
                  acc_t* __restrict__ dW0, acc_t* __restrict__ dS0, int64_t L, int64_t C, int64_t N, int64_t R,
                  int64_t NS_max, int dk, int dv) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* dW = reinterpret_cast<acc_t*>(smem_raw);  // adjoint of W, carried across tokens and chunks
  acc_t* dS = dW + dk * kStride;                    // adjoint of S
  acc_t* Wr = dS + dk * kStride;                    // the chunk's W_ref
  acc_t* dWr = Wr + dk * kStride;                   // the chunk's accumulated gradient to W_ref
  acc_t* rows = dWr + dk * kStride;                 // per-warp row partials: [3][kWarps][dk]
  acc_t* scal = rows + 3 * kWarps * dk;             // per-warp gate partials: [3][kWarps]
  const int r = threadIdx.x % kRowLanes, c = threadIdx.x / kRowLanes;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.x;
  const int64_t tile = blockIdx.y, ntiles = gridDim.y;
  const int j = static_cast<int>(tile) * kCols + c;
  const bool col = j < dv;
  const int64_t Sz = static_cast<int64_t>(dk) * dv;
  const int64_t TS = static_cast<int64_t>(dk) * kCols;          // one scratch tile
  const int nI = (dk + kRowLanes - 1) / kRowLanes;              // row steps, the same for every lane
  // scratch of this block: NS_max checkpoint pairs, then R + 1 segment pairs; pair p = (W at 2p, S at 2p+1)
  acc_t* base = scratch + (bh * ntiles + tile) * (NS_max + R + 1) * 2 * TS;
  auto ckW = [&](int64_t s) { return base + 2 * s * TS; };
  auto ckS = [&](int64_t s) { return base + (2 * s + 1) * TS; };
  auto sgW = [&](int64_t m) { return base + 2 * (NS_max + m) * TS; };
  auto sgS = [&](int64_t m) { return base + (2 * (NS_max + m) + 1) * TS; };
  const int64_t part = bh * ntiles + tile;  // row of the per-tile partial outputs

  for (int i = r; i < dk; i += kRowLanes) {
    dW[i * kStride + c] = col ? dWT[bh * Sz + i * dv + j] : acc_t(0);
    dS[i * kStride + c] = col ? dST[bh * Sz + i * dv + j] : acc_t(0);
    dWr[i * kStride + c] = 0;
  }
  for (int64_t n = N - 1; n >= 0; --n) {
    const int64_t t0 = n * C;
    const int64_t len = (L - t0 < C) ? L - t0 : C;
    const int64_t NS = (len + R - 1) / R;
    const acc_t* wn = Ws + (bh * (N + 1) + n) * Sz;
    const acc_t* sn = Ss + (bh * (N + 1) + n) * Sz;
    for (int i = r; i < dk; i += kRowLanes) {
      const acc_t w = col ? wn[i * dv + j] : acc_t(0);
      Wr[i * kStride + c] = w;
      ckW(0)[i * kCols + c] = w;
      ckS(0)[i * kCols + c] = col ? sn[i * dv + j] : acc_t(0);
    }
    // pass 1: state at the start of every segment of the chunk
    for (int64_t s = 1; s < NS; ++s) {
      for (int i = r; i < dk; i += kRowLanes) {
        ckW(s)[i * kCols + c] = ckW(s - 1)[i * kCols + c];
        ckS(s)[i * kCols + c] = ckS(s - 1)[i * kCols + c];
      }
      for (int64_t t = t0 + (s - 1) * R; t < t0 + s * R; ++t)
        advance(k, v, alpha, eta, theta, bh * L + t, Wr, ckW(s), ckS(s), ckW(s), ckS(s), r, c, j, col, dk, dv);
    }
    for (int64_t s = NS - 1; s >= 0; --s) {
      const int64_t s0 = t0 + s * R;
      const int64_t slen = (t0 + len - s0 < R) ? t0 + len - s0 : R;
      // pass 2: token states of the segment; sg(m) = state before token s0 + m, sg(slen) = after the last
      for (int i = r; i < dk; i += kRowLanes) {
        sgW(0)[i * kCols + c] = ckW(s)[i * kCols + c];
        sgS(0)[i * kCols + c] = ckS(s)[i * kCols + c];
      }
      for (int64_t m = 0; m < slen; ++m)
        advance(k, v, alpha, eta, theta, bh * L + s0 + m, Wr, sgW(m), sgS(m), sgW(m + 1), sgS(m + 1), r, c, j, col,
                dk, dv);
      // pass 3: the token rule backwards. On entry dW, dS are the gradients to (W_t, S_t) from later tokens.
      for (int64_t m = slen - 1; m >= 0; --m) {
        const int64_t t = s0 + m, row = bh * L + t;
        const scalar_t* kt = k + row * dk;
        const scalar_t* qt = q + row * dk;
        const acc_t e = error_col(kt, v, row, Wr, r, c, j, col, dk, dv);
        const acc_t dov = col ? static_cast<acc_t>(dout[row * dv + j]) : acc_t(0);
        const acc_t a = acc_t(1) - alpha[row], et = eta[row], th = theta[row];
        const acc_t* Wt = sgW(m + 1);  // W_t (read by o_t)
        const acc_t* Wp = sgW(m);      // W_{t-1}
        const acc_t* Sp = sgS(m);      // S_{t-1}
        acc_t pa = 0, pe = 0, kg = 0;
        for (int ii = 0; ii < nI; ++ii) {  // uniform trip count: the shuffles below need every lane
          const int i = r + ii * kRowLanes;
          acc_t pdq = 0, pdk = 0;
          if (i < dk) {
            const int idx = i * kStride + c, x = i * kCols + c;
            const acc_t g = dW[idx] + static_cast<acc_t>(qt[i]) * dov;  // total gradient to W_t
            const acc_t gs = dS[idx] + g;                               // total gradient to S_t (= to U_t)
            pdq = dov * Wt[x];
            pa += g * Wp[x];
            pe += gs * Sp[x];
            kg += static_cast<acc_t>(kt[i]) * gs;
            pdk = gs * e;
            dW[idx] = a * g;    // to W_{t-1}
            dS[idx] = et * gs;  // to S_{t-1}
          }
          pdq = sum_warp_cols(pdq);
          pdk = sum_warp_cols(pdk);
          if (lane < kRowLanes && i < dk) {  // lane == r: column 0 of this warp holds the warp's row sums
            rows[(0 * kWarps + warp) * dk + i] = pdq;
            rows[(1 * kWarps + warp) * dk + i] = -th * pdk;  // dk from U_t = -theta k^T e
          }
        }
        kg = sum_rowlanes(kg);     // (k_t dU_t)_j
        const acc_t de = -th * kg;  // gradient to e_j
        if (r == 0 && col) dv_out[row * dv + j] = static_cast<scalar_t>(-de);
        acc_t pth = (r == 0) ? -e * kg : acc_t(0);  // one lane per column
        for (int ii = 0; ii < nI; ++ii) {
          const int i = r + ii * kRowLanes;
          acc_t pdk = 0;
          if (i < dk) {
            const int idx = i * kStride + c;
            pdk = de * Wr[idx];                                 // dk from e = k W_ref - v
            dWr[idx] += static_cast<acc_t>(kt[i]) * de;
          }
          pdk = sum_warp_cols(pdk);
          if (lane < kRowLanes && i < dk) rows[(2 * kWarps + warp) * dk + i] = pdk;
        }
        pa = sum_warp(pa);
        pe = sum_warp(pe);
        pth = sum_warp(pth);
        if (lane == 0) {
          scal[0 * kWarps + warp] = pa;
          scal[1 * kWarps + warp] = pe;
          scal[2 * kWarps + warp] = pth;
        }
        __syncthreads();  // rows, scal complete
        for (int i = threadIdx.x; i < dk; i += kThreads) {
          acc_t sq = 0, sk = 0;
          for (int w = 0; w < kWarps; ++w) {
            sq += rows[(0 * kWarps + w) * dk + i];
            sk += rows[(1 * kWarps + w) * dk + i] + rows[(2 * kWarps + w) * dk + i];
          }
          dq_part[(part * L + t) * dk + i] = sq;
          dk_part[(part * L + t) * dk + i] = sk;
        }
        if (threadIdx.x == 0) {
          acc_t sa = 0, se = 0, sth = 0;
          for (int w = 0; w < kWarps; ++w) {
            sa += scal[0 * kWarps + w];
            se += scal[1 * kWarps + w];
            sth += scal[2 * kWarps + w];
          }
          dal_part[part * L + t] = -sa;  // W_t = (1 - alpha) W_{t-1} + S_t
          deta_part[part * L + t] = se;
          dth_part[part * L + t] = sth;
        }
        __syncthreads();  // rows, scal free for the next token
      }
    }
    // the chunk start state W_{t0-1} is also W_ref of every token of the chunk
    for (int i = r; i < dk; i += kRowLanes) {
      dW[i * kStride + c] += dWr[i * kStride + c];
      dWr[i * kStride + c] = 0;
    }
  }
  if (col)
    for (int i = r; i < dk; i += kRowLanes) {
      dW0[bh * Sz + i * dv + j] = dW[i * kStride + c];
      dS0[bh * Sz + i * dv + j] = dS[i * kStride + c];
    }
}

// ------------------------------------------------------------------------------------------------ host

bool poison() {
  const char* p = std::getenv("HOPE_KERNELS_POISON");
  return p != nullptr && p[0] == '1';
}

// Outputs the kernels must fill completely: NaN-filled under HOPE_KERNELS_POISON=1 (tests), else uninitialised.
Tensor alloc(at::IntArrayRef shape, const at::TensorOptions& opt) {
  return poison() ? at::full(shape, NAN, opt) : at::empty(shape, opt);
}

void check(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha, const Tensor& eta,
           const Tensor& theta, const Tensor& W0, const Tensor& S0, int64_t C) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, L, dk), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), op,
              ": v must be (B, H, L, dv), got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  for (const Tensor* g : {&alpha, &eta, &theta})
    TORCH_CHECK(g->dim() == 3 && g->sizes() == q.sizes().slice(0, 3), op, ": gates must be (B, H, L) = ",
                q.sizes().slice(0, 3), ", got ", g->sizes());
  TORCH_CHECK(W0.dim() == 4 && W0.size(0) == q.size(0) && W0.size(1) == q.size(1) && W0.size(2) == q.size(3) &&
                  W0.size(3) == v.size(3) && S0.sizes() == W0.sizes(),
              op, ": states must be (B, H, dk, dv) = (", q.size(0), ", ", q.size(1), ", ", q.size(3), ", ", v.size(3),
              "), got ", W0.sizes(), " and ", S0.sizes());
  for (const Tensor* x : {&k, &v, &alpha, &eta, &theta, &W0, &S0})
    TORCH_CHECK(x->device() == q.device(), op, ": every tensor must be on ", q.device(), ", got ", x->device());
  TORCH_CHECK(C >= 1, op, ": chunk_size must be >= 1, got ", C);
  TORCH_CHECK(q.size(3) >= 1 && v.size(3) >= 1, op, ": dk, dv must be >= 1, got dk=", q.size(3), ", dv=", v.size(3));
}

// Opt the kernel in to `bytes` of dynamic shared memory; a clear error when the device has less.
void set_smem(const void* kernel, size_t bytes, const char* op, int dk, const char* formula) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, ": dk=", dk, " needs ", bytes, " bytes of shared memory (",
              formula, "), this device allows ", optin, " per block; use a smaller dk (any dv works), or "
              "backend='triton' / 'reference'");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<Tensor, Tensor, Tensor> titans_linear_fwd_cuda(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                          const Tensor& alpha_, const Tensor& eta_,
                                                          const Tensor& theta_, const Tensor& W0_, const Tensor& S0_,
                                                          int64_t C) {
  check("titans_linear_fwd (cuda)", q_, k_, v_, alpha_, eta_, theta_, W0_, S0_, C);
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto acc = acc_type(q_.scalar_type());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto alpha = alpha_.to(acc).contiguous(), eta = eta_.to(acc).contiguous(), theta = theta_.to(acc).contiguous();
  auto W0 = W0_.to(acc).contiguous(), S0 = S0_.to(acc).contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  const int dk = static_cast<int>(q.size(3)), dv = static_cast<int>(v.size(3));
  const int64_t N = (L + C - 1) / C;
  auto opts = q.options().dtype(acc);
  auto o = alloc({B, H, L, dv}, v.options());
  auto Ws = alloc({B, H, N + 1, dk, dv}, opts), Ss = alloc({B, H, N + 1, dk, dv}, opts);
  if (B * H == 0) return {o, Ws, Ss};
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>((dv + kCols - 1) / kCols));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "titans_linear_fwd_cuda", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    auto kernel = titans_fwd_kernel<scalar_t, acc_t>;
    const size_t bytes = smem::titans_linear_fwd(dk, sizeof(acc_t));
    set_smem(reinterpret_cast<const void*>(kernel), bytes, "titans_linear_fwd (cuda)", dk, "3 * dk * 40 * 4");
    kernel<<<grid, kThreads, bytes, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), alpha.data_ptr<acc_t>(),
        eta.data_ptr<acc_t>(), theta.data_ptr<acc_t>(), W0.data_ptr<acc_t>(), S0.data_ptr<acc_t>(),
        o.data_ptr<scalar_t>(), Ws.data_ptr<acc_t>(), Ss.data_ptr<acc_t>(), L, C, N, dk, dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {o, Ws, Ss};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> titans_linear_bwd_cuda(
    const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& alpha_, const Tensor& eta_,
    const Tensor& theta_, const Tensor& Ws_, const Tensor& Ss_, const Tensor& do_, const Tensor& dWT_,
    const Tensor& dST_, int64_t C) {
  check("titans_linear_bwd (cuda)", q_, k_, v_, alpha_, eta_, theta_, dWT_, dST_, C);
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto acc = acc_type(q_.scalar_type());
  const int64_t B = q_.size(0), H = q_.size(1), L = q_.size(2);
  const int dk = static_cast<int>(q_.size(3)), dv = static_cast<int>(v_.size(3));
  const int64_t N = (L + C - 1) / C;
  TORCH_CHECK(Ws_.dim() == 5 && Ws_.size(0) == B && Ws_.size(1) == H && Ws_.size(2) == N + 1 &&
                  Ws_.size(3) == dk && Ws_.size(4) == dv && Ss_.sizes() == Ws_.sizes(),
              "titans_linear_bwd (cuda): Ws, Ss must be (B, H, N+1, dk, dv) with N = ", N, ", got ", Ws_.sizes(),
              " and ", Ss_.sizes());
  TORCH_CHECK(do_.sizes() == v_.sizes(), "titans_linear_bwd (cuda): grad_o must match v ", v_.sizes(), ", got ",
              do_.sizes());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto dout = do_.to(q.scalar_type()).contiguous();
  auto alpha = alpha_.to(acc).contiguous(), eta = eta_.to(acc).contiguous(), theta = theta_.to(acc).contiguous();
  auto Ws = Ws_.to(acc).contiguous(), Ss = Ss_.to(acc).contiguous();
  auto dWT = dWT_.to(acc).contiguous(), dST = dST_.to(acc).contiguous();
  auto opts = q.options().dtype(acc);
  const int64_t ntiles = (dv + kCols - 1) / kCols;
  auto dv_t = alloc({B, H, L, dv}, v.options());
  auto dW0 = alloc({B, H, dk, dv}, opts), dS0 = alloc({B, H, dk, dv}, opts);
  // per column tile partial sums, added up below
  auto dq_part = alloc({B * H, ntiles, L, dk}, opts), dk_part = alloc({B * H, ntiles, L, dk}, opts);
  auto dal_part = alloc({B * H, ntiles, L}, opts), deta_part = alloc({B * H, ntiles, L}, opts);
  auto dth_part = alloc({B * H, ntiles, L}, opts);
  if (B * H > 0) {
    const int64_t Cs = L < 1 ? 1 : (C < L ? C : L);  // the longest chunk (L = 0: the kernel copies dW0 = dWT)
    int64_t R = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(Cs))));
    while (R * R < Cs) ++R;            // guard the float sqrt
    while (R > 1 && (R - 1) * (R - 1) >= Cs) --R;
    const int64_t NS_max = (Cs + R - 1) / R;
    auto scratch = at::empty({B * H * ntiles * (NS_max + R + 1) * 2 * dk * kCols}, opts);
    const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(ntiles));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "titans_linear_bwd_cuda", [&] {
      using acc_t = typename acc_of<scalar_t>::type;
      auto kernel = titans_bwd_kernel<scalar_t, acc_t>;
      const size_t bytes = smem::titans_linear_bwd(dk, sizeof(acc_t));
      set_smem(reinterpret_cast<const void*>(kernel), bytes, "titans_linear_bwd (cuda)", dk,
               "(4 * dk * 40 + 12 * dk + 12) * 4");
      kernel<<<grid, kThreads, bytes, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), alpha.data_ptr<acc_t>(),
          eta.data_ptr<acc_t>(), theta.data_ptr<acc_t>(), Ws.data_ptr<acc_t>(), Ss.data_ptr<acc_t>(),
          dout.data_ptr<scalar_t>(), dWT.data_ptr<acc_t>(), dST.data_ptr<acc_t>(), scratch.data_ptr<acc_t>(),
          dq_part.data_ptr<acc_t>(), dk_part.data_ptr<acc_t>(), dv_t.data_ptr<scalar_t>(), dal_part.data_ptr<acc_t>(),
          deta_part.data_ptr<acc_t>(), dth_part.data_ptr<acc_t>(), dW0.data_ptr<acc_t>(), dS0.data_ptr<acc_t>(), L, C,
          N, R, NS_max, dk, dv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto dq = dq_part.sum(1).view({B, H, L, dk}).to(q_.scalar_type());
  auto dk_t = dk_part.sum(1).view({B, H, L, dk}).to(k_.scalar_type());
  auto dalpha = dal_part.sum(1).view({B, H, L}).to(alpha_.scalar_type());
  auto deta = deta_part.sum(1).view({B, H, L}).to(eta_.scalar_type());
  auto dtheta = dth_part.sum(1).view({B, H, L}).to(theta_.scalar_type());
  return {dq, dk_t, dv_t.to(v_.scalar_type()), dalpha, deta, dtheta, dW0, dS0};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CUDA, m) {
  m.impl("titans_linear_fwd", &titans_linear_fwd_cuda);
  m.impl("titans_linear_bwd", &titans_linear_bwd_cuda);
}
