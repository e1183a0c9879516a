// Titans MLP memory M(x) = x + silu(x W1) W2 on the CPU: one fused chunk loop per (b, h), forward and backward.
// Layer 1 (X = Q, A = K, G1 = theta o GZ) reads Zq, layer 2 (X = silu(Zq), A = silu(K W1), G2 = theta o E) the
// output; the backward runs layer 2, layer 1, then the chain through the inner gradient (csrc/titans_cpu.h,
// docs/titans.md).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "titans_cpu.h"

namespace {

using at::Tensor;
using namespace hk_titans;

// ---------------------------------------------------------------------------------------------- MLP memory

// One (b, h) of the MLP memory, D = dk = dv, hidden width dh. Layer 1's pair [W1 | S1] (D, 2dh), layer 2's
// [W2 | S2] (dh, 2D); boundary states W1s.. (N+1, ., .).
template <typename T>
struct MlpHead {
  const T *q, *k, *v, *al, *et, *th;
  T *W1s, *W2s, *S1s, *S2s, *o;
  const T* dO;
  T *dq, *dk, *dv, *dal, *det, *dth, *dW1, *dW2, *dS1, *dS2;
  int64_t L, C, D, dh;
};

template <typename T>
struct MlpWork {
  Gates<T> g;
  Block<T> s1, s2;
  std::vector<T> v[26];
  // SZ = sigmoid(Z), SQ = sigmoid(Zq): kept for silu' and silu'' in the backward
  T *KT, *Z, *SZ, *Hk, *SP, *E, *Y, *GZ, *G1, *G2, *Zq, *SQ, *Hq, *HkT, *PS1, *PS2, *PSn1, *PSn2, *W2T, *W1T;
  T *dHq = nullptr, *dHk = nullptr, *dG1 = nullptr, *dG2 = nullptr, *dY = nullptr, *dZ = nullptr;

  MlpWork(int64_t C, int64_t D, int64_t dh, bool backward)
      : g(C, backward), s1(C, std::max(D, dh), backward), s2(C, std::max(D, dh), backward) {
    KT = take(v[0], D * C), Z = take(v[1], C * dh), Hk = take(v[2], C * dh), SP = take(v[3], C * dh);
    E = take(v[4], C * D), Y = take(v[5], C * dh), GZ = take(v[6], C * dh), G1 = take(v[7], C * dh);
    G2 = take(v[8], C * D), Zq = take(v[9], C * dh), Hq = take(v[10], C * dh), HkT = take(v[11], dh * C);
    PS1 = take(v[12], D * 2 * dh), PS2 = take(v[13], dh * 2 * D), PSn1 = take(v[14], D * 2 * dh);
    PSn2 = take(v[15], dh * 2 * D), W2T = take(v[16], D * dh), W1T = take(v[17], dh * D);
    SZ = take(v[24], C * dh), SQ = take(v[25], C * dh);
    if (backward) {
      dHq = take(v[18], C * dh), dHk = take(v[19], C * dh), dG1 = take(v[20], C * dh), dG2 = take(v[21], C * D);
      dY = take(v[22], C * dh), dZ = take(v[23], C * dh);
    }
  }
};

// e^x for float without a libm call, written once for scalars and for vectors (V): 2^k e^r with k = round(x / ln 2)
// (by adding and subtracting 1.5 * 2^23), r = x - k ln 2 (ln 2 in two parts, |r| <= ln 2 / 2) and e^r by its Taylor
// polynomial to degree 7 (truncation below 5e-9); x clamped to [-87, 88], so 2^k stays a normal float. Relative
// error about 1e-7. In place (a vector argument by value would change the calling convention without AVX).
template <typename V, typename I>
HK_INLINE void exp_f32(V& x) {
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  x = x < lo ? lo : x;   // NaN stays NaN
  x = x > hi ? hi : x;
  const V k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  V p = r * (1.0f / 5040) + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I bits;
  if constexpr (std::is_same_v<V, float>) {
    bits = (static_cast<int32_t>(k) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(k, I) + 127) << 23;
  }
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  x = p * scale;
}

// s[i] = 1 / (1 + e^-z[i]), i < n: float through exp_f32, in VB-byte vectors; double through std::exp.
template <int VB>
HK_INLINE void sigmoid_n(const float* __restrict z, float* __restrict s, int64_t n) {
  int64_t i = 0;
#if defined(__GNUC__)
  using V = typename Vec<float, VB>::type;
  using I = typename Vec<int32_t, VB>::type;
  constexpr int64_t W = VB / sizeof(float);
  for (; i + W <= n; i += W) {
    V x;
    std::memcpy(&x, z + i, sizeof(V));
    x = -x;
    exp_f32<V, I>(x);
    x = 1.0f / (1.0f + x);
    std::memcpy(s + i, &x, sizeof(V));
  }
#endif
  for (; i < n; ++i) {
    float x = -z[i];
    exp_f32<float, int32_t>(x);
    s[i] = 1.0f / (1.0f + x);
  }
}

template <int VB>
HK_INLINE void sigmoid_n(const double* __restrict z, double* __restrict s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = 1.0 / (1.0 + std::exp(-z[i]));
}

// The inside of an MLP chunk from the start pairs PS1, PS2: Z = K W1, Hk = silu(Z), SP = silu'(Z),
// E = K + Hk W2 - V, Y = E W2^T, GZ = Y o SP, G1 = theta o GZ, G2 = theta o E; layer 1's read Zq, Hq = silu(Zq);
// layer 2's read written to O (when O != nullptr: O = Q + read).
template <int VB, typename T>
HK_INLINE void mlp_inner(MlpWork<T>& w, const T* Q, const T* K, const T* V, const T* th, int64_t n, int64_t D,
                         int64_t dh, T* O) {
  const int64_t C = w.g.C;
  transpose(K, D, w.KT, C, n, D);
  zero(w.Z, dh, n, dh);
  gemm_acc<VB>(w.Z, dh, K, D, w.PS1, 2 * dh, n, D, dh);
  sigmoid_n<VB>(w.Z, w.SZ, n * dh);
#pragma omp simd
  for (int64_t i = 0; i < n * dh; ++i) {
    const T z = w.Z[i], s = w.SZ[i];
    w.Hk[i] = z * s;
    w.SP[i] = s * (1 + z * (1 - s));
  }
  for (int64_t t = 0; t < n; ++t) {
    const T *kt = K + t * D, *vt = V + t * D;
    T* e = w.E + t * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) e[j] = kt[j] - vt[j];
  }
  gemm_acc<VB>(w.E, D, w.Hk, dh, w.PS2, 2 * D, n, dh, D);
  transpose(w.PS2, 2 * D, w.W2T, dh, dh, D);                  // W2^T (D, dh)
  zero(w.Y, dh, n, dh);
  gemm_acc<VB>(w.Y, dh, w.E, D, w.W2T, dh, n, D, dh);
  for (int64_t t = 0; t < n; ++t) {
    const T tt = th[t];
    for (int64_t j = 0; j < dh; ++j) {
      const int64_t i = t * dh + j;
      w.GZ[i] = w.Y[i] * w.SP[i];
      w.G1[i] = tt * w.GZ[i];
    }
    for (int64_t j = 0; j < D; ++j) w.G2[t * D + j] = tt * w.E[t * D + j];
  }
  block_read<VB>(w.g, w.s1, Q, D, w.KT, w.G1, w.PS1, n, D, dh, w.Zq, dh);
  sigmoid_n<VB>(w.Zq, w.SQ, n * dh);
#pragma omp simd
  for (int64_t i = 0; i < n * dh; ++i) w.Hq[i] = w.Zq[i] * w.SQ[i];
  transpose(w.Hk, dh, w.HkT, C, n, dh);
  block_read<VB>(w.g, w.s2, w.Hq, dh, w.HkT, w.G2, w.PS2, n, dh, D, O, D);
  if (O == nullptr) return;
  for (int64_t i = 0; i < n * D; ++i) O[i] += Q[i];
}

template <int VB, typename T>
HK_INLINE void mlp_fwd_head(MlpWork<T>& w, const MlpHead<T>& h) {
  const int64_t C = h.C, D = h.D, dh = h.dh, S = D * dh;
  join_pair(h.W1s, h.S1s, w.PS1, D, dh);
  join_pair(h.W2s, h.S2s, w.PS2, dh, D);
  for (int64_t s0 = 0, c = 0; s0 < h.L; s0 += C, ++c) {
    const int64_t n = std::min(C, h.L - s0);
    chunk_gates<VB>(w.g, h.al + s0, h.et + s0, n);
    mlp_inner<VB>(w, h.q + s0 * D, h.k + s0 * D, h.v + s0 * D, h.th + s0, n, D, dh, h.o + s0 * D);
    block_end<VB>(w.g, w.s1, h.k + s0 * D, D, w.G1, w.PS1, n, D, dh, w.PSn1);
    block_end<VB>(w.g, w.s2, w.Hk, dh, w.G2, w.PS2, n, dh, D, w.PSn2);
    std::swap(w.PS1, w.PSn1);
    std::swap(w.PS2, w.PSn2);
    split_pair(w.PS1, h.W1s + (c + 1) * S, h.S1s + (c + 1) * S, D, dh);
    split_pair(w.PS2, h.W2s + (c + 1) * S, h.S2s + (c + 1) * S, dh, D);
  }
}

template <int VB, typename T>
HK_INLINE void mlp_bwd_head(MlpWork<T>& w, const MlpHead<T>& h) {
  const int64_t C = h.C, D = h.D, dh = h.dh, S = D * dh;
  const int64_t N = (h.L + C - 1) / C;
  // carried gradients of the end pairs [dW1 | dS1], [dW2 | dS2], and the chunk-start ones being formed
  std::vector<T> buf(4 * S * 2, T(0));
  T *dPS1 = buf.data(), *dPS2 = dPS1 + 2 * S, *dPS1p = dPS2 + 2 * S, *dPS2p = dPS1p + 2 * S;
  join_pair(h.dW1, h.dS1, dPS1, D, dh);
  join_pair(h.dW2, h.dS2, dPS2, dh, D);
  for (int64_t c = N - 1; c >= 0; --c) {
    const int64_t s0 = c * C, n = std::min(C, h.L - s0);
    const T *Q = h.q + s0 * D, *K = h.k + s0 * D, *th = h.th + s0, *dO = h.dO + s0 * D;
    join_pair(h.W1s + c * S, h.S1s + c * S, w.PS1, D, dh);
    join_pair(h.W2s + c * S, h.S2s + c * S, w.PS2, dh, D);
    chunk_gates<VB>(w.g, h.al + s0, h.et + s0, n);
    mlp_inner<VB>(w, Q, K, h.v + s0 * D, th, n, D, dh, static_cast<T*>(nullptr));
    T *dq = h.dq + s0 * D, *dkc = h.dk + s0 * D, *dvc = h.dv + s0 * D;
    // layer 2 (reads Hq, writes Hk), then layer 1 (reads Q, writes K) with dR = dHq o silu'(Zq)
    block_bwd<VB>(w.g, w.s2, w.Hq, dh, w.Hk, w.HkT, w.G2, w.PS2, dO, D, dPS2, n, dh, D, w.dHq, w.dHk, w.dG2, dPS2p);
#pragma omp simd
    for (int64_t i = 0; i < n * dh; ++i) {
      const T z = w.Zq[i], s = w.SQ[i];
      w.dHq[i] *= s * (1 + z * (1 - s));
    }
    block_bwd<VB>(w.g, w.s1, Q, D, K, w.KT, w.G1, w.PS1, w.dHq, dh, dPS1, n, D, dh, dq, dkc, w.dG1, dPS1p);
    for (int64_t i = 0; i < n * D; ++i) dq[i] += dO[i];
    // through G1 = theta o GZ, G2 = theta o E, GZ = Y o silu'(Z), Y = E W2^T, E = K + Hk W2 - V, Hk = silu(Z), Z = K W1
    for (int64_t t = 0; t < n; ++t) {
      const T tt = th[t];
      h.dth[s0 + t] = dot(w.dG1 + t * dh, w.GZ + t * dh, dh) + dot(w.dG2 + t * D, w.E + t * D, D);
#pragma omp simd
      for (int64_t j = 0; j < dh; ++j) {
        const int64_t i = t * dh + j;
        const T z = w.Z[i], s = w.SZ[i];
        const T dgz = tt * w.dG1[i];
        w.dY[i] = dgz * w.SP[i];
        w.dZ[i] = dgz * w.Y[i] * (s * (1 - s) * (2 + z * (1 - 2 * s)));
      }
      T* de = w.dG2 + t * D;   // becomes dE
      for (int64_t j = 0; j < D; ++j) de[j] *= tt;
    }
    T* dE = w.dG2;
    gemm_acc<VB>(dE, D, w.dY, dh, w.PS2, 2 * D, n, dh, D);             // dE += dY W2
    // dW2 += dY^T E + Hk^T dE
    gemm_tn_acc<VB>(dPS2p, 2 * D, w.dY, dh, w.E, D, dh, n, D);
    gemm_tn_acc<VB>(dPS2p, 2 * D, w.Hk, dh, dE, D, dh, n, D);
    gemm_acc<VB>(w.dHk, dh, dE, D, w.W2T, dh, n, D, dh);               // dHk += dE W2^T
    for (int64_t i = 0; i < n * dh; ++i) w.dZ[i] += w.dHk[i] * w.SP[i];
    transpose(w.PS1, 2 * dh, w.W1T, D, D, dh);                          // W1^T (dh, D)
    for (int64_t i = 0; i < n * D; ++i) dkc[i] += dE[i], dvc[i] = -dE[i];
    gemm_acc<VB>(dkc, D, w.dZ, dh, w.W1T, D, n, dh, D);                 // dK += dZ W1^T
    gemm_tn_acc<VB>(dPS1p, 2 * dh, K, D, w.dZ, dh, D, n, dh);          // dW1 += K^T dZ
    gate_bwd(w.g, n, h.dal + s0, h.det + s0);
    std::swap(dPS1, dPS1p);
    std::swap(dPS2, dPS2p);
  }
  split_pair(dPS1, h.dW1, h.dS1, D, dh);
  split_pair(dPS2, h.dW2, h.dS2, dh, D);
}

HK_CLONES(mlp_fwd_head, MlpWork, MlpHead)
HK_CLONES(mlp_bwd_head, MlpWork, MlpHead)

// ---------------------------------------------------------------------------------------------- ops

void check_mlp(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha, const Tensor& eta,
               const Tensor& theta, const Tensor& W1, const Tensor& W2, const Tensor& S1, const Tensor& S2,
               int64_t C) {
  TORCH_CHECK(q.dim() == 4, "q must be (B, H, L, D), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "k, v must match q ", q.sizes(), " (the MLP memory "
              "is residual: dk == dv), got ", k.sizes(), " and ", v.sizes());
  for (const Tensor* g : {&alpha, &eta, &theta})
    TORCH_CHECK(g->dim() == 3 && g->sizes() == q.sizes().slice(0, 3), "gates must be (B, H, L), got ", g->sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t dh = W1.dim() == 4 ? W1.size(3) : -1;
  const bool ok = W1.dim() == 4 && W1.size(0) == B && W1.size(1) == H && W1.size(2) == D && S1.sizes() == W1.sizes() &&
                  W2.dim() == 4 && W2.size(0) == B && W2.size(1) == H && W2.size(2) == dh && W2.size(3) == D &&
                  S2.sizes() == W2.sizes();
  TORCH_CHECK(ok, "W1, S1 must be (B, H, D, dh) and W2, S2 (B, H, dh, D) with (B, H, D) = (", B, ", ", H, ", ", D,
              "), got ", W1.sizes(), ", ", S1.sizes(), ", ", W2.sizes(), ", ", S2.sizes());
  TORCH_CHECK(C >= 1, "chunk_size must be >= 1, got ", C);
}

// The pointers of (b, h) = bh into the inputs and the boundary states, and the sizes (forward and backward).
template <typename T>
MlpHead<T> head_inputs(int64_t bh, const TokenInputs& in, const Tensor& W1s, const Tensor& W2s, const Tensor& S1s,
                       const Tensor& S2s, int64_t C) {
  const int64_t L = in.q.size(2), D = in.q.size(3), dh = W1s.size(4), st = bh * W1s.size(2) * D * dh;
  MlpHead<T> h{};
  point_at_tokens<T>(h, in, bh);
  h.W1s = W1s.data_ptr<T>() + st, h.W2s = W2s.data_ptr<T>() + st;
  h.S1s = S1s.data_ptr<T>() + st, h.S2s = S2s.data_ptr<T>() + st;
  h.L = L, h.C = C, h.D = D, h.dh = dh;
  return h;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> titans_mlp_fwd_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& alpha_in, const Tensor& eta_in,
    const Tensor& theta_in, const Tensor& W1_in, const Tensor& W2_in, const Tensor& S1_in, const Tensor& S2_in,
    int64_t C) {
  check_mlp(q_in, k_in, v_in, alpha_in, eta_in, theta_in, W1_in, W2_in, S1_in, S2_in, C);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), D = q_in.size(3), dh = W1_in.size(3);
  const int64_t N = (L + C - 1) / C;
  const TokenInputs in(q_in, k_in, v_in, alpha_in, eta_in, theta_in);
  const auto acc = in.acc;
  const auto opt = in.opt;
  auto o = alloc({B, H, L, D}, opt);
  auto W1s = alloc({B, H, N + 1, D, dh}, opt), W2s = alloc({B, H, N + 1, dh, D}, opt);
  auto S1s = alloc({B, H, N + 1, D, dh}, opt), S2s = alloc({B, H, N + 1, dh, D}, opt);
  W1s.select(2, 0).copy_(W1_in);
  W2s.select(2, 0).copy_(W2_in);
  S1s.select(2, 0).copy_(S1_in);
  S2s.select(2, 0).copy_(S2_in);
  const int64_t Cw = work_chunk(C, L);
  for_each_head(acc, B * H, [&](auto zero, bool avx2, int64_t begin, int64_t end) {
    using T = decltype(zero);
    MlpWork<T> w(Cw, D, dh, false);
    for (int64_t bh = begin; bh < end; ++bh) {
      auto h = head_inputs<T>(bh, in, W1s, W2s, S1s, S2s, Cw);
      h.o = o.data_ptr<T>() + bh * L * D;
      mlp_fwd_head_run<T>(avx2, w, h);
    }
  });
  return {o.to(v_in.scalar_type()), W1s, W2s, S1s, S2s};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> titans_mlp_bwd_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& alpha_in, const Tensor& eta_in,
    const Tensor& theta_in, const Tensor& W1s_in, const Tensor& W2s_in, const Tensor& S1s_in, const Tensor& S2s_in,
    const Tensor& do_in, const Tensor& dW1T, const Tensor& dW2T, const Tensor& dS1T, const Tensor& dS2T, int64_t C) {
  check_mlp(q_in, k_in, v_in, alpha_in, eta_in, theta_in, dW1T, dW2T, dS1T, dS2T, C);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), D = q_in.size(3), dh = dW1T.size(3);
  const int64_t N = (L + C - 1) / C, S = D * dh;
  const std::vector<int64_t> s1{B, H, N + 1, D, dh}, s2{B, H, N + 1, dh, D};
  TORCH_CHECK(W1s_in.sizes() == at::IntArrayRef(s1) && S1s_in.sizes() == at::IntArrayRef(s1) &&
                  W2s_in.sizes() == at::IntArrayRef(s2) && S2s_in.sizes() == at::IntArrayRef(s2),
              "W1s, S1s must be (B, H, N+1, D, dh) = ", at::IntArrayRef(s1), " and W2s, S2s (B, H, N+1, dh, D) = ",
              at::IntArrayRef(s2), ", got ", W1s_in.sizes(), ", ", S1s_in.sizes(), ", ", W2s_in.sizes(), ", ",
              S2s_in.sizes());
  TORCH_CHECK(do_in.sizes() == v_in.sizes(), "do must match v ", v_in.sizes(), ", got ", do_in.sizes());
  const TokenInputs in(q_in, k_in, v_in, alpha_in, eta_in, theta_in);
  const auto acc = in.acc;
  const auto opt = in.opt;
  auto W1s = acc_contig(W1s_in, acc), W2s = acc_contig(W2s_in, acc), S1s = acc_contig(S1s_in, acc);
  auto S2s = acc_contig(S2s_in, acc), dout = acc_contig(do_in, acc);
  auto dq = alloc({B, H, L, D}, opt), dk_ = alloc({B, H, L, D}, opt), dv_ = alloc({B, H, L, D}, opt);
  auto dalpha = alloc({B, H, L}, opt), deta = alloc({B, H, L}, opt), dtheta = alloc({B, H, L}, opt);
  auto dW1 = acc_contig(dW1T, acc).clone(), dW2 = acc_contig(dW2T, acc).clone();   // overwritten with the
  auto dS1 = acc_contig(dS1T, acc).clone(), dS2 = acc_contig(dS2T, acc).clone();   // initial state's gradients
  const int64_t Cw = work_chunk(C, L);
  for_each_head(acc, B * H, [&](auto zero, bool avx2, int64_t begin, int64_t end) {
    using T = decltype(zero);
    MlpWork<T> w(Cw, D, dh, true);
    for (int64_t bh = begin; bh < end; ++bh) {
      auto h = head_inputs<T>(bh, in, W1s, W2s, S1s, S2s, Cw);
      h.dO = dout.data_ptr<T>() + bh * L * D;
      h.dq = dq.data_ptr<T>() + bh * L * D, h.dk = dk_.data_ptr<T>() + bh * L * D;
      h.dv = dv_.data_ptr<T>() + bh * L * D;
      h.dal = dalpha.data_ptr<T>() + bh * L, h.det = deta.data_ptr<T>() + bh * L;
      h.dth = dtheta.data_ptr<T>() + bh * L;
      h.dW1 = dW1.data_ptr<T>() + bh * S, h.dW2 = dW2.data_ptr<T>() + bh * S;
      h.dS1 = dS1.data_ptr<T>() + bh * S, h.dS2 = dS2.data_ptr<T>() + bh * S;
      mlp_bwd_head_run<T>(avx2, w, h);
    }
  });
  return {dq.to(q_in.scalar_type()),         dk_.to(k_in.scalar_type()),    dv_.to(v_in.scalar_type()),
          dalpha.to(alpha_in.scalar_type()), deta.to(eta_in.scalar_type()), dtheta.to(theta_in.scalar_type()),
          dW1, dW2, dS1, dS2};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("titans_mlp_fwd", &titans_mlp_fwd_cpu);
  m.impl("titans_mlp_bwd", &titans_mlp_bwd_cpu);
}
