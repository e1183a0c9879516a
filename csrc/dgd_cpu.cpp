// HOPE's delta-gradient-descent memory (docs/design.md#dgd-memory), chunked, on the CPU.
//
// One task per (b, h) (at::parallel_for over B*H); each task walks its chunks serially on raw pointers, so a
// chunk's q, k, v and the (dk, dv) state are touched while they sit in cache. Per chunk of len <= C tokens
// (docs/dgd.md), with c_t = gamma_{t-1}, g_i = gamma_C / gamma_i, D[t, i] = gamma_{t-1} / gamma_i (i < t):
//   A[t, i] = D eta_i k_t.k_i,  P[t, i] = D eta_i q_t.k_i                          (strictly lower, C x C)
//   X_t = (1 + c_t) k_t^T M_0 - v_t - sum_{i<t} A[t, i] X_i                      (UT solve = forward substitution)
//   o_t = c_t q_t^T M_0 - sum_{i<t} P[t, i] X_i
//   M_C = gamma_C M_0 - sum_i eta_i g_i k_i X_i^T
// The forward saves the chunk-start states M_n. The backward walks the chunks in reverse: it recomputes the
// chunk from M_n, forms dR = (I + A)^{-T} dX by back substitution fused with dX = -W dM_C - P^T dO, then
// every chunk-local gradient and dM_n = gamma_C dM_C + Q^T diag(c) dO + K^T diag(1 + c) dR.
// A last chunk shorter than C is a chunk of len tokens (the padded tokens of the reference contribute nothing).
//
// Every product is a small row-major matrix product (gemm_acc, csrc/cpu_matmul.h: register tiles of 4 rows x 2
// vectors, GCC/clang vector extension; triangular operands skip their zero parts); the forward substitution runs 16
// rows at a time (one product against all earlier rows, then serially inside the block). The per-head kernels
// are compiled twice, for the baseline ISA (16-byte vectors) and for AVX2 + FMA (32-byte vectors), picked at run
// time (x86 with GCC or clang; HOPE_KERNELS_NO_AVX2=1 forces the baseline build).
// Math in float32 (float64 for double inputs); q, k, v, gate gradients come back in their dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_matmul.h"

namespace {

using at::Tensor;
using namespace hk_cpu;  // gemm_acc, accum_rows, dot, transpose, zero, use_avx2 (csrc/cpu_matmul.h)

at::ScalarType acc_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha, const Tensor& eta,
                  int64_t chunk_size) {
  TORCH_CHECK(q.dim() == 4, "q must be (B, H, L, dk), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "k must match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must be (B, H, L, dv) with (B, H, L) of q ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(alpha.dim() == 3 && alpha.sizes() == q.sizes().slice(0, 3), "alpha must be (B, H, L), got ",
              alpha.sizes());
  TORCH_CHECK(eta.sizes() == alpha.sizes(), "eta must be (B, H, L), got ", eta.sizes());
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
}


// Scratch of one task, sized for a full chunk of C tokens. Forward terms first, backward-only ones after.
template <typename T>
struct Work {
  int64_t C, dk, dv;
  std::vector<T> buf;
  // nA = -A, nP = -P (row t: i < t, zero elsewhere); KT = K^T (dk, C); WT[a, i] = -eta_i g_i k_i[a]
  T *lg, *lgp, *c, *g, *D, *DKK, *DQK, *nA, *nP, *KT, *KM, *QM, *X, *WT;
  T *dMC, *dMn, *MT, *KdM, *dR, *XT, *nAT, *nPT, *dA, *dP, *GS, *GP, *GPT, *CK, *QcT, *KcT, *dlg, *dlgp, *dcol;
  T gC = 1;

  Work(int64_t C_, int64_t dk_, int64_t dv_, bool backward) : C(C_), dk(dk_), dv(dv_) {
    const int64_t S = dk * dv, CC = C * C;
    std::vector<std::pair<T**, int64_t>> parts = {
        {&lg, C}, {&lgp, C}, {&c, C}, {&g, C}, {&D, CC}, {&DKK, CC}, {&DQK, CC}, {&nA, CC}, {&nP, CC},
        {&KT, dk * C}, {&KM, C * dv}, {&QM, C * dv}, {&X, C * dv}, {&WT, dk * C}};
    if (backward) {
      parts.insert(parts.end(), {{&dMC, S}, {&dMn, S}, {&MT, 2 * S}, {&KdM, C * dv}, {&dR, C * dv}, {&XT, dv * C},
                                 {&nAT, CC}, {&nPT, CC}, {&dA, CC}, {&dP, CC}, {&GS, CC}, {&GP, CC}, {&GPT, CC},
                                 {&CK, C * 2 * dv}, {&QcT, dk * C}, {&KcT, dk * C}, {&dlg, C}, {&dlgp, C},
                                 {&dcol, C}});
    }
    int64_t total = 0;
    for (auto& p : parts) total += p.second;
    buf.assign(total, T(0));
    T* ptr = buf.data();
    for (auto& p : parts) {
      *p.first = ptr;
      ptr += p.second;
    }
  }
};

constexpr int64_t kSolveBlock = 16;  // forward substitution: off-diagonal blocks as one product each

// Recompute one chunk from its start state M0: gates, D, D k k^T, D q k^T, K M0, Q M0 and X; writes o (len, dv)
// when o != nullptr. q, k (len, dk), v (len, dv), al, et (len) point at the chunk's first token.
template <int VB, typename T>
HK_INLINE void chunk_forward(Work<T>& w, const T* __restrict q, const T* __restrict k, const T* __restrict v,
                             const T* __restrict al, const T* __restrict et, int64_t len, const T* __restrict M0,
                             T* __restrict o) {
  const int64_t C = w.C, dk = w.dk, dv = w.dv;
  T run = 0;
  for (int64_t t = 0; t < len; ++t) {
    w.lgp[t] = run;
    run += std::log(al[t]);
    w.lg[t] = run;
  }
  w.gC = std::exp(run);
  for (int64_t t = 0; t < len; ++t) {
    w.c[t] = std::exp(w.lgp[t]);
    w.g[t] = std::exp(run - w.lg[t]);
  }
  transpose(k, dk, w.KT, C, len, dk);
  zero(w.DKK, C, len, len);
  zero(w.DQK, C, len, len);
  gemm_acc<VB>(w.DKK, C, k, dk, w.KT, C, len, dk, len, /*lower_n=*/true);
  gemm_acc<VB>(w.DQK, C, q, dk, w.KT, C, len, dk, len, /*lower_n=*/true);
  // D[t, i] = exp(lgp_t - lg_i). Across 16-column blocks it factors as exp(lgp_t - m) exp(m - lg_i) with m = lg at
  // the block's last column (both exponents <= 0), so only the diagonal blocks take one exp per entry.
  for (int64_t j0 = 0; j0 < len; j0 += kSolveBlock) {
    const int64_t j1 = std::min(len, j0 + kSolveBlock);
    const T m = w.lg[j1 - 1];
    T colf[kSolveBlock];
    for (int64_t i = j0; i < j1; ++i) colf[i - j0] = std::exp(m - w.lg[i]);
    for (int64_t t = j0; t < j1; ++t)
      for (int64_t i = j0; i < t; ++i) w.D[t * C + i] = std::exp(w.lgp[t] - w.lg[i]);
    for (int64_t t = j1; t < len; ++t) {
      const T rowf = std::exp(w.lgp[t] - m);
      for (int64_t i = j0; i < j1; ++i) w.D[t * C + i] = rowf * colf[i - j0];
    }
  }
  for (int64_t t = 0; t < len; ++t) {
    T *Dr = w.D + t * C, *kk = w.DKK + t * C, *qk = w.DQK + t * C, *nA = w.nA + t * C, *nP = w.nP + t * C;
    for (int64_t i = 0; i < t; ++i) {
      const T d = Dr[i];
      kk[i] *= d;
      qk[i] *= d;
      nA[i] = -kk[i] * et[i];
      nP[i] = -qk[i] * et[i];
    }
    std::fill(nA + t, nA + len, T(0));
    std::fill(nP + t, nP + len, T(0));
  }
  zero(w.KM, dv, len, dv);
  zero(w.QM, dv, len, dv);
  gemm_acc<VB>(w.KM, dv, k, dk, M0, dv, len, dk, dv);
  gemm_acc<VB>(w.QM, dv, q, dk, M0, dv, len, dk, dv);
  for (int64_t t = 0; t < len; ++t) {
    const T s = 1 + w.c[t];
    const T *km = w.KM + t * dv, *vt = v + t * dv;
    T* x = w.X + t * dv;
#pragma omp simd
    for (int64_t j = 0; j < dv; ++j) x[j] = s * km[j] - vt[j];
  }
  // X_t += sum_{i<t} nA[t, i] X_i: the block's rows against all earlier blocks, then serially inside the block
  for (int64_t t0 = 0; t0 < len; t0 += kSolveBlock) {
    const int64_t b = std::min(kSolveBlock, len - t0);
    gemm_acc<VB>(w.X + t0 * dv, dv, w.nA + t0 * C, C, w.X, dv, b, t0, dv);
    for (int64_t t = t0 + 1; t < t0 + b; ++t)
      accum_rows(w.X + t * dv, w.nA + t * C + t0, w.X + t0 * dv, dv, t - t0, dv);
  }
  if (o != nullptr) {
    for (int64_t t = 0; t < len; ++t) {
      const T* qm = w.QM + t * dv;
      T* ot = o + t * dv;
#pragma omp simd
      for (int64_t j = 0; j < dv; ++j) ot[j] = w.c[t] * qm[j];
    }
    gemm_acc<VB>(o, dv, w.nP, C, w.X, dv, len, len, dv, false, /*lower_p=*/true);
  }
}

// One (b, h): all chunks in order; M (dk, dv) holds the initial state on entry and the final state on exit.
template <int VB, typename T>
HK_INLINE void fwd_head_body(Work<T>& w, const T* q, const T* k, const T* v, const T* al, const T* et, T* M, T* o,
                             T* states, int64_t L, int64_t step) {
  const int64_t C = w.C, dk = w.dk, dv = w.dv, S = dk * dv;
  for (int64_t s = 0, n = 0; s < L; s += step, ++n) {
    const int64_t len = std::min(step, L - s);
    std::copy(M, M + S, states + n * S);
    chunk_forward<VB>(w, q + s * dk, k + s * dk, v + s * dv, al + s, et + s, len, M, o + s * dv);
    // M <- gamma_C M - sum_i eta_i g_i k_i X_i^T
    for (int64_t a = 0; a < dk; ++a)
      for (int64_t i = 0; i < len; ++i) w.WT[a * C + i] = -et[s + i] * w.g[i] * w.KT[a * C + i];
    for (int64_t j = 0; j < S; ++j) M[j] *= w.gC;
    gemm_acc<VB>(M, dv, w.WT, C, w.X, dv, dk, len, dv);
  }
}

// One (b, h), chunks in reverse. dM (dk, dv) holds the final-state gradient on entry and dM_0 on exit.
template <int VB, typename T>
HK_INLINE void bwd_head_body(Work<T>& w, const T* q, const T* k, const T* v, const T* al, const T* et,
                             const T* states, const T* dO, T* dM, T* dq, T* dk_, T* dv_, T* dalpha, T* deta,
                             int64_t L, int64_t step) {
  const int64_t C = w.C, dk = w.dk, dv = w.dv, S = dk * dv;
  const int64_t N = (L + step - 1) / step;
  std::copy(dM, dM + S, w.dMC);
  for (int64_t n = N - 1; n >= 0; --n) {
    const int64_t s = n * step, len = std::min(step, L - s);
    const T *qc = q + s * dk, *kc = k + s * dk, *e = et + s, *dOc = dO + s * dv, *M0 = states + n * S;
    chunk_forward<VB>(w, qc, kc, v + s * dv, al + s, e, len, M0, static_cast<T*>(nullptr));
    const T *X = w.X, *dMC = w.dMC;
    T* dR = w.dR;
    transpose(w.nA, C, w.nAT, C, len, len);
    transpose(w.nP, C, w.nPT, C, len, len);
    // dR = -diag(eta g) K dM_C - P^T dO, then (I + A^T) dR = that, by back substitution
    zero(w.KdM, dv, len, dv);
    gemm_acc<VB>(w.KdM, dv, kc, dk, dMC, dv, len, dk, dv);
    for (int64_t i = 0; i < len; ++i) {
      const T wi = -e[i] * w.g[i];
      const T* kd = w.KdM + i * dv;
      T* dr = dR + i * dv;
#pragma omp simd
      for (int64_t j = 0; j < dv; ++j) dr[j] = wi * kd[j];
    }
    gemm_acc<VB>(dR, dv, w.nPT, C, dOc, dv, len, len, dv, false, false, /*upper_p=*/true);
    for (int64_t i = len - 2; i >= 0; --i)
      accum_rows(dR + i * dv, w.nAT + i * C + i + 1, dR + (i + 1) * dv, dv, len - i - 1, dv);
    // C x C terms: dA = -dR X^T, dP = -dO X^T (i < t); GA = dA D eta_i, GP = dP D eta_i;
    // E = dA D KK + dP D QK: its column sums go to eta, and eta_i E[t, i] = dA A + dP P to the gates.
    transpose(X, dv, w.XT, C, len, dv);
    zero(w.dA, C, len, len);
    zero(w.dP, C, len, len);
    gemm_acc<VB>(w.dA, C, dR, dv, w.XT, C, len, dv, len, /*lower_n=*/true);
    gemm_acc<VB>(w.dP, C, dOc, dv, w.XT, C, len, dv, len, /*lower_n=*/true);
    for (int64_t t = 0; t < len; ++t) w.dcol[t] = 0;
    for (int64_t t = 0; t < len; ++t) {
      T rowsum = 0;
      T *GS = w.GS + t * C, *GP = w.GP + t * C, *GPT = w.GPT + t * C;
      for (int64_t i = 0; i < t; ++i) {
        const T dA = -w.dA[t * C + i], dP = -w.dP[t * C + i];
        const T de = w.D[t * C + i] * e[i];
        GS[i] = w.GS[i * C + t] = dA * de;
        GP[i] = w.GPT[i * C + t] = dP * de;
        const T E = dA * w.DKK[t * C + i] + dP * w.DQK[t * C + i];
        w.dcol[i] += E;
        rowsum += E * e[i];
      }
      w.dlgp[t] = rowsum;
      GS[t] = 0;
      std::fill(GP + t, GP + len, T(0));
      std::fill(GPT, GPT + t + 1, T(0));
    }
    // dK = [(1 + c) dR, -eta g X] [M0^T; dM_C^T] + GS K + GP^T Q;  dQ = c dO M0^T + GP K
    transpose(M0, dv, w.MT, dk, dk, dv);
    transpose(dMC, dv, w.MT + S, dk, dk, dv);
    T* dkc = dk_ + s * dk;
    T* dqc = dq + s * dk;
    for (int64_t t = 0; t < len; ++t) {
      const T sc = 1 + w.c[t], wt = -e[t] * w.g[t];
      const T *dr = dR + t * dv, *x = X + t * dv;
      T* ck = w.CK + t * 2 * dv;
      for (int64_t j = 0; j < dv; ++j) ck[j] = sc * dr[j], ck[dv + j] = wt * x[j];
    }
    zero(dkc, dk, len, dk);
    zero(dqc, dk, len, dk);
    gemm_acc<VB>(dkc, dk, w.CK, 2 * dv, w.MT, dk, len, 2 * dv, dk);
    gemm_acc<VB>(dkc, dk, w.GS, C, kc, dk, len, len, dk);
    gemm_acc<VB>(dkc, dk, w.GPT, C, qc, dk, len, len, dk, false, false, /*upper_p=*/true);
    for (int64_t t = 0; t < len; ++t) {
      const T* dot_ = dOc + t * dv;
      T* ck = w.CK + t * dv;
      for (int64_t j = 0; j < dv; ++j) ck[j] = w.c[t] * dot_[j];
    }
    gemm_acc<VB>(dqc, dk, w.CK, dv, w.MT, dk, len, dv, dk);
    gemm_acc<VB>(dqc, dk, w.GP, C, kc, dk, len, len, dk, false, /*lower_p=*/true);
    T dgg_sum = 0;
    for (int64_t t = 0; t < len; ++t) {
      const T *dr = dR + t * dv, *x = X + t * dv;
      T* dvt = dv_ + (s + t) * dv;
#pragma omp simd
      for (int64_t j = 0; j < dv; ++j) dvt[j] = -dr[j];
      const T wdot = -dot(x, w.KdM + t * dv, dv);
      const T dc = dot(w.QM + t * dv, dOc + t * dv, dv) + dot(w.KM + t * dv, dr, dv);
      const T dgg = e[t] * wdot * w.g[t];
      deta[s + t] = w.g[t] * wdot + w.dcol[t];
      w.dlgp[t] += dc * w.c[t];
      w.dlg[t] = -e[t] * w.dcol[t] - dgg;
      dgg_sum += dgg;
    }
    w.dlg[len - 1] += dgg_sum + dot(M0, dMC, S) * w.gC;
    // dlog alpha_j = sum_{t >= j} dlg_t + sum_{t > j} dlgp_t
    T run = 0;
    for (int64_t j = len - 1; j >= 0; --j) {
      run += w.dlg[j];
      dalpha[s + j] = run / al[s + j];
      run += w.dlgp[j];
    }
    // dM_n = gamma_C dM_C + sum_t c_t q_t dO_t^T + (1 + c_t) k_t dR_t^T
    for (int64_t t = 0; t < len; ++t)
      for (int64_t a = 0; a < dk; ++a)
        w.QcT[a * C + t] = w.c[t] * qc[t * dk + a], w.KcT[a * C + t] = (1 + w.c[t]) * kc[t * dk + a];
    for (int64_t j = 0; j < S; ++j) w.dMn[j] = w.gC * dMC[j];
    gemm_acc<VB>(w.dMn, dv, w.QcT, C, dOc, dv, dk, len, dv);
    gemm_acc<VB>(w.dMn, dv, w.KcT, C, dR, dv, dk, len, dv);
    std::swap(w.dMC, w.dMn);
  }
  std::copy(w.dMC, w.dMC + S, dM);
}

#define HK_FWD_PARAMS                                                                                       \
  Work<T>&w, const T *q, const T *k, const T *v, const T *al, const T *et, T *M, T *o, T *states, int64_t L, \
      int64_t step
#define HK_FWD_ARGS w, q, k, v, al, et, M, o, states, L, step
#define HK_BWD_PARAMS                                                                                          \
  Work<T>&w, const T *q, const T *k, const T *v, const T *al, const T *et, const T *states, const T *dO, T *dM, \
      T *dq, T *dk, T *dv, T *dalpha, T *deta, int64_t L, int64_t step
#define HK_BWD_ARGS w, q, k, v, al, et, states, dO, dM, dq, dk, dv, dalpha, deta, L, step

HK_ISA_CLONES(fwd_head, fwd_head_body, HK_FWD_PARAMS, HK_FWD_ARGS)
HK_ISA_CLONES(bwd_head, bwd_head_body, HK_BWD_PARAMS, HK_BWD_ARGS)

std::tuple<Tensor, Tensor, Tensor> dgd_chunk_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& alpha, const Tensor& eta,
                                                     const c10::optional<Tensor>& initial_state, int64_t C) {
  check_inputs(q, k, v, alpha, eta, C);
  const auto acc = acc_type(q);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t N = (L + C - 1) / C;
  auto opts = q.options().dtype(acc);
  auto qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous(), va = v.to(acc).contiguous();
  auto al = alpha.to(acc).contiguous(), et = eta.to(acc).contiguous();
  Tensor M = initial_state.has_value() ? initial_state->to(acc).contiguous().clone() : at::zeros({B, H, dk, dv}, opts);
  auto states = at::empty({B, H, N, dk, dv}, opts);
  auto o = at::empty({B, H, L, dv}, opts);
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(acc, "dgd_chunk_fwd_cpu", [&] {
    using T = scalar_t;
    const T *pq = qa.data_ptr<T>(), *pk = ka.data_ptr<T>(), *pv = va.data_ptr<T>();
    const T *pa = al.data_ptr<T>(), *pe = et.data_ptr<T>();
    T *pM = M.data_ptr<T>(), *po = o.data_ptr<T>(), *ps = states.data_ptr<T>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      Work<T> w(std::min(C, L), dk, dv, false);  // no chunk holds more than L tokens
      for (int64_t bh = begin; bh < end; ++bh)
        fwd_head<T>(avx2, w, pq + bh * L * dk, pk + bh * L * dk, pv + bh * L * dv, pa + bh * L, pe + bh * L,
                    pM + bh * dk * dv, po + bh * L * dv, ps + bh * N * dk * dv, L, C);
    });
  });
  return {o.to(q.scalar_type()), M, states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dgd_chunk_bwd_cpu(
    const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& alpha_, const Tensor& eta_,
    const Tensor& states_, const Tensor& do_, const Tensor& dM, int64_t C) {
  check_inputs(q_, k_, v_, alpha_, eta_, C);
  const auto acc = acc_type(q_);
  const int64_t B = q_.size(0), H = q_.size(1), L = q_.size(2), dk = q_.size(3), dv = v_.size(3);
  const int64_t N = (L + C - 1) / C;
  TORCH_CHECK(states_.dim() == 5 && states_.size(0) == B && states_.size(1) == H && states_.size(2) == N &&
                  states_.size(3) == dk && states_.size(4) == dv,
              "states must be (B, H, N, dk, dv) = (", B, ", ", H, ", ", N, ", ", dk, ", ", dv, "), got ",
              states_.sizes());
  TORCH_CHECK(do_.sizes() == v_.sizes(), "do must be (B, H, L, dv) like v ", v_.sizes(), ", got ", do_.sizes());
  TORCH_CHECK(dM.dim() == 4 && dM.size(0) == B && dM.size(1) == H && dM.size(2) == dk && dM.size(3) == dv,
              "dM must be (B, H, dk, dv), got ", dM.sizes());
  auto opts = q_.options().dtype(acc);
  auto qa = q_.to(acc).contiguous(), ka = k_.to(acc).contiguous(), va = v_.to(acc).contiguous();
  auto al = alpha_.to(acc).contiguous(), et = eta_.to(acc).contiguous();
  auto Ms = states_.to(acc).contiguous(), dOa = do_.to(acc).contiguous();
  auto dM0 = dM.to(acc).contiguous().clone();  // overwritten per head with dM_0
  auto dq = at::empty({B, H, L, dk}, opts), dk_ = at::empty({B, H, L, dk}, opts), dv_ = at::empty({B, H, L, dv}, opts);
  auto dalpha = at::empty({B, H, L}, opts), deta = at::empty({B, H, L}, opts);
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(acc, "dgd_chunk_bwd_cpu", [&] {
    using T = scalar_t;
    const T *pq = qa.data_ptr<T>(), *pk = ka.data_ptr<T>(), *pv = va.data_ptr<T>();
    const T *pa = al.data_ptr<T>(), *pe = et.data_ptr<T>(), *ps = Ms.data_ptr<T>(), *pdo = dOa.data_ptr<T>();
    T *pdM = dM0.data_ptr<T>(), *pdq = dq.data_ptr<T>(), *pdk = dk_.data_ptr<T>(), *pdv = dv_.data_ptr<T>();
    T *pda = dalpha.data_ptr<T>(), *pde = deta.data_ptr<T>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      Work<T> w(std::min(C, L), dk, dv, true);
      for (int64_t bh = begin; bh < end; ++bh)
        bwd_head<T>(avx2, w, pq + bh * L * dk, pk + bh * L * dk, pv + bh * L * dv, pa + bh * L, pe + bh * L,
                    ps + bh * N * dk * dv, pdo + bh * L * dv, pdM + bh * dk * dv, pdq + bh * L * dk,
                    pdk + bh * L * dk, pdv + bh * L * dv, pda + bh * L, pde + bh * L, L, C);
    });
  });
  return {dq.to(q_.scalar_type()),         dk_.to(k_.scalar_type()),    dv_.to(v_.scalar_type()),
          dalpha.to(alpha_.scalar_type()), deta.to(eta_.scalar_type()), dM0};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("dgd_chunk_fwd", &dgd_chunk_fwd_cpu);
  m.impl("dgd_chunk_bwd", &dgd_chunk_bwd_cpu);
}
