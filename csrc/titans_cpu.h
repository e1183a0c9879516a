// Shared parts of the chunk-parallel Titans memories on the CPU (csrc/titans_linear_cpu.cpp,
// csrc/titans_mlp_cpu.cpp; maths and backward in docs/titans.md). Two translation units, so that the build compiles
// them side by side: in one file they took 136 s of a 2-core build.
//
// One task per (b, h) (at::parallel_for over B*H) walks its chunks serially on raw pointers, as csrc/dgd_cpu.cpp
// does: a chunk's q, k, v and the states stay in cache and nothing is dispatched per chunk. Each memory layer is a
// "dual block" of docs/titans.md. For a chunk of n <= C tokens with reads X and writes A (n, dx), theta-scaled inner
// gradients G (n, dy) and the layer's chunk-start pair kept side by side, PS = [P0 | Pf] = [W | S] (dx, 2 dy):
//   R   = b o (X P0) + f o (X Pf) - (Cm o X A^T) G                (X PS is one product)
//   PSn = [b_n P0 + f_n Pf | m_n Pf] - A^T [c o G | r o G]         (one product)
// with the chunk's gate coefficients: masked cumulative products Db, Dm, Cm = Db Dm, f = Db m, c = Cm[n, :],
// r = Dm[n, :], computed by recurrences (products only). The forward saves only the chunk-boundary states
// (B, H, N+1, ., .). The backward walks the chunks in reverse, recomputes each chunk's inside from its boundary
// state, runs the blocks backwards and the gate step, the adjoint of those recurrences: no division by a gate, so
// the gate gradients are exact also at and near a gate's edge.
// Products: gemm_acc / gemm_tn_acc (csrc/cpu_matmul.h), compiled for the baseline ISA and for AVX2 + FMA, picked at
// run time (HK_CLONES below).
// Math in float32 (float64 for float64 inputs); o and the q, k, v, gate gradients come back in their input dtype,
// the states in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "cpu_matmul.h"

namespace hk_titans {

using namespace hk_cpu;
inline bool poison() {
  const char* p = std::getenv("HOPE_KERNELS_POISON");
  return p != nullptr && p[0] == '1';
}

inline at::Tensor alloc(at::IntArrayRef shape, const at::TensorOptions& opt) {
  return poison() ? at::full(shape, NAN, opt) : at::empty(shape, opt);
}

// The accumulation dtype copy of an input, contiguous.
inline at::Tensor acc_contig(const at::Tensor& x, at::ScalarType acc) { return x.to(acc).contiguous(); }

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------- per-task scratch

template <typename T>
T* take(std::vector<T>& v, int64_t n) {
  v.assign(n, T(0));
  return v.data();
}

// Gate coefficients of one chunk (vectors (C), matrices (C, C) row-major, zero above the diagonal) and, for the
// backward, the gradients of the coefficients summed over the chunk's blocks (db, df, dCm, dr = d Dm[n-1, :],
// dmn = d m_{n-1}) and the adjoints the gate step carries (gc, gd).
template <typename T>
struct Gates {
  int64_t C;
  std::vector<T> va, ve, vb, vm, vf, vDm, vCm, vdb, vdf, vdCm, vdr, vgc, vgd;
  T *a, *e, *b, *m, *f, *Dm, *Cm;
  T *db = nullptr, *df = nullptr, *dCm = nullptr, *dr = nullptr, *gc = nullptr, *gd = nullptr;
  T dmn = 0;

  Gates(int64_t C_, bool backward) : C(C_) {
    const int64_t CC = C * C;
    a = take(va, C), e = take(ve, C), b = take(vb, C), m = take(vm, C), f = take(vf, C);
    Dm = take(vDm, CC), Cm = take(vCm, CC);
    if (backward) {
      db = take(vdb, C), df = take(vdf, C), dr = take(vdr, C), gc = take(vgc, C), gd = take(vgd, C);
      dCm = take(vdCm, CC);
    }
  }
};

// The coefficients by their recurrences over the chunk (products only, no division: exact at a gate 0):
//   b_t = a_t b_{t-1}, m_t = e_t m_{t-1}, f_t = a_t f_{t-1} + m_t,
//   Dm[t, i] = e_t Dm[t-1, i] (i < t), Dm[t, t] = 1,   Cm[t, i] = a_t Cm[t-1, i] + Dm[t, i] (i < t), Cm[t, t] = 1
// (Cm = Db Dm and f = Db m of docs/titans.md, Db[t, j] = prod_{l=j+1..t} a_l, summed from the left).
template <int VB, typename T>
HK_INLINE void chunk_gates(Gates<T>& g, const T* alpha, const T* eta, int64_t n) {
  const int64_t C = g.C;
  T pb = 1, pm = 1, pf = 0;
  for (int64_t t = 0; t < n; ++t) {
    const T at = 1 - alpha[t], et = eta[t];
    g.a[t] = at;
    g.e[t] = et;
    pb *= at;
    pm *= et;
    pf = at * pf + pm;
    g.b[t] = pb;
    g.m[t] = pm;
    g.f[t] = pf;
    T *dm = g.Dm + t * C, *cm = g.Cm + t * C;
    if (t > 0) {
      const T *dp = dm - C, *cp = cm - C;
#pragma omp simd
      for (int64_t i = 0; i < t; ++i) dm[i] = et * dp[i], cm[i] = at * cp[i] + et * dp[i];
    }
    dm[t] = cm[t] = 1;
    std::fill(dm + t + 1, dm + n, T(0));
    std::fill(cm + t + 1, cm + n, T(0));
  }
}

// Scratch of one dual block: sized for dx, dy <= d.
template <typename T>
struct Block {
  std::vector<T> v[12];
  T *XP, *XA, *nP, *CG;
  T *AdPS = nullptr, *GT = nullptr, *DRG = nullptr, *dXA = nullptr, *BF = nullptr, *UV = nullptr, *PT = nullptr,
    *dPST = nullptr;

  Block(int64_t C, int64_t d, bool backward) {
    const int64_t CC = C * C;
    XP = take(v[0], C * 2 * d), XA = take(v[1], CC), nP = take(v[2], CC), CG = take(v[3], C * 2 * d);
    if (backward) {
      AdPS = take(v[4], C * 2 * d), GT = take(v[5], d * C), DRG = take(v[6], CC), dXA = take(v[7], CC);
      BF = take(v[8], C * 2 * d), UV = take(v[9], C * 2 * d), PT = take(v[10], 2 * d * d);
      dPST = take(v[11], 2 * d * d);
    }
  }
};

// ---------------------------------------------------------------------------------------------- dual block

// The read of a block: XA = X A^T, nP = -(Cm o XA) (n, n; nP zero above the diagonal) and, when R != nullptr,
// XP = X [P0 | Pf] (n, 2dy) and R = b o (X P0) + f o (X Pf) + nP G (n, dy). X (n, dx) with row stride ldx,
// AT = A^T (dx, C).
template <int VB, typename T>
HK_INLINE void block_read(const Gates<T>& g, Block<T>& s, const T* X, int64_t ldx, const T* AT, const T* G,
                          const T* PS, int64_t n, int64_t dx, int64_t dy, T* R, int64_t ldr) {
  const int64_t C = g.C;
  zero(s.XA, C, n, n);
  gemm_acc<VB>(s.XA, C, X, ldx, AT, C, n, dx, n, /*lower_n=*/true);
  for (int64_t t = 0; t < n; ++t) {
    const T *cm = g.Cm + t * C, *xa = s.XA + t * C;
    T* np = s.nP + t * C;
    for (int64_t i = 0; i <= t; ++i) np[i] = -cm[i] * xa[i];
    std::fill(np + t + 1, np + n, T(0));
  }
  if (R == nullptr) return;
  zero(s.XP, 2 * dy, n, 2 * dy);
  gemm_acc<VB>(s.XP, 2 * dy, X, ldx, PS, 2 * dy, n, dx, 2 * dy);
  for (int64_t t = 0; t < n; ++t) {
    const T bt = g.b[t], ft = g.f[t];
    const T* xp = s.XP + t * 2 * dy;
    T* rt = R + t * ldr;
#pragma omp simd
    for (int64_t j = 0; j < dy; ++j) rt[j] = bt * xp[j] + ft * xp[dy + j];
  }
  gemm_acc<VB>(R, ldr, s.nP, C, G, dy, n, n, dy, false, /*lower_p=*/true);
}

// CG = [-c o G | -r o G] (n, 2dy): the writes' coefficients of the end state (c = Cm[n-1, :], r = Dm[n-1, :]).
template <typename T>
HK_INLINE void end_coefficients(const Gates<T>& g, const T* G, int64_t n, int64_t dy, T* CG) {
  const T *c = g.Cm + (n - 1) * g.C, *r = g.Dm + (n - 1) * g.C;
  for (int64_t i = 0; i < n; ++i) {
    const T ci = -c[i], ri = -r[i];
    const T* gi = G + i * dy;
    T* cg = CG + i * 2 * dy;
#pragma omp simd
    for (int64_t j = 0; j < dy; ++j) cg[j] = ci * gi[j], cg[dy + j] = ri * gi[j];
  }
}

// The end state of a block: PSn = [b_n P0 + f_n Pf | m_n Pf] + A^T CG (dx, 2dy); A (n, dx), row stride lda.
template <int VB, typename T>
HK_INLINE void block_end(const Gates<T>& g, Block<T>& s, const T* A, int64_t lda, const T* G, const T* PS, int64_t n,
                         int64_t dx, int64_t dy, T* PSn) {
  end_coefficients(g, G, n, dy, s.CG);
  const T bn = g.b[n - 1], fn = g.f[n - 1], mn = g.m[n - 1];
  for (int64_t a = 0; a < dx; ++a) {
    const T* p = PS + a * 2 * dy;
    T* q = PSn + a * 2 * dy;
#pragma omp simd
    for (int64_t j = 0; j < dy; ++j) q[j] = bn * p[j] + fn * p[dy + j], q[dy + j] = mn * p[dy + j];
  }
  gemm_tn_acc<VB>(PSn, 2 * dy, A, lda, s.CG, 2 * dy, dx, n, 2 * dy);
}

// Backward of one block (docs/titans.md, "Backward"), after block_read filled s.XA, s.nP. dR (n, dy) and
// dPS = [dWn | dSn] (dx, 2dy) are the gradients of its read and end state. Writes dX, dA (n, dx; row strides ldx),
// dG (n, dy) and dPSp = [dP0 | dPf] (dx, 2dy, including m_n dSn), and adds the gate pieces to g.db, g.df, g.dmn,
// g.dCm, g.dr. Leaves s.PT = [P0^T | Pf^T] (dy, 2dx), whose first dx columns are P0^T.
// [U | V] = dR [P0^T | Pf^T] gives both dX's state terms (b o U + f o V) and db_t = X_t.U_t, df_t = X_t.V_t, so X P0
// is not recomputed. The products with transposed operands (nP^T, dXA^T, X^T) read them in place (gemm_tn_acc),
// the triangles' zero parts skipped.
template <int VB, typename T>
HK_INLINE void block_bwd(Gates<T>& g, Block<T>& s, const T* X, int64_t ldx, const T* A, const T* AT, const T* G,
                         const T* PS, const T* dR, int64_t ldr, const T* dPS, int64_t n, int64_t dx, int64_t dy,
                         T* dX, T* dA, T* dG, T* dPSp) {
  const int64_t C = g.C, d2 = 2 * dy, x2 = 2 * dx;
  const T *c = g.Cm + (n - 1) * C, *r = g.Dm + (n - 1) * C;
  // A [dWn | dSn]; dG = -(Cm o XA)^T dR - c o (A dWn) - r o (A dSn)
  zero(s.AdPS, d2, n, d2);
  gemm_acc<VB>(s.AdPS, d2, A, ldx, dPS, d2, n, dx, d2);
  for (int64_t i = 0; i < n; ++i) {
    const T* ad = s.AdPS + i * d2;
    const T* gi = G + i * dy;
    T* dg = dG + i * dy;
    const T ci = c[i], ri = r[i];
#pragma omp simd
    for (int64_t j = 0; j < dy; ++j) dg[j] = -ci * ad[j] - ri * ad[dy + j];
    g.dCm[(n - 1) * C + i] -= dot(ad, gi, dy);
    g.dr[i] -= dot(ad + dy, gi, dy);
  }
  gemm_tn_acc<VB>(dG, dy, s.nP, C, dR, ldr, n, n, dy, /*upper=*/true);
  // dP = -tril(dR G^T): dXA = dP o Cm, dCm += dP o XA
  transpose(G, dy, s.GT, C, n, dy);
  zero(s.DRG, C, n, n);
  gemm_acc<VB>(s.DRG, C, dR, ldr, s.GT, C, n, dy, n, /*lower_n=*/true);
  for (int64_t t = 0; t < n; ++t) {
    const T *drg = s.DRG + t * C, *cm = g.Cm + t * C, *xa = s.XA + t * C;
    T *dxa = s.dXA + t * C, *dcm = g.dCm + t * C;
    for (int64_t i = 0; i <= t; ++i) {
      const T dp = -drg[i];
      dxa[i] = dp * cm[i];
      dcm[i] += dp * xa[i];
    }
    std::fill(dxa + t + 1, dxa + n, T(0));
  }
  // [U | V] = dR [P0^T | Pf^T];  dX = b o U + f o V + dXA A;  db += rowsum(X o U), df += rowsum(X o V)
  for (int64_t a = 0; a < dx; ++a) {
    const T* p = PS + a * d2;
    for (int64_t j = 0; j < dy; ++j) s.PT[j * x2 + a] = p[j], s.PT[j * x2 + dx + a] = p[dy + j];
  }
  zero(s.UV, x2, n, x2);
  gemm_acc<VB>(s.UV, x2, dR, ldr, s.PT, x2, n, dy, x2);
  for (int64_t t = 0; t < n; ++t) {
    const T bt = g.b[t], ft = g.f[t];
    const T *u = s.UV + t * x2, *xt = X + t * ldx, *dr = dR + t * ldr;
    T* dxt = dX + t * ldx;
#pragma omp simd
    for (int64_t a = 0; a < dx; ++a) dxt[a] = bt * u[a] + ft * u[dx + a];
    g.db[t] += dot(xt, u, dx);
    g.df[t] += dot(xt, u + dx, dx);
    T* bf = s.BF + t * d2;
#pragma omp simd
    for (int64_t j = 0; j < dy; ++j) bf[j] = bt * dr[j], bf[dy + j] = ft * dr[j];
  }
  gemm_acc<VB>(dX, ldx, s.dXA, C, A, ldx, n, n, dx, false, /*lower_p=*/true);
  // dA = dXA^T X - [c o G | r o G] [dWn^T; dSn^T]
  end_coefficients(g, G, n, dy, s.CG);
  transpose(dPS, d2, s.dPST, dx, dx, d2);
  zero(dA, ldx, n, dx);
  gemm_acc<VB>(dA, ldx, s.CG, d2, s.dPST, dx, n, d2, dx);
  gemm_tn_acc<VB>(dA, ldx, s.dXA, C, X, ldx, n, n, dx, /*upper=*/true);
  // [dP0 | dPf] = X^T [b o dR | f o dR] + [b_n dWn | f_n dWn + m_n dSn]; <dWn, P0>, <dWn, Pf>, <dSn, Pf> to the gates
  const T bn = g.b[n - 1], fn = g.f[n - 1], mn = g.m[n - 1];
  T dbn = 0, dfn = 0, dmn = 0;
  for (int64_t a = 0; a < dx; ++a) {
    const T *dp = dPS + a * d2, *p = PS + a * d2;
    T* o = dPSp + a * d2;
#pragma omp simd
    for (int64_t j = 0; j < dy; ++j) o[j] = bn * dp[j], o[dy + j] = fn * dp[j] + mn * dp[dy + j];
    dbn += dot(dp, p, dy);
    dfn += dot(dp, p + dy, dy);
    dmn += dot(dp + dy, p + dy, dy);
  }
  g.db[n - 1] += dbn;
  g.df[n - 1] += dfn;
  g.dmn += dmn;
  gemm_tn_acc<VB>(dPSp, d2, X, ldx, s.BF, d2, dx, n, d2);
}

// Gradients to alpha, eta of one chunk from those of its coefficients: the adjoints of chunk_gates' recurrences,
// walked back from t = n-1 (products only, so exact also at a gate 0). With a_n = e_n = 0:
//   Gb_t = db_t + a_{t+1} Gb_{t+1},  Gf_t = df_t + a_{t+1} Gf_{t+1},  Gm_t = Gf_t + [t = n-1] dmn + e_{t+1} Gm_{t+1}
//   Gc_t[i] = dCm[t, i] + a_{t+1} Gc_{t+1}[i],   Gd_t[i] = Gc_t[i] + [t = n-1] dr_i + e_{t+1} Gd_{t+1}[i]   (i < t)
//   d a_t = Gb_t b_{t-1} + Gf_t f_{t-1} + sum_{i<t} Gc_t[i] Cm[t-1, i]
//   d e_t = Gm_t m_{t-1} + sum_{i<t} Gd_t[i] Dm[t-1, i]
// and dalpha = -d a, deta = d e. Clears the pieces for the next chunk.
template <typename T>
HK_INLINE void gate_bwd(Gates<T>& g, int64_t n, T* dalpha, T* deta) {
  const int64_t C = g.C;
  T gb = 0, gf = 0, gm = 0;
  std::fill(g.gc, g.gc + n, T(0));
  std::fill(g.gd, g.gd + n, T(0));
  for (int64_t t = n - 1; t >= 0; --t) {
    const T an = t + 1 < n ? g.a[t + 1] : T(0), en = t + 1 < n ? g.e[t + 1] : T(0);
    gb = g.db[t] + an * gb;
    gf = g.df[t] + an * gf;
    gm = gf + (t == n - 1 ? g.dmn : T(0)) + en * gm;
    T da = gb * (t > 0 ? g.b[t - 1] : T(1)) + gf * (t > 0 ? g.f[t - 1] : T(0));
    T de = gm * (t > 0 ? g.m[t - 1] : T(1));
    if (t == 0) {
      dalpha[0] = -da;
      deta[0] = de;
      break;
    }
    const T *dcm = g.dCm + t * C, *cp = g.Cm + (t - 1) * C, *dp = g.Dm + (t - 1) * C;
    const T* dr = t == n - 1 ? g.dr : nullptr;
    for (int64_t i = 0; i < t; ++i) {
      const T gci = dcm[i] + an * g.gc[i];
      const T gdi = gci + (dr != nullptr ? dr[i] : T(0)) + en * g.gd[i];
      g.gc[i] = gci;
      g.gd[i] = gdi;
      da += gci * cp[i];
      de += gdi * dp[i];
    }
    dalpha[t] = -da;
    deta[t] = de;
  }
  std::fill(g.db, g.db + n, T(0));
  std::fill(g.df, g.df + n, T(0));
  std::fill(g.dr, g.dr + n, T(0));
  zero(g.dCm, C, n, n);
  g.dmn = 0;
}

// [P | S] (rows, 2 cols) from P, S (rows, cols), and back.
template <typename T>
HK_INLINE void join_pair(const T* P, const T* S, T* PS, int64_t rows, int64_t cols) {
  for (int64_t a = 0; a < rows; ++a) {
    std::copy(P + a * cols, P + (a + 1) * cols, PS + a * 2 * cols);
    std::copy(S + a * cols, S + (a + 1) * cols, PS + a * 2 * cols + cols);
  }
}

template <typename T>
HK_INLINE void split_pair(const T* PS, T* P, T* S, int64_t rows, int64_t cols) {
  for (int64_t a = 0; a < rows; ++a) {
    std::copy(PS + a * 2 * cols, PS + a * 2 * cols + cols, P + a * cols);
    std::copy(PS + a * 2 * cols + cols, PS + (a + 1) * 2 * cols, S + a * cols);
  }
}

// ---------------------------------------------------------------------------------------------- op skeleton

// Runs task(T{}, avx2, begin, end) over the (b, h) rows [0, BH) in at::parallel_for chunks, T the accumulation
// dtype (float or double), avx2 = use_avx2(): each task builds its scratch once and walks its heads.
template <typename Task>
void for_each_head(at::ScalarType acc, int64_t BH, const Task& task) {
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(acc, "titans_cpu", [&] {
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) { task(scalar_t{}, avx2, begin, end); });
  });
}

// An op's token inputs in the accumulation dtype (float32; float64 for float64 inputs), contiguous: q, k
// (B, H, L, dk), v (B, H, L, dv) and the gates alpha, eta, theta (B, H, L); opt: the accumulation dtype's options.
struct TokenInputs {
  at::ScalarType acc;
  at::TensorOptions opt;
  at::Tensor q, k, v, alpha, eta, theta;

  TokenInputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& alpha_in,
              const at::Tensor& eta_in, const at::Tensor& theta_in)
      : acc(acc_type(q_in.scalar_type())), opt(q_in.options().dtype(acc)), q(acc_contig(q_in, acc)),
        k(acc_contig(k_in, acc)), v(acc_contig(v_in, acc)), alpha(acc_contig(alpha_in, acc)),
        eta(acc_contig(eta_in, acc)), theta(acc_contig(theta_in, acc)) {}
};

// Points a head (LinearHead or MlpHead) at row bh = b * H + h of the token inputs.
template <typename T, typename Head>
void point_at_tokens(Head& h, const TokenInputs& in, int64_t bh) {
  const int64_t L = in.q.size(2), dk = in.q.size(3), dv = in.v.size(3);
  h.q = in.q.data_ptr<T>() + bh * L * dk, h.k = in.k.data_ptr<T>() + bh * L * dk;
  h.v = in.v.data_ptr<T>() + bh * L * dv;
  h.al = in.alpha.data_ptr<T>() + bh * L, h.et = in.eta.data_ptr<T>() + bh * L;
  h.th = in.theta.data_ptr<T>() + bh * L;
}

// The chunk length the scratch is sized for: no chunk holds more than L tokens.
inline int64_t work_chunk(int64_t C, int64_t L) { return std::max<int64_t>(1, std::min(C, L)); }

// ---------------------------------------------------------------------------------------------- ISA clones

// HK_CLONES(body, Work, Head) defines body_run<T>(avx2, w, h): body<32> compiled for AVX2 + FMA where the compiler
// can target it and avx2 is true (use_avx2(), read once per op by for_each_head), else body<16> for the baseline ISA.
#define HK_CLONES(body, Work, Head)                                                                 \
  template <typename T>                                                                             \
  void body##_generic(Work<T>& w, const Head<T>& h) { body<16>(w, h); }                              \
  HK_AVX2_VARIANT(body, Work, Head)                                                                 \
  template <typename T>                                                                             \
  void body##_run(bool avx2, Work<T>& w, const Head<T>& h) {                                        \
    HK_AVX2_CALL(body)                                                                              \
    body##_generic(w, h);                                                                           \
  }
#ifdef HK_AVX2_CLONE
#define HK_AVX2_VARIANT(body, Work, Head) \
  template <typename T>                   \
  __attribute__((target("avx2,fma"))) void body##_avx2(Work<T>& w, const Head<T>& h) { body<32>(w, h); }
#define HK_AVX2_CALL(body) \
  if (avx2) return body##_avx2(w, h);
#else
#define HK_AVX2_VARIANT(body, Work, Head)
#define HK_AVX2_CALL(body) (void)avx2;
#endif

}  // namespace hk_titans
