// Small row-major matrix products for the per-head CPU kernels (csrc/dgd_cpu.cpp, csrc/titans_*_cpu.cpp).
//
// Each kernel runs one task per (batch, head) and works on raw pointers to chunk-sized tiles. gemm_acc accumulates a
// product in register tiles of 6 (or 4) rows x 2 vectors (GCC/clang vector extension; triangular operands skip their
// zero parts), gemm_tn_acc the same with the left operand read transposed in place. The kernels that call it are
// compiled twice, for the baseline ISA (VB = 16-byte vectors) and for AVX2 + FMA
// (VB = 32), and pick one at run time with use_avx2() (x86 with GCC or clang; HOPE_KERNELS_NO_AVX2=1 forces the
// baseline build).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__)
#define HK_INLINE __attribute__((always_inline)) inline
#define HK_NOINLINE __attribute__((noinline))
#else
#define HK_INLINE inline
#define HK_NOINLINE
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#define HK_AVX2_CLONE 1
#endif

namespace hk_cpu {

template <typename T>
HK_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// y[0:n] += sum_{a < m} coef[a] * rows[a * stride : a * stride + n], four rows per pass over y.
template <typename T>
HK_INLINE void accum_rows(T* __restrict y, const T* __restrict coef, const T* __restrict rows, int64_t stride,
                          int64_t m, int64_t n) {
  int64_t a = 0;
  for (; a + 4 <= m; a += 4) {
    const T c0 = coef[a], c1 = coef[a + 1], c2 = coef[a + 2], c3 = coef[a + 3];
    const T *r0 = rows + a * stride, *r1 = r0 + stride, *r2 = r1 + stride, *r3 = r2 + stride;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] += c0 * r0[j] + c1 * r1[j] + c2 * r2[j] + c3 * r3[j];
  }
  for (; a < m; ++a) {
    const T c0 = coef[a];
    const T* r0 = rows + a * stride;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] += c0 * r0[j];
  }
}

#if defined(__GNUC__)
// VB-byte vectors (GCC/clang vector extension): 32 in the AVX2 build, 16 (SSE2 / NEON) in the baseline one.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
};
#endif

// Rows r .. r+MR-1 of Y (m, n) += A B over a in [pb, pe) and columns [0, ne): register tiles of MR rows x 2 VB-byte
// vectors (2 MR accumulators), the last columns (fewer than two vectors) by accum_rows. TA: A is stored transposed,
// A[i, a] = At[a * lda + i], so a tile's MR coefficients sit side by side in one row of At.
template <int VB, int MR, bool TA, typename T>
HK_INLINE void gemm_rows(T* __restrict Y, int64_t ldy, const T* __restrict A, int64_t lda, const T* __restrict B,
                         int64_t ldb, int64_t r, int64_t pb, int64_t pe, int64_t ne) {
  int64_t j = 0;
#if defined(__GNUC__)
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = VB / sizeof(T), NR = 2 * W;
  for (; j + NR <= ne; j += NR) {
    V s[MR][2] = {};  // kept in registers (12 of the 16 AVX2 registers at MR = 6)
    for (int64_t a = pb; a < pe; ++a) {
      V b0, b1;
      std::memcpy(&b0, B + a * ldb + j, sizeof(V));
      std::memcpy(&b1, B + a * ldb + j + W, sizeof(V));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const T x = TA ? A[a * lda + r + i] : A[(r + i) * lda + a];
        s[i][0] += x * b0;
        s[i][1] += x * b1;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < 2; ++h) {
        T* y = Y + (r + i) * ldy + j + h * W;
        V cur;
        std::memcpy(&cur, y, sizeof(V));
        cur += s[i][h];
        std::memcpy(y, &cur, sizeof(V));
      }
  }
#endif
  if (j < ne)
    for (int64_t i = r; i < r + MR; ++i) {
      if (TA) {
        T* yi = Y + i * ldy + j;
        for (int64_t a = pb; a < pe; ++a) {
          const T x = A[a * lda + i];
          const T* b = B + a * ldb + j;
#pragma omp simd
          for (int64_t c = 0; c < ne - j; ++c) yi[c] += x * b[c];
        }
      } else {
        accum_rows(Y + i * ldy + j, A + i * lda + pb, B + pb * ldb + j, ldb, pe - pb, ne - j);
      }
    }
}

// Y (m, n) += A (m, p) B (p, n), row-major with leading dimensions, in tiles of 6 (then 4) rows x 2 VB-byte vectors
// (gemm_rows; rows left over by the tiles, fewer than 4, by accum_rows).
// lower_n: row r only needs columns <= r (the others may hold anything afterwards);
// lower_p / upper_p: A[r, a] = 0 for a > r / a <= r (the caller zero-fills it), so the inner sum stops at the
// tile's last row / starts after its first row.
template <int VB, typename T>
HK_INLINE void gemm_acc_body(T* __restrict Y, int64_t ldy, const T* __restrict A, int64_t lda, const T* __restrict B,
                             int64_t ldb, int64_t m, int64_t p, int64_t n, bool lower_n, bool lower_p, bool upper_p) {
  int64_t r = 0;
  for (; r + 6 <= m; r += 6)
    gemm_rows<VB, 6, false>(Y, ldy, A, lda, B, ldb, r, upper_p ? std::min(p, r + 1) : 0,
                            lower_p ? std::min(p, r + 6) : p, lower_n ? std::min(n, r + 6) : n);
  for (; r + 4 <= m; r += 4)
    gemm_rows<VB, 4, false>(Y, ldy, A, lda, B, ldb, r, upper_p ? std::min(p, r + 1) : 0,
                            lower_p ? std::min(p, r + 4) : p, lower_n ? std::min(n, r + 4) : n);
  for (; r < m; ++r) {
    const int64_t pb = upper_p ? std::min(p, r + 1) : 0, pe = lower_p ? std::min(p, r + 1) : p;
    accum_rows(Y + r * ldy, A + r * lda + pb, B + pb * ldb, ldb, pe - pb, lower_n ? std::min(n, r + 1) : n);
  }
}

// Y (m, n) += A^T B with A stored (p, m) row-major (lda) and B (p, n): gemm_acc's tiles with a tile's coefficients
// read side by side from one row of A (no transposed copy of A). upper: A[a, i] = 0 for a < i (A^T upper triangular
// with its diagonal, e.g. A lower triangular), so the sum of a tile of rows r.. starts at a = r.
template <int VB, typename T>
HK_INLINE void gemm_tn_acc_body(T* __restrict Y, int64_t ldy, const T* __restrict A, int64_t lda,
                                const T* __restrict B, int64_t ldb, int64_t m, int64_t p, int64_t n, bool upper) {
  int64_t r = 0;
  for (; r + 6 <= m; r += 6) gemm_rows<VB, 6, true>(Y, ldy, A, lda, B, ldb, r, upper ? std::min(p, r) : 0, p, n);
  for (; r + 4 <= m; r += 4) gemm_rows<VB, 4, true>(Y, ldy, A, lda, B, ldb, r, upper ? std::min(p, r) : 0, p, n);
  for (; r < m; ++r) gemm_rows<VB, 1, true>(Y, ldy, A, lda, B, ldb, r, upper ? std::min(p, r) : 0, p, n);
}

// gemm_acc and gemm_tn_acc are compiled once per (VB, T), out of line (VB = 32 with target("avx2,fma")): the per-head
// kernels call them dozens of times per chunk, and inlined at every call they made those kernels hundreds of KB of
// code.
#define HK_GEMM_PARAMS                                                                                         \
  T *__restrict Y, int64_t ldy, const T *__restrict A, int64_t lda, const T *__restrict B, int64_t ldb, int64_t m, \
      int64_t p, int64_t n
#define HK_GEMM_ARGS Y, ldy, A, lda, B, ldb, m, p, n
template <typename T>
HK_NOINLINE void gemm_acc_v16(HK_GEMM_PARAMS, bool lower_n, bool lower_p, bool upper_p) {
  gemm_acc_body<16>(HK_GEMM_ARGS, lower_n, lower_p, upper_p);
}
template <typename T>
HK_NOINLINE void gemm_tn_acc_v16(HK_GEMM_PARAMS, bool upper) { gemm_tn_acc_body<16>(HK_GEMM_ARGS, upper); }
#ifdef HK_AVX2_CLONE
template <typename T>
HK_NOINLINE __attribute__((target("avx2,fma"))) void gemm_acc_v32(HK_GEMM_PARAMS, bool lower_n, bool lower_p,
                                                                   bool upper_p) {
  gemm_acc_body<32>(HK_GEMM_ARGS, lower_n, lower_p, upper_p);
}
template <typename T>
HK_NOINLINE __attribute__((target("avx2,fma"))) void gemm_tn_acc_v32(HK_GEMM_PARAMS, bool upper) {
  gemm_tn_acc_body<32>(HK_GEMM_ARGS, upper);
}
#endif

template <int VB, typename T>
HK_INLINE void gemm_acc(HK_GEMM_PARAMS, bool lower_n = false, bool lower_p = false, bool upper_p = false) {
#ifdef HK_AVX2_CLONE
  if constexpr (VB == 32) return gemm_acc_v32<T>(HK_GEMM_ARGS, lower_n, lower_p, upper_p);
#endif
  static_assert(VB == 16 || VB == 32, "vector bytes: 16 (baseline) or 32 (AVX2)");
  gemm_acc_v16<T>(HK_GEMM_ARGS, lower_n, lower_p, upper_p);
}

template <int VB, typename T>
HK_INLINE void gemm_tn_acc(HK_GEMM_PARAMS, bool upper = false) {
#ifdef HK_AVX2_CLONE
  if constexpr (VB == 32) return gemm_tn_acc_v32<T>(HK_GEMM_ARGS, upper);
#endif
  gemm_tn_acc_v16<T>(HK_GEMM_ARGS, upper);
}
#undef HK_GEMM_PARAMS
#undef HK_GEMM_ARGS

// dst[j, a] = src[a, j] for a < rows, j < cols; eight source rows at a time (each destination row is written in
// runs of eight, the eight source rows stay in cache).
template <typename T>
HK_INLINE void transpose(const T* __restrict src, int64_t lds, T* __restrict dst, int64_t ldd, int64_t rows,
                         int64_t cols) {
  constexpr int64_t kRows = 8;
  int64_t a0 = 0;
  for (; a0 + kRows <= rows; a0 += kRows) {
    const T* s = src + a0 * lds;
    for (int64_t j = 0; j < cols; ++j) {
      T* d = dst + j * ldd + a0;
      for (int64_t a = 0; a < kRows; ++a) d[a] = s[a * lds + j];
    }
  }
  for (int64_t a = a0; a < rows; ++a)
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + a] = src[a * lds + j];
}

template <typename T>
HK_INLINE void zero(T* y, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) std::fill(y + r * ld, y + r * ld + cols, T(0));
}

// HK_ISA_CLONES(name, body, PARAMS, ARGS) defines name<T>(bool avx2, PARAMS): body<32>(ARGS) compiled for AVX2 + FMA
// where the compiler can target it and avx2 is true (use_avx2()), else body<16>(ARGS) for the baseline ISA. PARAMS
// and ARGS are macros naming the parameters (in terms of T) and the arguments, so that their commas pass through.
#ifdef HK_AVX2_CLONE
#define HK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define HK_AVX2_ON(avx2) (avx2)
#else  // no AVX2 clone: the <32> instance is compiled for the baseline ISA and never called
#define HK_TARGET_AVX2
#define HK_AVX2_ON(avx2) false
#endif
#define HK_ISA_CLONES(name, body, PARAMS, ARGS)                        \
  template <typename T>                                                \
  void name##_baseline(PARAMS) {                                       \
    body<16>(ARGS);                                                    \
  }                                                                    \
  template <typename T>                                                \
  HK_TARGET_AVX2 void name##_avx2(PARAMS) {                            \
    body<32>(ARGS);                                                    \
  }                                                                    \
  template <typename T>                                                \
  void name(bool avx2, PARAMS) {                                       \
    if (HK_AVX2_ON(avx2)) return name##_avx2<T>(ARGS);                 \
    name##_baseline<T>(ARGS);                                          \
  }

// AVX2 clone when the CPU has AVX2 + FMA, unless HOPE_KERNELS_NO_AVX2=1 (tests run the baseline build with it).
inline bool use_avx2() {
#ifdef HK_AVX2_CLONE
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* off = std::getenv("HOPE_KERNELS_NO_AVX2");
  return cpu && !(off != nullptr && off[0] == '1');
#else
  return false;
#endif
}

}  // namespace hk_cpu
