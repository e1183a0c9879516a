// Small row-major matrix products for the per-head CPU kernels (csrc/dgd_cpu.cpp, csrc/titans_cpu.cpp).
//
// Each kernel runs one task per (batch, head) and works on raw pointers to chunk-sized tiles. gemm_acc accumulates a
// product in register tiles of 4 rows x 2 vectors (GCC/clang vector extension; triangular operands skip their zero
// parts). The kernels that call it are compiled twice, for the baseline ISA (VB = 16-byte vectors) and for AVX2 + FMA
// (VB = 32), and pick one at run time with use_avx2() (x86 with GCC or clang; HOPE_KERNELS_NO_AVX2=1 forces the
// baseline build).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__)
#define HK_INLINE __attribute__((always_inline)) inline
#else
#define HK_INLINE inline
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

// Y (m, n) += A (m, p) B (p, n), row-major with leading dimensions, in 4 x (2 VB bytes) register tiles.
// lower_n: row r only needs columns < r (the others may hold anything afterwards);
// lower_p / upper_p: A[r, a] = 0 for a >= r / a <= r (the caller zero-fills it), so the inner sum stops at the
// tile's last row / starts after its first row.
template <int VB, typename T>
HK_INLINE void gemm_acc(T* __restrict Y, int64_t ldy, const T* __restrict A, int64_t lda, const T* __restrict B,
                        int64_t ldb, int64_t m, int64_t p, int64_t n, bool lower_n = false, bool lower_p = false,
                        bool upper_p = false) {
  constexpr int64_t MR = 4, NR = 2 * VB / sizeof(T);
  for (int64_t r = 0; r < m; r += MR) {
    const int64_t ne = lower_n ? std::min(n, r + MR) : n, pe = lower_p ? std::min(p, r + MR) : p;
    const int64_t pb = upper_p ? std::min(p, r + 1) : 0;
    if (r + MR > m) {
      for (int64_t i = r; i < m; ++i) accum_rows(Y + i * ldy, A + i * lda + pb, B + pb * ldb, ldb, pe - pb, ne);
      continue;
    }
    const T *a0 = A + r * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
    T* y[MR] = {Y + r * ldy, Y + (r + 1) * ldy, Y + (r + 2) * ldy, Y + (r + 3) * ldy};
    int64_t j = 0;
#if defined(__GNUC__)
    using V = typename Vec<T, VB>::type;
    constexpr int64_t W = NR / 2;
    for (; j + NR <= ne; j += NR) {
      V s[MR][2] = {};  // eight accumulators, kept in registers
      for (int64_t a = pb; a < pe; ++a) {
        V b0, b1;
        std::memcpy(&b0, B + a * ldb + j, sizeof(V));
        std::memcpy(&b1, B + a * ldb + j + W, sizeof(V));
        const T x0 = a0[a], x1 = a1[a], x2 = a2[a], x3 = a3[a];
        s[0][0] += x0 * b0, s[0][1] += x0 * b1;
        s[1][0] += x1 * b0, s[1][1] += x1 * b1;
        s[2][0] += x2 * b0, s[2][1] += x2 * b1;
        s[3][0] += x3 * b0, s[3][1] += x3 * b1;
      }
      for (int64_t i = 0; i < MR; ++i)
        for (int64_t h = 0; h < 2; ++h) {
          V cur;
          std::memcpy(&cur, y[i] + j + h * W, sizeof(V));
          cur += s[i][h];
          std::memcpy(y[i] + j + h * W, &cur, sizeof(V));
        }
    }
#endif
    if (j < ne)
      for (int64_t i = 0; i < MR; ++i)
        accum_rows(y[i] + j, A + (r + i) * lda + pb, B + pb * ldb + j, ldb, pe - pb, ne - j);
  }
}

template <typename T>
HK_INLINE void transpose(const T* __restrict src, int64_t lds, T* __restrict dst, int64_t ldd, int64_t rows,
                         int64_t cols) {  // dst[j, a] = src[a, j]
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + a] = src[a * lds + j];
}

template <typename T>
HK_INLINE void zero(T* y, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) std::fill(y + r * ld, y + r * ld + cols, T(0));
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
