// Titans linear memory on the CPU: one fused chunk loop per (b, h), forward and backward (csrc/titans_cpu.h has
// the dual block they share with the MLP memory; maths in docs/titans.md).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "titans_cpu.h"

namespace {

using at::Tensor;
using namespace hk_titans;

// ---------------------------------------------------------------------------------------------- linear memory

// Pointers of one (b, h) and the sizes. Forward: state = (W, S) at the start (dk, dv), Ws/Ss = boundary states
// (N+1, dk, dv) written. Backward: Ws/Ss read, dO given, dW/dS = the final state's gradient in, dW0/dS0 out.
template <typename T>
struct LinearHead {
  const T *q, *k, *v, *al, *et, *th;
  T *Ws, *Ss, *o;                        // forward: o written; Ws, Ss written
  const T* dO;                           // backward
  T *dq, *dk, *dv, *dal, *det, *dth, *dW, *dS;
  int64_t L, C, dK, dV;
};

template <typename T>
struct LinearWork {
  Gates<T> g;
  Block<T> s;
  std::vector<T> v[7];
  T *KT, *E, *G, *PS, *PSn, *dG, *dPSp;

  LinearWork(int64_t C, int64_t dk, int64_t dv, bool backward)
      : g(C, backward), s(C, std::max(dk, dv), backward) {
    KT = take(v[0], dk * C), E = take(v[1], C * dv), G = take(v[2], C * dv);
    PS = take(v[3], dk * 2 * dv), PSn = take(v[4], dk * 2 * dv), dG = take(v[5], C * dv);
    dPSp = take(v[6], dk * 2 * dv);
  }
};

// K^T, E = K W - V and G = theta o E of a chunk from its start pair PS = [W | S].
template <int VB, typename T>
HK_INLINE void linear_inner(LinearWork<T>& w, const T* K, const T* V, const T* th, int64_t n, int64_t dk,
                            int64_t dv) {
  transpose(K, dk, w.KT, w.g.C, n, dk);
  zero(w.E, dv, n, dv);
  gemm_acc<VB>(w.E, dv, K, dk, w.PS, 2 * dv, n, dk, dv);
  for (int64_t t = 0; t < n; ++t) {
    const T* vt = V + t * dv;
    T *e = w.E + t * dv, *gt = w.G + t * dv;
#pragma omp simd
    for (int64_t j = 0; j < dv; ++j) e[j] -= vt[j], gt[j] = th[t] * e[j];
  }
}

template <int VB, typename T>
HK_INLINE void linear_fwd_head(LinearWork<T>& w, const LinearHead<T>& h) {
  const int64_t C = h.C, dk = h.dK, dv = h.dV, S = dk * dv;
  join_pair(h.Ws, h.Ss, w.PS, dk, dv);
  for (int64_t s0 = 0, c = 0; s0 < h.L; s0 += C, ++c) {
    const int64_t n = std::min(C, h.L - s0);
    const T *Q = h.q + s0 * dk, *K = h.k + s0 * dk;
    chunk_gates<VB>(w.g, h.al + s0, h.et + s0, n);
    linear_inner<VB>(w, K, h.v + s0 * dv, h.th + s0, n, dk, dv);
    block_read<VB>(w.g, w.s, Q, dk, w.KT, w.G, w.PS, n, dk, dv, h.o + s0 * dv, dv);
    block_end<VB>(w.g, w.s, K, dk, w.G, w.PS, n, dk, dv, w.PSn);
    std::swap(w.PS, w.PSn);
    split_pair(w.PS, h.Ws + (c + 1) * S, h.Ss + (c + 1) * S, dk, dv);
  }
}

template <int VB, typename T>
HK_INLINE void linear_bwd_head(LinearWork<T>& w, const LinearHead<T>& h) {
  const int64_t C = h.C, dk = h.dK, dv = h.dV, S = dk * dv;
  const int64_t N = (h.L + C - 1) / C;
  T *dPS = w.PSn, *dPSp = w.dPSp;   // gradients of the end pair [dW | dS] and of the chunk-start one
  join_pair(h.dW, h.dS, dPS, dk, dv);
  for (int64_t c = N - 1; c >= 0; --c) {
    const int64_t s0 = c * C, n = std::min(C, h.L - s0);
    const T *Q = h.q + s0 * dk, *K = h.k + s0 * dk, *th = h.th + s0;
    join_pair(h.Ws + c * S, h.Ss + c * S, w.PS, dk, dv);
    chunk_gates<VB>(w.g, h.al + s0, h.et + s0, n);
    linear_inner<VB>(w, K, h.v + s0 * dv, th, n, dk, dv);
    block_read<VB>(w.g, w.s, Q, dk, w.KT, w.G, w.PS, n, dk, dv, static_cast<T*>(nullptr), dv);
    T *dq = h.dq + s0 * dk, *dkc = h.dk + s0 * dk;
    block_bwd<VB>(w.g, w.s, Q, dk, K, w.KT, w.G, w.PS, h.dO + s0 * dv, dv, dPS, n, dk, dv, dq, dkc, w.dG, dPSp);
    // G = theta o (K W - V): dE = theta o dG to v, K (through K W) and W
    for (int64_t t = 0; t < n; ++t) {
      T* dg = w.dG + t * dv;
      T* dvt = h.dv + (s0 + t) * dv;
      h.dth[s0 + t] = dot(w.E + t * dv, dg, dv);
#pragma omp simd
      for (int64_t j = 0; j < dv; ++j) dg[j] *= th[t], dvt[j] = -dg[j];
    }
    gemm_acc<VB>(dkc, dk, w.dG, dv, w.s.PT, 2 * dk, n, dv, dk);    // dE W^T (PT's first dk columns are W^T)
    gemm_tn_acc<VB>(dPSp, 2 * dv, K, dk, w.dG, dv, dk, n, dv);   // K^T dE to dW
    gate_bwd(w.g, n, h.dal + s0, h.det + s0);
    std::swap(dPS, dPSp);
  }
  split_pair(dPS, h.dW, h.dS, dk, dv);
}

HK_CLONES(linear_fwd_head, LinearWork, LinearHead)
HK_CLONES(linear_bwd_head, LinearWork, LinearHead)

// ---------------------------------------------------------------------------------------------- ops

void check(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha, const Tensor& eta,
           const Tensor& theta, const Tensor& W0, const Tensor& S0, int64_t C) {
  TORCH_CHECK(q.dim() == 4, "q must be (B, H, L, dk), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "k must match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must be (B, H, L, dv), got ", v.sizes());
  for (const Tensor* g : {&alpha, &eta, &theta})
    TORCH_CHECK(g->dim() == 3 && g->sizes() == q.sizes().slice(0, 3), "gates must be (B, H, L), got ", g->sizes());
  const bool state_ok = W0.dim() == 4 && W0.size(0) == q.size(0) && W0.size(1) == q.size(1) &&
                        W0.size(2) == q.size(3) && W0.size(3) == v.size(3) && S0.sizes() == W0.sizes();
  TORCH_CHECK(state_ok, "W0, S0 must be (B, H, dk, dv) = (", q.size(0), ", ", q.size(1), ", ", q.size(3), ", ",
              v.size(3), "), got ", W0.sizes(), " and ", S0.sizes());
  TORCH_CHECK(C >= 1, "chunk_size must be >= 1, got ", C);
}

// The pointers of (b, h) = bh into the inputs and the boundary states, and the sizes (forward and backward).
template <typename T>
LinearHead<T> head_inputs(int64_t bh, const TokenInputs& in, const Tensor& Ws, const Tensor& Ss, int64_t C) {
  const int64_t L = in.q.size(2), dk = in.q.size(3), dv = in.v.size(3), N = Ws.size(2) - 1;
  LinearHead<T> h{};
  point_at_tokens<T>(h, in, bh);
  h.Ws = Ws.data_ptr<T>() + bh * (N + 1) * dk * dv, h.Ss = Ss.data_ptr<T>() + bh * (N + 1) * dk * dv;
  h.L = L, h.C = C, h.dK = dk, h.dV = dv;
  return h;
}

std::tuple<Tensor, Tensor, Tensor> titans_linear_fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                         const Tensor& alpha_in, const Tensor& eta_in,
                                                         const Tensor& theta_in, const Tensor& W0, const Tensor& S0,
                                                         int64_t C) {
  check(q_in, k_in, v_in, alpha_in, eta_in, theta_in, W0, S0, C);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), dk = q_in.size(3), dv = v_in.size(3);
  const int64_t N = (L + C - 1) / C;
  const TokenInputs in(q_in, k_in, v_in, alpha_in, eta_in, theta_in);
  const auto acc = in.acc;
  const auto opt = in.opt;
  auto W = acc_contig(W0, acc), S = acc_contig(S0, acc);
  auto o = alloc({B, H, L, dv}, opt);
  auto Ws = alloc({B, H, N + 1, dk, dv}, opt), Ss = alloc({B, H, N + 1, dk, dv}, opt);
  Ws.select(2, 0).copy_(W);
  Ss.select(2, 0).copy_(S);
  const int64_t Cw = work_chunk(C, L);
  for_each_head(acc, B * H, [&](auto zero, bool avx2, int64_t begin, int64_t end) {
    using T = decltype(zero);
    LinearWork<T> w(Cw, dk, dv, false);
    for (int64_t bh = begin; bh < end; ++bh) {
      auto h = head_inputs<T>(bh, in, Ws, Ss, Cw);
      h.o = o.data_ptr<T>() + bh * L * dv;
      linear_fwd_head_run<T>(avx2, w, h);
    }
  });
  return {o.to(v_in.scalar_type()), Ws, Ss};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> titans_linear_bwd_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& alpha_in, const Tensor& eta_in,
    const Tensor& theta_in, const Tensor& Ws_in, const Tensor& Ss_in, const Tensor& do_in, const Tensor& dWT,
    const Tensor& dST, int64_t C) {
  check(q_in, k_in, v_in, alpha_in, eta_in, theta_in, dWT, dST, C);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), dk = q_in.size(3), dv = v_in.size(3);
  const int64_t N = (L + C - 1) / C;
  TORCH_CHECK(Ws_in.dim() == 5 && Ws_in.size(0) == B && Ws_in.size(1) == H && Ws_in.size(2) == N + 1 &&
                  Ws_in.size(3) == dk && Ws_in.size(4) == dv && Ss_in.sizes() == Ws_in.sizes(),
              "Ws, Ss must be (B, H, N+1, dk, dv) = (", B, ", ", H, ", ", N + 1, ", ", dk, ", ", dv, "), got ",
              Ws_in.sizes(), " and ", Ss_in.sizes());
  TORCH_CHECK(do_in.sizes() == v_in.sizes(), "do must match v ", v_in.sizes(), ", got ", do_in.sizes());
  const TokenInputs in(q_in, k_in, v_in, alpha_in, eta_in, theta_in);
  const auto acc = in.acc;
  const auto opt = in.opt;
  auto Ws = acc_contig(Ws_in, acc), Ss = acc_contig(Ss_in, acc), dout = acc_contig(do_in, acc);
  auto dq = alloc({B, H, L, dk}, opt), dk_ = alloc({B, H, L, dk}, opt), dv_ = alloc({B, H, L, dv}, opt);
  auto dalpha = alloc({B, H, L}, opt), deta = alloc({B, H, L}, opt), dtheta = alloc({B, H, L}, opt);
  auto dW = acc_contig(dWT, acc).clone(), dS = acc_contig(dST, acc).clone();   // overwritten with dW0, dS0
  const int64_t Cw = work_chunk(C, L);
  for_each_head(acc, B * H, [&](auto zero, bool avx2, int64_t begin, int64_t end) {
    using T = decltype(zero);
    LinearWork<T> w(Cw, dk, dv, true);
    for (int64_t bh = begin; bh < end; ++bh) {
      auto h = head_inputs<T>(bh, in, Ws, Ss, Cw);
      h.dO = dout.data_ptr<T>() + bh * L * dv;
      h.dq = dq.data_ptr<T>() + bh * L * dk, h.dk = dk_.data_ptr<T>() + bh * L * dk;
      h.dv = dv_.data_ptr<T>() + bh * L * dv;
      h.dal = dalpha.data_ptr<T>() + bh * L, h.det = deta.data_ptr<T>() + bh * L;
      h.dth = dtheta.data_ptr<T>() + bh * L;
      h.dW = dW.data_ptr<T>() + bh * dk * dv, h.dS = dS.data_ptr<T>() + bh * dk * dv;
      linear_bwd_head_run<T>(avx2, w, h);
    }
  });
  return {dq.to(q_in.scalar_type()),         dk_.to(k_in.scalar_type()),    dv_.to(v_in.scalar_type()),
          dalpha.to(alpha_in.scalar_type()), deta.to(eta_in.scalar_type()), dtheta.to(theta_in.scalar_type()),
          dW,                                dS};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("titans_linear_fwd", &titans_linear_fwd_cpu);
  m.impl("titans_linear_bwd", &titans_linear_bwd_cpu);
}
