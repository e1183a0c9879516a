// Chunk-parallel Titans memory on the CPU, linear and MLP (DESIGN 4.3; maths and backward in docs/titans.md).
//
// One task per (b, h) (at::parallel_for over B*H) walks its chunks serially on raw pointers, as csrc/dgd_cpu.cpp
// does: a chunk's q, k, v and the states stay in cache and nothing is dispatched per chunk. Each memory layer is a
// "dual block" of docs/titans.md. For a chunk of n <= C tokens with reads X and writes A (n, dx), theta-scaled inner
// gradients G (n, dy) and the layer's chunk-start pair kept side by side, PS = [P0 | Pf] = [W | S] (dx, 2 dy):
//   R   = b o (X P0) + f o (X Pf) - (Cm o X A^T) G                (X PS is one product)
//   PSn = [b_n P0 + f_n Pf | m_n Pf] - A^T [c o G | r o G]         (one product)
// with the chunk's gate coefficients: masked cumulative products Db, Dm (exact at a gate 0), Cm = Db Dm, f = Db m,
// c = Cm[n, :], r = Dm[n, :]. Linear memory: one block (X = Q, A = K, G = theta o (K W - V)). MLP memory
// (M(x) = x + silu(x W1) W2): layer 1 (X = Q, A = K, G1 = theta o GZ) reads Zq, layer 2 (X = silu(Zq), A = silu(K W1),
// G2 = theta o E) the output.
// The forward saves only the chunk-boundary states (B, H, N+1, ., .). The backward walks the chunks in reverse,
// recomputes each chunk's inside from its boundary state, runs the block backwards (the MLP: layer 2, layer 1, then
// the chain through the inner gradient) and the gate step. The gate gradients take the log-derivative form of
// docs/titans.md, as the other chunked paths: relative error about eps / gate near an edge.
// Products: gemm_acc / gemm_tn_acc (csrc/cpu_matmul.h), compiled for the baseline ISA and for AVX2 + FMA, picked at
// run time.
// Math in float32 (float64 for float64 inputs); o and the q, k, v, gate gradients come back in their input dtype,
// the states in the accumulation dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_matmul.h"

namespace {

using at::Tensor;
using namespace hk_cpu;

bool poison() {
  const char* p = std::getenv("HOPE_KERNELS_POISON");
  return p != nullptr && p[0] == '1';
}

Tensor alloc(at::IntArrayRef shape, const at::TensorOptions& opt) {
  return poison() ? at::full(shape, NAN, opt) : at::empty(shape, opt);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

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
//   d a_t = Gb_t b_{t-1} + Gf_t f_{t-1} + sum_{i<t} Gc_t[i] Cm[t-1, i],   d e_t = Gm_t m_{t-1} + sum_{i<t} Gd_t[i] Dm[t-1, i]
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

// ---------------------------------------------------------------------------------------------- ISA clones

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

HK_CLONES(linear_fwd_head, LinearWork, LinearHead)
HK_CLONES(linear_bwd_head, LinearWork, LinearHead)
HK_CLONES(mlp_fwd_head, MlpWork, MlpHead)
HK_CLONES(mlp_bwd_head, MlpWork, MlpHead)

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

Tensor acc_contig(const Tensor& x, at::ScalarType acc) { return x.to(acc).contiguous(); }

std::tuple<Tensor, Tensor, Tensor> titans_linear_fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                         const Tensor& alpha_in, const Tensor& eta_in,
                                                         const Tensor& theta_in, const Tensor& W0, const Tensor& S0,
                                                         int64_t C) {
  check(q_in, k_in, v_in, alpha_in, eta_in, theta_in, W0, S0, C);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), dk = q_in.size(3), dv = v_in.size(3);
  const int64_t N = (L + C - 1) / C;
  const auto acc = acc_type(q_in.scalar_type());
  auto opt = q_in.options().dtype(acc);
  auto q = acc_contig(q_in, acc), k = acc_contig(k_in, acc), v = acc_contig(v_in, acc);
  auto alpha = acc_contig(alpha_in, acc), eta = acc_contig(eta_in, acc), theta = acc_contig(theta_in, acc);
  auto W = acc_contig(W0, acc), S = acc_contig(S0, acc);
  auto o = alloc({B, H, L, dv}, opt);
  auto Ws = alloc({B, H, N + 1, dk, dv}, opt), Ss = alloc({B, H, N + 1, dk, dv}, opt);
  Ws.select(2, 0).copy_(W);
  Ss.select(2, 0).copy_(S);
  const bool avx2 = use_avx2();
  const int64_t Cw = std::max<int64_t>(1, std::min(C, L));   // no chunk holds more than L tokens
  AT_DISPATCH_FLOATING_TYPES(acc, "titans_linear_fwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      LinearWork<T> w(Cw, dk, dv, false);
      for (int64_t bh = begin; bh < end; ++bh) {
        LinearHead<T> h{};
        h.q = q.data_ptr<T>() + bh * L * dk, h.k = k.data_ptr<T>() + bh * L * dk, h.v = v.data_ptr<T>() + bh * L * dv;
        h.al = alpha.data_ptr<T>() + bh * L, h.et = eta.data_ptr<T>() + bh * L, h.th = theta.data_ptr<T>() + bh * L;
        h.Ws = Ws.data_ptr<T>() + bh * (N + 1) * dk * dv, h.Ss = Ss.data_ptr<T>() + bh * (N + 1) * dk * dv;
        h.o = o.data_ptr<T>() + bh * L * dv;
        h.L = L, h.C = Cw, h.dK = dk, h.dV = dv;
        linear_fwd_head_run<T>(avx2, w, h);
      }
    });
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
  const auto acc = acc_type(q_in.scalar_type());
  auto opt = q_in.options().dtype(acc);
  auto q = acc_contig(q_in, acc), k = acc_contig(k_in, acc), v = acc_contig(v_in, acc);
  auto alpha = acc_contig(alpha_in, acc), eta = acc_contig(eta_in, acc), theta = acc_contig(theta_in, acc);
  auto Ws = acc_contig(Ws_in, acc), Ss = acc_contig(Ss_in, acc), dout = acc_contig(do_in, acc);
  auto dq = alloc({B, H, L, dk}, opt), dk_ = alloc({B, H, L, dk}, opt), dv_ = alloc({B, H, L, dv}, opt);
  auto dalpha = alloc({B, H, L}, opt), deta = alloc({B, H, L}, opt), dtheta = alloc({B, H, L}, opt);
  auto dW = acc_contig(dWT, acc).clone(), dS = acc_contig(dST, acc).clone();   // overwritten with dW0, dS0
  const bool avx2 = use_avx2();
  const int64_t Cw = std::max<int64_t>(1, std::min(C, L));
  AT_DISPATCH_FLOATING_TYPES(acc, "titans_linear_bwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      LinearWork<T> w(Cw, dk, dv, true);
      for (int64_t bh = begin; bh < end; ++bh) {
        LinearHead<T> h{};
        h.q = q.data_ptr<T>() + bh * L * dk, h.k = k.data_ptr<T>() + bh * L * dk, h.v = v.data_ptr<T>() + bh * L * dv;
        h.al = alpha.data_ptr<T>() + bh * L, h.et = eta.data_ptr<T>() + bh * L, h.th = theta.data_ptr<T>() + bh * L;
        h.Ws = Ws.data_ptr<T>() + bh * (N + 1) * dk * dv, h.Ss = Ss.data_ptr<T>() + bh * (N + 1) * dk * dv;
        h.dO = dout.data_ptr<T>() + bh * L * dv;
        h.dq = dq.data_ptr<T>() + bh * L * dk, h.dk = dk_.data_ptr<T>() + bh * L * dk;
        h.dv = dv_.data_ptr<T>() + bh * L * dv;
        h.dal = dalpha.data_ptr<T>() + bh * L, h.det = deta.data_ptr<T>() + bh * L;
        h.dth = dtheta.data_ptr<T>() + bh * L;
        h.dW = dW.data_ptr<T>() + bh * dk * dv, h.dS = dS.data_ptr<T>() + bh * dk * dv;
        h.L = L, h.C = Cw, h.dK = dk, h.dV = dv;
        linear_bwd_head_run<T>(avx2, w, h);
      }
    });
  });
  return {dq.to(q_in.scalar_type()),         dk_.to(k_in.scalar_type()),    dv_.to(v_in.scalar_type()),
          dalpha.to(alpha_in.scalar_type()), deta.to(eta_in.scalar_type()), dtheta.to(theta_in.scalar_type()),
          dW,                                dS};
}

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

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> titans_mlp_fwd_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& alpha_in, const Tensor& eta_in,
    const Tensor& theta_in, const Tensor& W1_in, const Tensor& W2_in, const Tensor& S1_in, const Tensor& S2_in,
    int64_t C) {
  check_mlp(q_in, k_in, v_in, alpha_in, eta_in, theta_in, W1_in, W2_in, S1_in, S2_in, C);
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), D = q_in.size(3), dh = W1_in.size(3);
  const int64_t N = (L + C - 1) / C, S = D * dh;
  const auto acc = acc_type(q_in.scalar_type());
  auto opt = q_in.options().dtype(acc);
  auto q = acc_contig(q_in, acc), k = acc_contig(k_in, acc), v = acc_contig(v_in, acc);
  auto alpha = acc_contig(alpha_in, acc), eta = acc_contig(eta_in, acc), theta = acc_contig(theta_in, acc);
  auto o = alloc({B, H, L, D}, opt);
  auto W1s = alloc({B, H, N + 1, D, dh}, opt), W2s = alloc({B, H, N + 1, dh, D}, opt);
  auto S1s = alloc({B, H, N + 1, D, dh}, opt), S2s = alloc({B, H, N + 1, dh, D}, opt);
  W1s.select(2, 0).copy_(W1_in);
  W2s.select(2, 0).copy_(W2_in);
  S1s.select(2, 0).copy_(S1_in);
  S2s.select(2, 0).copy_(S2_in);
  const bool avx2 = use_avx2();
  const int64_t Cw = std::max<int64_t>(1, std::min(C, L));
  AT_DISPATCH_FLOATING_TYPES(acc, "titans_mlp_fwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      MlpWork<T> w(Cw, D, dh, false);
      for (int64_t bh = begin; bh < end; ++bh) {
        MlpHead<T> h{};
        h.q = q.data_ptr<T>() + bh * L * D, h.k = k.data_ptr<T>() + bh * L * D, h.v = v.data_ptr<T>() + bh * L * D;
        h.al = alpha.data_ptr<T>() + bh * L, h.et = eta.data_ptr<T>() + bh * L, h.th = theta.data_ptr<T>() + bh * L;
        const int64_t st = bh * (N + 1) * S;
        h.W1s = W1s.data_ptr<T>() + st, h.W2s = W2s.data_ptr<T>() + st;
        h.S1s = S1s.data_ptr<T>() + st, h.S2s = S2s.data_ptr<T>() + st;
        h.o = o.data_ptr<T>() + bh * L * D;
        h.L = L, h.C = Cw, h.D = D, h.dh = dh;
        mlp_fwd_head_run<T>(avx2, w, h);
      }
    });
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
  const auto acc = acc_type(q_in.scalar_type());
  auto opt = q_in.options().dtype(acc);
  auto q = acc_contig(q_in, acc), k = acc_contig(k_in, acc), v = acc_contig(v_in, acc);
  auto alpha = acc_contig(alpha_in, acc), eta = acc_contig(eta_in, acc), theta = acc_contig(theta_in, acc);
  auto W1s = acc_contig(W1s_in, acc), W2s = acc_contig(W2s_in, acc), S1s = acc_contig(S1s_in, acc);
  auto S2s = acc_contig(S2s_in, acc), dout = acc_contig(do_in, acc);
  auto dq = alloc({B, H, L, D}, opt), dk_ = alloc({B, H, L, D}, opt), dv_ = alloc({B, H, L, D}, opt);
  auto dalpha = alloc({B, H, L}, opt), deta = alloc({B, H, L}, opt), dtheta = alloc({B, H, L}, opt);
  auto dW1 = acc_contig(dW1T, acc).clone(), dW2 = acc_contig(dW2T, acc).clone();   // overwritten with the
  auto dS1 = acc_contig(dS1T, acc).clone(), dS2 = acc_contig(dS2T, acc).clone();   // initial state's gradients
  const bool avx2 = use_avx2();
  const int64_t Cw = std::max<int64_t>(1, std::min(C, L));
  AT_DISPATCH_FLOATING_TYPES(acc, "titans_mlp_bwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      MlpWork<T> w(Cw, D, dh, true);
      for (int64_t bh = begin; bh < end; ++bh) {
        MlpHead<T> h{};
        h.q = q.data_ptr<T>() + bh * L * D, h.k = k.data_ptr<T>() + bh * L * D, h.v = v.data_ptr<T>() + bh * L * D;
        h.al = alpha.data_ptr<T>() + bh * L, h.et = eta.data_ptr<T>() + bh * L, h.th = theta.data_ptr<T>() + bh * L;
        const int64_t st = bh * (N + 1) * S;
        h.W1s = W1s.data_ptr<T>() + st, h.W2s = W2s.data_ptr<T>() + st;
        h.S1s = S1s.data_ptr<T>() + st, h.S2s = S2s.data_ptr<T>() + st;
        h.dO = dout.data_ptr<T>() + bh * L * D;
        h.dq = dq.data_ptr<T>() + bh * L * D, h.dk = dk_.data_ptr<T>() + bh * L * D;
        h.dv = dv_.data_ptr<T>() + bh * L * D;
        h.dal = dalpha.data_ptr<T>() + bh * L, h.det = deta.data_ptr<T>() + bh * L;
        h.dth = dtheta.data_ptr<T>() + bh * L;
        h.dW1 = dW1.data_ptr<T>() + bh * S, h.dW2 = dW2.data_ptr<T>() + bh * S;
        h.dS1 = dS1.data_ptr<T>() + bh * S, h.dS2 = dS2.data_ptr<T>() + bh * S;
        h.L = L, h.C = Cw, h.D = D, h.dh = dh;
        mlp_bwd_head_run<T>(avx2, w, h);
      }
    });
  });
  return {dq.to(q_in.scalar_type()),         dk_.to(k_in.scalar_type()),    dv_.to(v_in.scalar_type()),
          dalpha.to(alpha_in.scalar_type()), deta.to(eta_in.scalar_type()), dtheta.to(theta_in.scalar_type()),
          dW1, dW2, dS1, dS2};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("titans_linear_fwd", &titans_linear_fwd_cpu);
  m.impl("titans_linear_bwd", &titans_linear_bwd_cpu);
  m.impl("titans_mlp_fwd", &titans_mlp_fwd_cpu);
  m.impl("titans_mlp_bwd", &titans_mlp_bwd_cpu);
}
