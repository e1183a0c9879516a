// HOPE's delta-gradient-descent memory (DESIGN 4.4), chunked, on the CPU with ATen matrix products.
//
// Per chunk of C tokens (docs/dgd.md): A = strict_tril(D * K K^T) diag(eta), P = strict_tril(D * Q K^T) diag(eta),
// U = (I + A)^{-1} diag(1 + c) K, TV = (I + A)^{-1} V, W = diag(eta * g) K. Everything that does not depend on
// the state is computed for all chunks in one batched call; the serial loop over chunks only carries the state:
//   X_n = U_n M_n - TV_n,  M_{n+1} = gamma_C M_n - W_n^T X_n;  then O = diag(c) Q M_n - P X_n for all chunks.
// Forward returns the chunk-start states M_n (saved for backward). Backward recomputes the chunk-local
// quantities, runs one reverse loop for dM and dX, and then forms every other gradient chunk-parallel.
// Math in float32 (float64 for double inputs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

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

// (B, H, L, d) -> (B, H, N, C, d), padded with `value`; (B, H, L) gates -> (B, H, N, C).
Tensor chunked(const Tensor& x, int64_t C, int64_t N, double value, at::ScalarType acc) {
  auto y = x.to(acc);
  const int64_t L = x.size(2);
  if (N * C != L) {
    if (x.dim() == 4) y = at::constant_pad_nd(y, {0, 0, 0, N * C - L}, value);
    else y = at::constant_pad_nd(y, {0, N * C - L}, value);
  }
  if (x.dim() == 4) return y.reshape({x.size(0), x.size(1), N, C, x.size(3)});
  return y.reshape({x.size(0), x.size(1), N, C});
}

Tensor unchunk(const Tensor& x, int64_t L) {  // (B, H, N, C, ...) -> (B, H, L, ...)
  std::vector<int64_t> shape{x.size(0), x.size(1), x.size(2) * x.size(3)};
  for (int64_t d = 4; d < x.dim(); ++d) shape.push_back(x.size(d));
  return x.reshape(shape).narrow(2, 0, L);
}

struct ChunkTensors {
  Tensor q, k, v, alpha, eta;  // (B, H, N, C, .)
  Tensor c, g, gC, D;          // decays: c_t = gamma_{t-1}, g_i = gamma_C / gamma_i, D[t, i] = gamma_{t-1} / gamma_i
  Tensor KK, QK, A, P, I_A, U, TV, W, Qc;
};

ChunkTensors prepare(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& alpha_, const Tensor& eta_,
                     int64_t C) {
  const auto acc = acc_type(q_);
  const int64_t L = q_.size(2);
  const int64_t N = (L + C - 1) / C;
  ChunkTensors t;
  t.q = chunked(q_, C, N, 0.0, acc);
  t.k = chunked(k_, C, N, 0.0, acc);
  t.v = chunked(v_, C, N, 0.0, acc);
  t.alpha = chunked(alpha_, C, N, 1.0, acc);  // padded tokens: alpha 1, eta 0 leave the state untouched
  t.eta = chunked(eta_, C, N, 0.0, acc);
  auto la = t.alpha.log();
  auto lg = la.cumsum(-1);
  auto lgp = lg - la;
  auto opts = q_.options().dtype(acc);
  auto strict = at::ones({C, C}, opts.dtype(at::kBool)).tril(-1);
  auto last = lg.narrow(-1, C - 1, 1);
  t.c = lgp.exp();
  t.g = (last - lg).exp();
  t.gC = last.squeeze(-1).exp();
  t.D = (lgp.unsqueeze(-1) - lg.unsqueeze(-2)).masked_fill(strict.logical_not(), -INFINITY).exp();
  auto kT = t.k.transpose(-1, -2);
  t.KK = at::matmul(t.k, kT);
  t.QK = at::matmul(t.q, kT);
  auto e_col = t.eta.unsqueeze(-2);
  t.A = t.D * t.KK * e_col;
  t.P = t.D * t.QK * e_col;
  t.I_A = t.A + at::eye(C, opts);
  t.U = at::linalg_solve_triangular(t.I_A, (1 + t.c).unsqueeze(-1) * t.k, /*upper=*/false, /*left=*/true,
                                    /*unitriangular=*/true);
  t.TV = at::linalg_solve_triangular(t.I_A, t.v, false, true, true);
  t.W = t.k * (t.eta * t.g).unsqueeze(-1);
  t.Qc = t.q * t.c.unsqueeze(-1);
  return t;
}

std::tuple<Tensor, Tensor, Tensor> dgd_chunk_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& alpha, const Tensor& eta,
                                                     const c10::optional<Tensor>& initial_state, int64_t C) {
  check_inputs(q, k, v, alpha, eta, C);
  const auto acc = acc_type(q);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), dk = q.size(3), dv = v.size(3);
  auto t = prepare(q, k, v, alpha, eta, C);
  const int64_t N = t.q.size(2);
  auto opts = q.options().dtype(acc);
  Tensor M = initial_state.has_value() ? initial_state->to(acc).contiguous() : at::zeros({B, H, dk, dv}, opts);
  auto states = at::empty({B, H, N, dk, dv}, opts);
  auto X = at::empty({B, H, N, C, dv}, opts);
  auto WT = t.W.transpose(-1, -2);
  for (int64_t n = 0; n < N; ++n) {
    states.select(2, n).copy_(M);
    auto Xn = X.select(2, n);
    at::matmul_out(Xn, t.U.select(2, n), M);
    Xn.sub_(t.TV.select(2, n));
    M = at::matmul(WT.select(2, n), Xn).neg_().add_(M * t.gC.select(2, n).view({B, H, 1, 1}));
  }
  auto o = at::matmul(t.Qc, states) - at::matmul(t.P, X);
  return {unchunk(o, L).to(q.scalar_type()), M, states};
}

Tensor rev_cumsum(const Tensor& x) { return x.flip(-1).cumsum(-1).flip(-1); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dgd_chunk_bwd_cpu(
    const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& alpha_, const Tensor& eta_,
    const Tensor& states_, const Tensor& do_, const Tensor& dM, int64_t C) {
  check_inputs(q_, k_, v_, alpha_, eta_, C);
  const auto acc = acc_type(q_);
  const int64_t B = q_.size(0), H = q_.size(1), L = q_.size(2), dv = v_.size(3);
  auto t = prepare(q_, k_, v_, alpha_, eta_, C);
  const int64_t N = t.q.size(2);
  TORCH_CHECK(states_.dim() == 5 && states_.size(2) == N, "states must be (B, H, N, dk, dv) with N = ", N,
              ", got ", states_.sizes());
  auto Ms = states_.to(acc);
  auto dO = chunked(do_, C, N, 0.0, acc);
  auto X = at::matmul(t.U, Ms) - t.TV;
  // reverse loop over chunks: dM_end[n] (gradient of chunk n's end state) and dX_n
  auto dM_end = at::empty_like(Ms);
  auto dX = at::empty_like(X);
  auto PT = t.P.transpose(-1, -2);
  auto UT = t.U.transpose(-1, -2);
  // dM_n = gamma_C dM_{n+1} + (diag(c) Q)^T dO_n + U^T dX_n
  auto QcT_dO = at::matmul(t.Qc.transpose(-1, -2), dO);
  auto PT_dO = at::matmul(PT, dO);
  Tensor dMC = dM.to(acc);
  for (int64_t n = N - 1; n >= 0; --n) {
    dM_end.select(2, n).copy_(dMC);
    auto dXn = dX.select(2, n);
    at::matmul_out(dXn, t.W.select(2, n), dMC);
    dXn.add_(PT_dO.select(2, n)).neg_();
    dMC = dMC * t.gC.select(2, n).view({B, H, 1, 1}) + QcT_dO.select(2, n) + at::matmul(UT.select(2, n), dXn);
  }
  auto MsT = Ms.transpose(-1, -2);
  auto XT = X.transpose(-1, -2);
  auto strict = at::ones({C, C}, Ms.options().dtype(at::kBool)).tril(-1);
  auto dR = at::linalg_solve_triangular(t.I_A.transpose(-1, -2), dX, /*upper=*/true, true, true);
  auto dA = at::matmul(dR, XT).neg_().mul_(strict);
  auto dP = at::matmul(dO, XT).neg_().mul_(strict);
  auto dW = at::matmul(X, dM_end.transpose(-1, -2)).neg_();
  auto e_col = t.eta.unsqueeze(-2);
  auto GA = dA * t.D * e_col;
  auto GP = dP * t.D * e_col;
  auto dk = (1 + t.c).unsqueeze(-1) * at::matmul(dR, MsT) + (t.eta * t.g).unsqueeze(-1) * dW +
            at::matmul(GA + GA.transpose(-1, -2), t.k) + at::matmul(GP.transpose(-1, -2), t.q);
  auto dq = t.c.unsqueeze(-1) * at::matmul(dO, MsT) + at::matmul(GP, t.k);
  auto dc = (at::matmul(t.q, Ms) * dO).sum(-1) + (at::matmul(t.k, Ms) * dR).sum(-1);
  auto wdot = (dW * t.k).sum(-1);
  auto deta = t.g * wdot + (dA * t.D * t.KK).sum(-2) + (dP * t.D * t.QK).sum(-2);
  auto dgg = t.eta * wdot * t.g;
  auto dgC = (Ms * dM_end).sum(at::IntArrayRef{-1, -2});
  auto dDD = dA * t.A + dP * t.P;
  auto dlgp = dDD.sum(-1) + dc * t.c;
  auto dlg = -dDD.sum(-2) - dgg;
  dlg.select(-1, C - 1).add_(dgg.sum(-1) + dgC * t.gC);
  auto dla = rev_cumsum(dlg) + rev_cumsum(dlgp) - dlgp;
  auto dalpha = dla / t.alpha;
  (void)dv;
  return {unchunk(dq, L).to(q_.scalar_type()),        unchunk(dk, L).to(k_.scalar_type()),
          unchunk(dR.neg(), L).to(v_.scalar_type()),  unchunk(dalpha, L).to(alpha_.scalar_type()),
          unchunk(deta, L).to(eta_.scalar_type()),    dMC};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("dgd_chunk_fwd", &dgd_chunk_fwd_cpu);
  m.impl("dgd_chunk_bwd", &dgd_chunk_bwd_cpu);
}
