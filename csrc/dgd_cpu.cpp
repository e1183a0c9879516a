// HOPE's delta-gradient-descent memory (DESIGN 4.4), chunked, on the CPU.
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
// Every inner loop runs over a contiguous row (axpy form) or is a short dot product, so the compiler
// vectorises it. Math in float32 (float64 for double inputs); q, k, v, gate gradients come back in their dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

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

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

template <typename T>
inline void axpy(T a, const T* __restrict x, T* __restrict y, int64_t n) {  // y += a x
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// Y (len, n) = X (len, m) Mat (m, n), Mat row-major: each output row is a sum of Mat rows.
template <typename T>
void rows_times(const T* __restrict X, const T* __restrict Mat, T* __restrict Y, int64_t len, int64_t m, int64_t n) {
  for (int64_t t = 0; t < len; ++t) {
    T* y = Y + t * n;
    for (int64_t j = 0; j < n; ++j) y[j] = 0;
    const T* x = X + t * m;
    for (int64_t a = 0; a < m; ++a) axpy(x[a], Mat + a * n, y, n);
  }
}

template <typename T>
void transpose(const T* __restrict src, T* __restrict dst, int64_t rows, int64_t cols) {
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + a] = src[a * cols + j];
}

// Chunk-local terms recomputed by forward and backward; buffers sized for a full chunk of C tokens.
template <typename T>
struct Chunk {
  int64_t C, dk, dv;
  std::vector<T> lg, lgp, c, g, D, DKK, DQK, KM, QM, X;
  T gC = 1;
  Chunk(int64_t C_, int64_t dk_, int64_t dv_)
      : C(C_), dk(dk_), dv(dv_), lg(C_), lgp(C_), c(C_), g(C_), D(C_ * C_), DKK(C_ * C_), DQK(C_ * C_),
        KM(C_ * dv_), QM(C_ * dv_), X(C_ * dv_) {}

  // q, k (len, dk), v (len, dv), al, et (len) of one chunk; M0 (dk, dv). Fills every member; writes o (len, dv)
  // when o != nullptr.
  void run(const T* __restrict q, const T* __restrict k, const T* __restrict v, const T* __restrict al,
           const T* __restrict et, int64_t len, const T* __restrict M0, T* __restrict o) {
    T run_lg = 0;
    for (int64_t t = 0; t < len; ++t) {
      lgp[t] = run_lg;
      run_lg += std::log(al[t]);
      lg[t] = run_lg;
    }
    gC = std::exp(run_lg);
    for (int64_t t = 0; t < len; ++t) {
      c[t] = std::exp(lgp[t]);
      g[t] = std::exp(run_lg - lg[t]);
    }
    for (int64_t t = 0; t < len; ++t) {
      const T* kt = k + t * dk;
      const T* qt = q + t * dk;
      for (int64_t i = 0; i < t; ++i) {
        const T d = std::exp(lgp[t] - lg[i]);
        D[t * C + i] = d;
        DKK[t * C + i] = d * dot(kt, k + i * dk, dk);
        DQK[t * C + i] = d * dot(qt, k + i * dk, dk);
      }
    }
    rows_times(k, M0, KM.data(), len, dk, dv);
    rows_times(q, M0, QM.data(), len, dk, dv);
    for (int64_t t = 0; t < len; ++t) {
      T* x = X.data() + t * dv;
      const T* km = KM.data() + t * dv;
      const T* vt = v + t * dv;
      const T s = 1 + c[t];
#pragma omp simd
      for (int64_t j = 0; j < dv; ++j) x[j] = s * km[j] - vt[j];
      for (int64_t i = 0; i < t; ++i) axpy(-DKK[t * C + i] * et[i], X.data() + i * dv, x, dv);
      if (o != nullptr) {
        T* ot = o + t * dv;
        const T* qm = QM.data() + t * dv;
#pragma omp simd
        for (int64_t j = 0; j < dv; ++j) ot[j] = c[t] * qm[j];
        for (int64_t i = 0; i < t; ++i) axpy(-DQK[t * C + i] * et[i], X.data() + i * dv, ot, dv);
      }
    }
  }

  // M (dk, dv) <- gamma_C M - sum_i eta_i g_i k_i X_i^T (M holds M_0 on entry).
  void end_state(const T* __restrict k, const T* __restrict et, int64_t len, T* __restrict M) const {
    for (int64_t a = 0; a < dk; ++a) {
      T* row = M + a * dv;
#pragma omp simd
      for (int64_t j = 0; j < dv; ++j) row[j] *= gC;
      for (int64_t i = 0; i < len; ++i) axpy(-et[i] * g[i] * k[i * dk + a], X.data() + i * dv, row, dv);
    }
  }
};

template <typename T>
void fwd_kernel(const T* q, const T* k, const T* v, const T* alpha, const T* eta, T* M_all, T* o, T* states,
                int64_t BH, int64_t L, int64_t dk, int64_t dv, int64_t C) {
  const int64_t N = (L + C - 1) / C, S = dk * dv;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    Chunk<T> ch(C, dk, dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      T* M = M_all + bh * S;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t s = n * C, len = std::min(C, L - s);
        const int64_t r = bh * L + s;
        std::copy(M, M + S, states + (bh * N + n) * S);
        ch.run(q + r * dk, k + r * dk, v + r * dv, alpha + r, eta + r, len, M, o + r * dv);
        ch.end_state(k + r * dk, eta + r, len, M);
      }
    }
  });
}

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
  AT_DISPATCH_FLOATING_TYPES(acc, "dgd_chunk_fwd_cpu", [&] {
    fwd_kernel<scalar_t>(qa.data_ptr<scalar_t>(), ka.data_ptr<scalar_t>(), va.data_ptr<scalar_t>(),
                         al.data_ptr<scalar_t>(), et.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(),
                         o.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(), B * H, L, dk, dv, C);
  });
  return {o.to(q.scalar_type()), M, states};
}

template <typename T>
void bwd_kernel(const T* q, const T* k, const T* v, const T* alpha, const T* eta, const T* states, const T* dO,
                const T* dM_in, T* dq, T* dk_out, T* dv_out, T* dalpha, T* deta, T* dM0, int64_t BH, int64_t L,
                int64_t dk, int64_t dv, int64_t C) {
  const int64_t N = (L + C - 1) / C, S = dk * dv;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    Chunk<T> ch(C, dk, dv);
    std::vector<T> dMC(S), dMn(S), M0T(S), dMCT(S), KdM(C * dv), dR(C * dv), E(C * C), GA(C * C), GP(C * C),
        dlg(C), dlgp(C), wdot(C), dcol(C);
    for (int64_t bh = begin; bh < end; ++bh) {
      std::copy(dM_in + bh * S, dM_in + (bh + 1) * S, dMC.data());
      for (int64_t n = N - 1; n >= 0; --n) {
        const int64_t s = n * C, len = std::min(C, L - s);
        const int64_t r = bh * L + s;
        const T *qc = q + r * dk, *kc = k + r * dk, *vc = v + r * dv, *al = alpha + r, *et = eta + r;
        const T* dOc = dO + r * dv;
        const T* M0 = states + (bh * N + n) * S;
        T *dqc = dq + r * dk, *dkc = dk_out + r * dk, *dvc = dv_out + r * dv;
        ch.run(qc, kc, vc, al, et, len, M0, nullptr);
        const T* X = ch.X.data();
        const T* D = ch.D.data();
        // KdM_t = k_t^T dM_C; then dR_i = -eta_i g_i KdM_i - sum_{t>i} (P[t, i] dO_t + A[t, i] dR_t)
        rows_times(kc, dMC.data(), KdM.data(), len, dk, dv);
        for (int64_t i = len - 1; i >= 0; --i) {
          T* dr = dR.data() + i * dv;
          const T w = -et[i] * ch.g[i];
          const T* kd = KdM.data() + i * dv;
#pragma omp simd
          for (int64_t j = 0; j < dv; ++j) dr[j] = w * kd[j];
          for (int64_t t = i + 1; t < len; ++t) {
            axpy(-ch.DQK[t * C + i] * et[i], dOc + t * dv, dr, dv);
            axpy(-ch.DKK[t * C + i] * et[i], dR.data() + t * dv, dr, dv);
          }
        }
        // C x C terms: dA = -dR X^T, dP = -dO X^T (strictly lower); GA = dA D eta_col, GP = dP D eta_col,
        // E = dA D KK + dP D QK (its column sums go to eta; eta_col * E = dA A + dP P goes to the gates)
        for (int64_t t = 0; t < len; ++t) dlgp[t] = 0;
        for (int64_t i = 0; i < len; ++i) dcol[i] = 0;
        for (int64_t t = 0; t < len; ++t) {
          for (int64_t i = 0; i < t; ++i) {
            const T dA = -dot(dR.data() + t * dv, X + i * dv, dv);
            const T dP = -dot(dOc + t * dv, X + i * dv, dv);
            const T d = D[t * C + i];
            GA[t * C + i] = dA * d * et[i];
            GP[t * C + i] = dP * d * et[i];
            const T e = dA * ch.DKK[t * C + i] + dP * ch.DQK[t * C + i];
            dcol[i] += e;
            dlgp[t] += e * et[i];
          }
        }
        transpose(M0, M0T.data(), dk, dv);
        transpose(dMC.data(), dMCT.data(), dk, dv);
        T dgg_sum = 0;
        for (int64_t t = 0; t < len; ++t) {
          const T* dr = dR.data() + t * dv;
          const T* x = X + t * dv;
          const T* dot_ = dOc + t * dv;
          T* dkt = dkc + t * dk;
          T* dqt = dqc + t * dk;
          for (int64_t a = 0; a < dk; ++a) dkt[a] = 0, dqt[a] = 0;
          const T s = 1 + ch.c[t], w = -et[t] * ch.g[t];
          for (int64_t j = 0; j < dv; ++j) {
            axpy(s * dr[j], M0T.data() + j * dk, dkt, dk);
            axpy(w * x[j], dMCT.data() + j * dk, dkt, dk);
            axpy(ch.c[t] * dot_[j], M0T.data() + j * dk, dqt, dk);
          }
          for (int64_t i = 0; i < t; ++i) {
            axpy(GA[t * C + i], kc + i * dk, dkt, dk);
            axpy(GP[t * C + i], kc + i * dk, dqt, dk);
          }
          for (int64_t i = t + 1; i < len; ++i) {
            axpy(GA[i * C + t], kc + i * dk, dkt, dk);
            axpy(GP[i * C + t], qc + i * dk, dkt, dk);
          }
          T* dvt = dvc + t * dv;
#pragma omp simd
          for (int64_t j = 0; j < dv; ++j) dvt[j] = -dr[j];
          wdot[t] = -dot(x, KdM.data() + t * dv, dv);
          const T dc = dot(ch.QM.data() + t * dv, dot_, dv) + dot(ch.KM.data() + t * dv, dr, dv);
          const T dgg = et[t] * wdot[t] * ch.g[t];
          deta[r + t] = ch.g[t] * wdot[t] + dcol[t];
          dlgp[t] += dc * ch.c[t];
          dlg[t] = -et[t] * dcol[t] - dgg;
          dgg_sum += dgg;
        }
        dlg[len - 1] += dgg_sum + dot(M0, dMC.data(), S) * ch.gC;
        // dlog alpha_j = sum_{t >= j} dlg_t + sum_{t > j} dlgp_t
        T run = 0;
        for (int64_t j = len - 1; j >= 0; --j) {
          run += dlg[j];
          dalpha[r + j] = run / al[j];
          run += dlgp[j];
        }
        // dM_n = gamma_C dM_C + sum_t c_t q_t dO_t^T + (1 + c_t) k_t dR_t^T
        for (int64_t a = 0; a < dk; ++a) {
          T* row = dMn.data() + a * dv;
          const T* src = dMC.data() + a * dv;
#pragma omp simd
          for (int64_t j = 0; j < dv; ++j) row[j] = ch.gC * src[j];
          for (int64_t t = 0; t < len; ++t) {
            axpy(ch.c[t] * qc[t * dk + a], dOc + t * dv, row, dv);
            axpy((1 + ch.c[t]) * kc[t * dk + a], dR.data() + t * dv, row, dv);
          }
        }
        std::swap(dMC, dMn);
      }
      std::copy(dMC.begin(), dMC.end(), dM0 + bh * S);
    }
  });
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
  auto Ms = states_.to(acc).contiguous(), dOa = do_.to(acc).contiguous(), dMa = dM.to(acc).contiguous();
  auto dq = at::empty({B, H, L, dk}, opts), dk_ = at::empty({B, H, L, dk}, opts), dv_ = at::empty({B, H, L, dv}, opts);
  auto dalpha = at::empty({B, H, L}, opts), deta = at::empty({B, H, L}, opts), dM0 = at::empty({B, H, dk, dv}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "dgd_chunk_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(qa.data_ptr<scalar_t>(), ka.data_ptr<scalar_t>(), va.data_ptr<scalar_t>(),
                         al.data_ptr<scalar_t>(), et.data_ptr<scalar_t>(), Ms.data_ptr<scalar_t>(),
                         dOa.data_ptr<scalar_t>(), dMa.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                         dk_.data_ptr<scalar_t>(), dv_.data_ptr<scalar_t>(), dalpha.data_ptr<scalar_t>(),
                         deta.data_ptr<scalar_t>(), dM0.data_ptr<scalar_t>(), B * H, L, dk, dv, C);
  });
  return {dq.to(q_.scalar_type()),         dk_.to(k_.scalar_type()),        dv_.to(v_.scalar_type()),
          dalpha.to(alpha_.scalar_type()), deta.to(eta_.scalar_type()),     dM0};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("dgd_chunk_fwd", &dgd_chunk_fwd_cpu);
  m.impl("dgd_chunk_bwd", &dgd_chunk_bwd_cpu);
}
