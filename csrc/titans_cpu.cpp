// Chunk-parallel Titans linear memory on the CPU (DESIGN 4.3; derivation in docs/titans.md).
// Per chunk of C tokens, batched over (B*H) with ATen matrix products: the gate coefficients (masked
// cumulative products, exact for gates at 0), E = K W0 - V, the read O = b*(Q W0) + f*(Q S0) - (Cm o Q K^T)(theta E)
// and the end state (W, S). The forward keeps only the chunk-boundary states Ws, Ss (B, H, N+1, dk, dv);
// the backward walks the chunks in reverse and recomputes each chunk's inside from its boundary state.
// Everything runs in float32 (float64 for float64 inputs); q, k, v gradients come back in their dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

namespace {

using at::Tensor;

bool poison() {
  const char* p = std::getenv("HOPE_KERNELS_POISON");
  return p != nullptr && p[0] == '1';
}

Tensor alloc(at::IntArrayRef shape, const at::TensorOptions& opt) {
  return poison() ? at::full(shape, NAN, opt) : at::empty(shape, opt);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Tensor T(const Tensor& x) { return x.transpose(-1, -2); }

// D[..., t, j] = prod_{l=j+1..t} a_l for j <= t, else 0.
Tensor segment_products(const Tensor& a) {
  const int64_t n = a.size(-1);
  auto lower = at::ones({n, n}, a.options().dtype(at::kBool)).tril(-1);
  auto A = at::where(lower, a.unsqueeze(-1).expand({a.size(0), n, n}), at::ones({}, a.options()));
  return A.cumprod(-2).tril();
}

struct Gates {
  Tensor a, et, Db, Dm, b, m, f, Cm;
};

Gates chunk_gates(const Tensor& alpha, const Tensor& eta) {
  Gates g;
  g.a = 1 - alpha;
  g.et = eta;
  g.Db = segment_products(g.a);
  g.Dm = segment_products(eta);
  g.b = g.a.cumprod(-1);
  g.m = eta.cumprod(-1);
  g.f = at::matmul(g.Db, g.m.unsqueeze(-1)).squeeze(-1);
  g.Cm = at::matmul(g.Db, g.Dm);
  return g;
}

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

std::tuple<Tensor, Tensor, Tensor> titans_linear_fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                         const Tensor& alpha_in, const Tensor& eta_in,
                                                         const Tensor& theta_in, const Tensor& W0, const Tensor& S0,
                                                         int64_t C) {
  check(q_in, k_in, v_in, alpha_in, eta_in, theta_in, W0, S0, C);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), dk = q_in.size(3), dv = v_in.size(3);
  const int64_t BH = B * H, N = (L + C - 1) / C;
  const auto acc = acc_type(q_in.scalar_type());
  auto opt = q_in.options().dtype(acc);
  auto q = q_in.to(acc).reshape({BH, L, dk}), k = k_in.to(acc).reshape({BH, L, dk});
  auto v = v_in.to(acc).reshape({BH, L, dv});
  auto alpha = alpha_in.to(acc).reshape({BH, L}), eta = eta_in.to(acc).reshape({BH, L});
  auto theta = theta_in.to(acc).reshape({BH, L});
  auto o = alloc({BH, L, dv}, opt);
  auto Ws = alloc({BH, N + 1, dk, dv}, opt), Ss = alloc({BH, N + 1, dk, dv}, opt);
  auto W = W0.to(acc).reshape({BH, dk, dv}), S = S0.to(acc).reshape({BH, dk, dv});
  Ws.select(1, 0).copy_(W);
  Ss.select(1, 0).copy_(S);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t s = n * C, len = std::min(C, L - s);
    auto Q = q.narrow(1, s, len), K = k.narrow(1, s, len), V = v.narrow(1, s, len);
    auto g = chunk_gates(alpha.narrow(1, s, len), eta.narrow(1, s, len));
    auto G = theta.narrow(1, s, len).unsqueeze(-1) * (at::matmul(K, W) - V);
    auto P = g.Cm * at::matmul(Q, T(K));
    auto O = g.b.unsqueeze(-1) * at::matmul(Q, W) + g.f.unsqueeze(-1) * at::matmul(Q, S) - at::matmul(P, G);
    o.narrow(1, s, len).copy_(O);
    auto cC = g.Cm.select(1, len - 1).unsqueeze(-1), r = g.Dm.select(1, len - 1).unsqueeze(-1);
    auto bC = g.b.select(1, len - 1).view({BH, 1, 1}), fC = g.f.select(1, len - 1).view({BH, 1, 1});
    auto mC = g.m.select(1, len - 1).view({BH, 1, 1});
    auto Wn = bC * W + fC * S - at::matmul(T(K), cC * G);
    auto Sn = mC * S - at::matmul(T(K), r * G);
    W = Wn;
    S = Sn;
    Ws.select(1, n + 1).copy_(W);
    Ss.select(1, n + 1).copy_(S);
  }
  return {o.view({B, H, L, dv}).to(v_in.scalar_type()), Ws.view({B, H, N + 1, dk, dv}),
          Ss.view({B, H, N + 1, dk, dv})};
}

// For D[t, j] = exp(g_t - g_j): the gradient to g (row sums minus column sums of dD o D).
Tensor log_grad(const Tensor& dD, const Tensor& D) {
  auto X = dD * D;
  return X.sum(-1) - X.sum(-2);
}

Tensor rev_cumsum(const Tensor& x) { return x.flip(-1).cumsum(-1).flip(-1); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> titans_linear_bwd_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& alpha_in, const Tensor& eta_in,
    const Tensor& theta_in, const Tensor& Ws_in, const Tensor& Ss_in, const Tensor& do_in, const Tensor& dWT,
    const Tensor& dST, int64_t C) {
  check(q_in, k_in, v_in, alpha_in, eta_in, theta_in, dWT, dST, C);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), dk = q_in.size(3), dv = v_in.size(3);
  const int64_t BH = B * H, N = (L + C - 1) / C;
  TORCH_CHECK(Ws_in.dim() == 5 && Ws_in.size(0) == B && Ws_in.size(1) == H && Ws_in.size(2) == N + 1 &&
                  Ws_in.size(3) == dk && Ws_in.size(4) == dv && Ss_in.sizes() == Ws_in.sizes(),
              "Ws, Ss must be (B, H, N+1, dk, dv) = (", B, ", ", H, ", ", N + 1, ", ", dk, ", ", dv, "), got ",
              Ws_in.sizes(), " and ", Ss_in.sizes());
  TORCH_CHECK(do_in.sizes() == v_in.sizes(), "do must match v ", v_in.sizes(), ", got ", do_in.sizes());
  const auto acc = acc_type(q_in.scalar_type());
  auto opt = q_in.options().dtype(acc);
  auto q = q_in.to(acc).reshape({BH, L, dk}), k = k_in.to(acc).reshape({BH, L, dk});
  auto v = v_in.to(acc).reshape({BH, L, dv}), dout = do_in.to(acc).reshape({BH, L, dv});
  auto alpha = alpha_in.to(acc).reshape({BH, L}), eta = eta_in.to(acc).reshape({BH, L});
  auto theta = theta_in.to(acc).reshape({BH, L});
  auto Ws = Ws_in.to(acc).reshape({BH, N + 1, dk, dv}), Ss = Ss_in.to(acc).reshape({BH, N + 1, dk, dv});
  auto dq = alloc({BH, L, dk}, opt), dk_ = alloc({BH, L, dk}, opt), dv_ = alloc({BH, L, dv}, opt);
  auto dalpha = alloc({BH, L}, opt), deta = alloc({BH, L}, opt), dtheta = alloc({BH, L}, opt);
  auto dW = dWT.to(acc).reshape({BH, dk, dv}).clone(), dS = dST.to(acc).reshape({BH, dk, dv}).clone();
  const double tiny = acc == at::kDouble ? 2.2250738585072014e-308 : 1.1754943508222875e-38;
  for (int64_t n = N - 1; n >= 0; --n) {
    const int64_t s = n * C, len = std::min(C, L - s);
    auto Q = q.narrow(1, s, len), K = k.narrow(1, s, len), V = v.narrow(1, s, len), dO = dout.narrow(1, s, len);
    auto th = theta.narrow(1, s, len).unsqueeze(-1);
    auto W0 = Ws.select(1, n), S0 = Ss.select(1, n);
    auto g = chunk_gates(alpha.narrow(1, s, len), eta.narrow(1, s, len));
    auto cC = g.Cm.select(1, len - 1), r = g.Dm.select(1, len - 1);
    auto E = at::matmul(K, W0) - V;
    auto G = th * E;
    auto QK = at::matmul(Q, T(K));
    auto P = g.Cm * QK;
    auto QW = at::matmul(Q, W0), QS = at::matmul(Q, S0);
    auto KdW = at::matmul(K, dW), KdS = at::matmul(K, dS);
    // values
    auto dG = -at::matmul(T(P), dO) - cC.unsqueeze(-1) * KdW - r.unsqueeze(-1) * KdS;
    auto dP = -at::matmul(dO, T(G)).tril();
    auto dQK = dP * g.Cm;
    auto dE = th * dG;
    dtheta.narrow(1, s, len).copy_((E * dG).sum(-1));
    dv_.narrow(1, s, len).copy_(-dE);
    dq.narrow(1, s, len).copy_(at::matmul(dQK, K) + g.b.unsqueeze(-1) * at::matmul(dO, T(W0)) +
                               g.f.unsqueeze(-1) * at::matmul(dO, T(S0)));
    dk_.narrow(1, s, len).copy_(at::matmul(T(dQK), Q) - cC.unsqueeze(-1) * at::matmul(G, T(dW)) -
                                r.unsqueeze(-1) * at::matmul(G, T(dS)) + at::matmul(dE, T(W0)));
    // gate coefficients
    auto db = (dO * QW).sum(-1), df = (dO * QS).sum(-1);
    db.select(1, len - 1).add_((dW * W0).sum(at::IntArrayRef{-1, -2}));
    df.select(1, len - 1).add_((dW * S0).sum(at::IntArrayRef{-1, -2}));
    auto dm = at::zeros_like(g.m);
    dm.select(1, len - 1).copy_((dS * S0).sum(at::IntArrayRef{-1, -2}));
    auto dCm = dP * QK;
    dCm.select(1, len - 1).sub_((KdW * G).sum(-1));
    auto dDb = (at::matmul(dCm, T(g.Dm)) + df.unsqueeze(-1) * g.m.unsqueeze(-2)).tril();
    auto dDm = at::matmul(T(g.Db), dCm).tril();
    dDm.select(1, len - 1).sub_((KdS * G).sum(-1));
    dm = dm + at::matmul(T(g.Db), df.unsqueeze(-1)).squeeze(-1);
    auto dla = rev_cumsum(log_grad(dDb, g.Db) + db * g.b);
    auto dle = rev_cumsum(log_grad(dDm, g.Dm) + dm * g.m);
    dalpha.narrow(1, s, len).copy_(-dla / g.a.clamp_min(tiny));
    deta.narrow(1, s, len).copy_(dle / g.et.clamp_min(tiny));
    // to the chunk-start state
    auto dWp = at::matmul(T(Q), g.b.unsqueeze(-1) * dO) + g.b.select(1, len - 1).view({BH, 1, 1}) * dW +
               at::matmul(T(K), dE);
    auto dSp = at::matmul(T(Q), g.f.unsqueeze(-1) * dO) + g.f.select(1, len - 1).view({BH, 1, 1}) * dW +
               g.m.select(1, len - 1).view({BH, 1, 1}) * dS;
    dW = dWp;
    dS = dSp;
  }
  return {dq.view({B, H, L, dk}).to(q_in.scalar_type()), dk_.view({B, H, L, dk}).to(k_in.scalar_type()),
          dv_.view({B, H, L, dv}).to(v_in.scalar_type()), dalpha.view({B, H, L}).to(alpha_in.scalar_type()),
          deta.view({B, H, L}).to(eta_in.scalar_type()), dtheta.view({B, H, L}).to(theta_in.scalar_type()),
          dW.view({B, H, dk, dv}), dS.view({B, H, dk, dv})};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("titans_linear_fwd", &titans_linear_fwd_cpu);
  m.impl("titans_linear_bwd", &titans_linear_bwd_cpu);
}
