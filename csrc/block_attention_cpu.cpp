// Block-causal attention on the CPU: the cpu backend of rope_attention after the rotation (docs/rope_attention.md).
//
// Token i at timestep t_i (non-decreasing) sees the keys j with t_j <= t_i (and t_i - t_j < window when window >
// 0). With t sorted, the queries of one timestep [s, e) see exactly the keys [ks, e): attention over these blocks
// needs no mask and computes no masked score (for T equal timesteps, (T - 1) / 2T of all scores are skipped).
//
// Forward: one task per (b, h, block, row tile of at most kRowTile queries), so a tile's scores S (rows x keys)
// stay in cache: S = Q K^T, P = exp(scale S - m) row by row (lse = m + log sum), O = P V / sum.
// Backward: one task per (b, h), walking its tiles serially (dK, dV accumulate over the tiles of later blocks):
// P = exp(scale Q K^T - lse) recomputed, dV += P^T dO, dS = P (dO V^T - delta) scale with
// delta = rowsum(dO o), dQ = dS K, dK += dS^T Q. Only o and lse are saved by the forward.
//
// Products run on gemm_acc / gemm_tn_acc (csrc/cpu_matmul.h; K and V are transposed once per head so every
// product reads rows), exp is a vectorised polynomial (float) or std::exp (double). The kernels are compiled for
// the baseline ISA and AVX2 + FMA, picked at run time (HOPE_KERNELS_NO_AVX2=1 forces the baseline build).
// Math in float32 (float64 for double inputs); bf16 / fp16 inputs are upcast and the outputs cast back.
// o comes back as a (B, H, L, d) view of (B, L, H, d) memory (merging the heads afterwards is a view), the
// gradients contiguous.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_matmul.h"

namespace {

using at::Tensor;
using namespace hk_cpu;  // gemm_acc, gemm_tn_acc, transpose, zero, Vec, use_avx2 (csrc/cpu_matmul.h)

// at most this many queries per tile (a tile's scores over 2064 keys: 743 KB in float32), cut in multiples of 6
// where possible: gemm_acc's register tiles hold 6 rows, and the rows left over run a slower path
constexpr int64_t kRowTile = 96;

struct Tile {
  int64_t row, rows, key_start, keys;  // queries [row, row + rows) see keys [key_start, key_start + keys)
};

// The tiles of every timestep block, in order; a block of n queries is cut into ceil(n / kRowTile) tiles of about
// equal size, rounded up to a multiple of 6 (the last one takes the rest).
std::vector<Tile> block_tiles(const Tensor& pos, int64_t window) {
  const Tensor t = pos.select(1, 0).to(at::kLong).contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t L = t.numel();
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < L; ++i)
    if (i == 0 || p[i] != p[i - 1]) starts.push_back(i);
  std::vector<Tile> tiles;
  size_t first = 0;  // the first block inside the window of block b (t non-decreasing: it only moves forward)
  for (size_t b = 0; b < starts.size(); ++b) {
    const int64_t s = starts[b], e = b + 1 < starts.size() ? starts[b + 1] : L;
    if (window > 0)
      while (p[starts[first]] <= p[s] - window) ++first;
    const int64_t ks = starts[first], n = e - s, parts = (n + kRowTile - 1) / kRowTile;
    const int64_t size = std::min(kRowTile, ((n + parts - 1) / parts + 5) / 6 * 6);
    for (int64_t r0 = s; r0 < e; r0 += size) tiles.push_back({r0, std::min(size, e - r0), ks, e - ks});
  }
  return tiles;
}

// Scores of the largest tile: the size of a task's S (and G) scratch.
int64_t max_tile_scores(const std::vector<Tile>& tiles) {
  int64_t n = 0;
  for (const Tile& tl : tiles) n = std::max(n, tl.rows * tl.keys);
  return n;
}

// x[j] = exp(a x[j] + b) for j < n; returns the sum. Arguments are <= 0 here (b is minus the row maximum).
template <int VB>
HK_INLINE double exp_affine_sum(double* __restrict x, int64_t n, double a, double b) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp(a * x[j] + b));
  return s;
}

// float: exp(y) = 2^k exp(r), k = round(y / ln 2), r = y - k ln 2 in two parts, exp(r) by a degree-6 polynomial
// (relative error ~1e-7); y is clamped at -87 (2^k stays a normal number; exp(-87) ~ 1.6e-38 counts as zero).
template <int VB>
HK_INLINE float exp_affine_sum(float* __restrict x, int64_t n, float a, float b) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: (y + kRound) - kRound rounds y to an integer
  constexpr float c2 = 5.0000001201e-1f, c3 = 1.6666665459e-1f, c4 = 4.1665795894e-2f, c5 = 8.3334519073e-3f,
                  c6 = 1.3981999507e-3f, c7 = 1.9875691500e-4f;
  float s = 0;
  int64_t j = 0;
#if defined(__GNUC__)
  using V = typename Vec<float, VB>::type;
  typedef int32_t VI __attribute__((vector_size(VB)));
  constexpr int64_t W = VB / sizeof(float);
  V acc = {};
  for (; j + W <= n; j += W) {
    V y;
    std::memcpy(&y, x + j, sizeof(V));
    y = y * a + b;
    y = y < -87.0f ? V{} - 87.0f : y;
    const V k = (y * kLog2e + kRound) - kRound;
    const V r = y - k * kLn2Hi - k * kLn2Lo;
    const V poly = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r * r) + r + 1.0f;
    const VI bits = (__builtin_convertvector(k, VI) + 127) << 23;
    V scale2;
    std::memcpy(&scale2, &bits, sizeof(V));
    const V e = poly * scale2;
    std::memcpy(x + j, &e, sizeof(V));
    acc += e;
  }
  for (int i = 0; i < W; ++i) s += acc[i];
#endif
  for (; j < n; ++j) s += (x[j] = std::exp(std::max(a * x[j] + b, -87.0f)));
  return s;
}

template <typename T>
HK_INLINE T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// Pointers and leading dimensions of one (b, h): q, k, v, o, grads are (L, d) row blocks with row stride ld*.
template <typename T>
struct Head {
  const T *q, *k, *v;
  int64_t ldq, ldk, ldv;
};

// One tile's forward: S = Q K^T -> P -> O (o rows at stride ldo), lse rows. kt: K^T (d, L) of this head.
template <int VB, typename T>
HK_INLINE void fwd_tile(const Head<T>& h, const T* kt, int64_t L, int64_t d, T scale, const Tile& tl, T* S, T* o,
                        int64_t ldo, T* lse) {
  const int64_t nr = tl.rows, nk = tl.keys;
  zero(S, nk, nr, nk);
  gemm_acc<VB>(S, nk, h.q + tl.row * h.ldq, h.ldq, kt + tl.key_start, L, nr, d, nk);
  std::vector<T> inv(nr);
  for (int64_t r = 0; r < nr; ++r) {
    T* s = S + r * nk;
    const T m = row_max(s, nk) * scale;
    const T sum = exp_affine_sum<VB>(s, nk, scale, -m);
    inv[r] = T(1) / sum;
    lse[tl.row + r] = m + std::log(sum);
  }
  T* orow = o + tl.row * ldo;
  zero(orow, ldo, nr, d);
  gemm_acc<VB>(orow, ldo, S, nk, h.v + tl.key_start * h.ldv, h.ldv, nr, nk, d);
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = 0; c < d; ++c) orow[r * ldo + c] *= inv[r];
}

// One head's backward over all tiles. kt, vt: K^T, V^T (d, L); S, G: tile-sized scratch; dq, dk, dv rows at ldg.
template <int VB, typename T>
HK_INLINE void bwd_head(const Head<T>& h, const T* go, int64_t ldgo, const T* o, int64_t ldo, const T* lse,
                        const std::vector<Tile>& tiles, const T* kt, const T* vt, int64_t L, int64_t d, T scale,
                        T* S, T* G, T* delta, T* dq, T* dk, T* dv, int64_t ldg) {
  for (int64_t i = 0; i < L; ++i) delta[i] = dot(go + i * ldgo, o + i * ldo, d);
  zero(dq, ldg, L, d);
  zero(dk, ldg, L, d);
  zero(dv, ldg, L, d);
  for (const Tile& tl : tiles) {
    const int64_t nr = tl.rows, nk = tl.keys, r0 = tl.row, ks = tl.key_start;
    const T* gorow = go + r0 * ldgo;
    const T* qrow = h.q + r0 * h.ldq;
    zero(S, nk, nr, nk);
    gemm_acc<VB>(S, nk, qrow, h.ldq, kt + ks, L, nr, d, nk);
    for (int64_t r = 0; r < nr; ++r) exp_affine_sum<VB>(S + r * nk, nk, scale, -lse[r0 + r]);
    gemm_tn_acc<VB>(dv + ks * ldg, ldg, S, nk, gorow, ldgo, nk, nr, d);  // dV += P^T dO
    zero(G, nk, nr, nk);
    gemm_acc<VB>(G, nk, gorow, ldgo, vt + ks, L, nr, d, nk);  // dP = dO V^T
    for (int64_t r = 0; r < nr; ++r) {
      T* g = G + r * nk;
      const T* p = S + r * nk;
      const T dl = delta[r0 + r];
#pragma omp simd
      for (int64_t j = 0; j < nk; ++j) g[j] = p[j] * (g[j] - dl) * scale;  // dS
    }
    gemm_acc<VB>(dq + r0 * ldg, ldg, G, nk, h.k + ks * h.ldk, h.ldk, nr, nk, d);  // dQ = dS K
    gemm_tn_acc<VB>(dk + ks * ldg, ldg, G, nk, qrow, h.ldq, nk, nr, d);           // dK += dS^T Q
  }
}

#define HK_FWD_PARAMS \
  const Head<T>&h, const T *kt, int64_t L, int64_t d, T scale, const Tile &tl, T *S, T *o, int64_t ldo, T *lse
#define HK_FWD_ARGS h, kt, L, d, scale, tl, S, o, ldo, lse
#define HK_BWD_PARAMS                                                                                        \
  const Head<T>&h, const T *go, int64_t ldgo, const T *o, int64_t ldo, const T *lse,                        \
      const std::vector<Tile>&tiles, const T *kt, const T *vt, int64_t L, int64_t d, T scale, T *S, T *G, \
      T *delta, T *dq, T *dk, T *dv, int64_t ldg
#define HK_BWD_ARGS h, go, ldgo, o, ldo, lse, tiles, kt, vt, L, d, scale, S, G, delta, dq, dk, dv, ldg

HK_ISA_CLONES(fwd_tile_any, fwd_tile, HK_FWD_PARAMS, HK_FWD_ARGS)
HK_ISA_CLONES(bwd_head_any, bwd_head, HK_BWD_PARAMS, HK_BWD_ARGS)
#undef HK_FWD_PARAMS
#undef HK_FWD_ARGS
#undef HK_BWD_PARAMS
#undef HK_BWD_ARGS

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pos, int64_t window) {
  TORCH_CHECK(q.dim() == 4, "block_attention: q must be (B, H, L, d), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "block_attention: q, k, v must have one shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "block_attention: q, k, v must have one dtype");
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == q.size(2) && pos.size(1) == 3, "block_attention: pos must be (L, 3) ",
              "with L = ", q.size(2), ", got ", pos.sizes());
  TORCH_CHECK(window >= 0, "block_attention: window must be >= 0 (0: none), got ", window);
}

at::ScalarType acc_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// x in the math dtype, contiguous (B, H, L, d). The products stream rows of k, v, q and grad_o; rows of a (B, L,
// H, d) view sit H * d elements apart, a stride that maps them onto a few cache sets (at 16 heads of 64: 4 KB
// apart, 16 of the 1024 sets of a 512 KB 8-way L2): the real-size forward ran at half speed on such views.
Tensor prepared(const Tensor& x, at::ScalarType acc) { return x.to(acc).contiguous(); }

// (B, L, H, d) memory seen as (B, H, L, d), in dtype
Tensor heads_view(const Tensor& q, at::ScalarType dtype) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options().dtype(dtype)).transpose(1, 2);
}

template <typename T>
Head<T> head_of(const Tensor& q, const Tensor& k, const Tensor& v, int64_t b, int64_t hh) {
  return {q.data_ptr<T>() + b * q.stride(0) + hh * q.stride(1), k.data_ptr<T>() + b * k.stride(0) + hh * k.stride(1),
          v.data_ptr<T>() + b * v.stride(0) + hh * v.stride(1), q.stride(2), k.stride(2), v.stride(2)};
}

// (B*H, d, L) transposes of x's heads
template <typename T>
Tensor transposed_heads(const Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), d = x.size(3);
  Tensor xt = at::empty({B * H, d, L}, x.options());
  const T* px = x.data_ptr<T>();
  T* pt = xt.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      transpose(px + (bh / H) * x.stride(0) + (bh % H) * x.stride(1), x.stride(2), pt + bh * d * L, L, L, d);
  });
  return xt;
}

std::tuple<Tensor, Tensor> block_attention_fwd_cpu(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                   const Tensor& pos, int64_t window, double scale) {
  check_inputs(q_, k_, v_, pos, window);
  const auto acc = acc_type(q_);
  const Tensor q = prepared(q_, acc), k = prepared(k_, acc), v = prepared(v_, acc);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3);
  const std::vector<Tile> tiles = block_tiles(pos, window);
  const int64_t nt = static_cast<int64_t>(tiles.size());
  Tensor o = heads_view(q, acc), lse = at::empty({B, H, L}, q.options().dtype(acc));
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(acc, "block_attention_fwd_cpu", [&] {
    using T = scalar_t;
    const Tensor kt = transposed_heads<T>(k);
    const int64_t scores = max_tile_scores(tiles);
    at::parallel_for(0, B * H * nt, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> S(scores);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / nt, b = bh / H, hh = bh % H;
        fwd_tile_any<T>(avx2, head_of<T>(q, k, v, b, hh), kt.data_ptr<T>() + bh * d * L, L, d, static_cast<T>(scale),
                        tiles[task % nt], S.data(), o.data_ptr<T>() + b * o.stride(0) + hh * o.stride(1),
                        o.stride(2), lse.data_ptr<T>() + bh * L);
      }
    });
  });
  if (acc == q_.scalar_type()) return {o, lse};
  Tensor out = heads_view(q_, q_.scalar_type());
  out.copy_(o);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> block_attention_bwd_cpu(const Tensor& grad_o, const Tensor& q_, const Tensor& k_,
                                                           const Tensor& v_, const Tensor& o_, const Tensor& lse_,
                                                           const Tensor& pos, int64_t window, double scale) {
  check_inputs(q_, k_, v_, pos, window);
  TORCH_CHECK(grad_o.sizes() == q_.sizes() && o_.sizes() == q_.sizes(), "block_attention: grad_o and o must be ",
              q_.sizes(), ", got ", grad_o.sizes(), ", ", o_.sizes());
  TORCH_CHECK(lse_.dim() == 3 && lse_.sizes() == q_.sizes().slice(0, 3), "block_attention: lse must be (B, H, L), "
              "got ", lse_.sizes());
  const auto acc = acc_type(q_);
  const Tensor q = prepared(q_, acc), k = prepared(k_, acc), v = prepared(v_, acc);
  const Tensor go = prepared(grad_o, acc), lse = lse_.to(acc).contiguous();
  Tensor o = o_.to(acc);  // read once per row (delta): any row stride will do
  if (o.stride(3) != 1) o = o.contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3);
  const std::vector<Tile> tiles = block_tiles(pos, window);
  const int64_t scores = max_tile_scores(tiles);
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);  // q is contiguous
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(acc, "block_attention_bwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> kt(d * L), vt(d * L), S(scores), G(scores), delta(L);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, hh = bh % H;
        const Head<T> h = head_of<T>(q, k, v, b, hh);
        transpose(h.k, h.ldk, kt.data(), L, L, d);
        transpose(h.v, h.ldv, vt.data(), L, L, d);
        const int64_t g_off = b * dq.stride(0) + hh * dq.stride(1);
        bwd_head_any<T>(avx2, h, go.data_ptr<T>() + b * go.stride(0) + hh * go.stride(1), go.stride(2),
                        o.data_ptr<T>() + b * o.stride(0) + hh * o.stride(1), o.stride(2),
                        lse.data_ptr<T>() + bh * L, tiles, kt.data(), vt.data(), L, d, static_cast<T>(scale),
                        S.data(), G.data(), delta.data(), dq.data_ptr<T>() + g_off, dk.data_ptr<T>() + g_off,
                        dv.data_ptr<T>() + g_off, dq.stride(2));
      }
    });
  });
  const auto dtype = q_.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("block_attention_fwd", &block_attention_fwd_cpu);
  m.impl("block_attention_bwd", &block_attention_bwd_cpu);
}
