// Fused L1 teacher-forcing / rollout loss on the CPU.
// One pass per row (b, t, n): the target row's layer-norm statistics are computed while the row sits in L1
// (two passes over the cached row: exact for large means), then |pred - target_n| is summed. Entry points:
//   l1_per_step            forward only (no gradient wanted; the torch.compile lane)
//   l1_per_step_signs      forward that also writes the signs of pred - target_n as two bitmaps per row, 2 bits
//                          per element: the eager lane saves them, and backward reads them instead of pred and
//                          target
//   l1_signs_backward      grad = coef[t] * sign, from the bitmaps
//   l1_per_step_backward   grad = coef[t] * sign(pred - target_n), recomputed (the torch.compile lane)
// Rows are split over threads with at::parallel_for; accumulation in float (float/half inputs) or double.
// Each row loop is compiled twice, for baseline x86-64 and for AVX2, and picked at run time from ATen's CPU
// capability (ATEN_CPU_CAPABILITY=default picks the baseline); `omp simd` lets the row loops vectorize (it
// permits reassociating the float sums). float rows with signs have AVX2 intrinsics of their own: the sign bits
// of 8 differences are two compares and two vmovmskps. Not FMA: a fused p - (t - mean) * rstd rounds once where
// PyTorch's layer norm and difference round twice, and exact ties would no longer give 0.
// Outputs of 2 MiB or more (the gradient) come from a small cache of 2 MiB-aligned blocks advised
// MADV_HUGEPAGE: a fresh 32 MiB gradient from malloc takes 8192 page faults on its first write, more time than
// the kernel's own memory traffic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HOPE_L1_X86 1
#define HOPE_L1_AVX2 __attribute__((target("avx2")))
#define HOPE_L1_INLINE __attribute__((always_inline)) inline
#define HOPE_L1_INLINE_LAMBDA __attribute__((always_inline))
#else
#define HOPE_L1_X86 0
#define HOPE_L1_INLINE inline
#define HOPE_L1_INLINE_LAMBDA
#endif

namespace {

template <typename acc_t>
struct acc_of { using type = float; };
template <>
struct acc_of<double> { using type = double; };

void check_inputs(const at::Tensor& pred, const at::Tensor& target) {
  TORCH_CHECK(pred.dim() == 4, "pred must be (B, T, N, D), got ", pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), "target must match pred ", pred.sizes(), ", got ", target.sizes());
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "pred and target dtypes differ: ", pred.scalar_type(),
              " vs ", target.scalar_type());
  TORCH_CHECK(at::isFloatingType(pred.scalar_type()), "pred must be floating point, got ", pred.scalar_type());
}

// ---- fresh outputs on huge pages ----

#ifdef __linux__
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kCachedBytes = size_t(128) << 20;

// 2 MiB-aligned blocks advised MADV_HUGEPAGE: their first write faults once per 2 MiB instead of once per 4 KiB
// (when transparent huge pages are in "madvise" or "always" mode; otherwise they behave as plain malloc).
// Freed blocks are kept for reuse, up to kCachedBytes in all: a training step frees the previous step's gradient
// and signs before it allocates the next of the same sizes, which then cost no page fault and no zeroing of
// fresh pages by the kernel.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &release, at::Device(at::kCPU)};
    const size_t cap = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = take(cap);
    if (block == nullptr) {
      void* p = std::aligned_alloc(kHugePage, cap);
      TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "hope_kernels: could not allocate ", nbytes, " bytes");
      madvise(p, cap, MADV_HUGEPAGE);
      block = new Block{p, cap};
    }
    return {block->p, block, &release, at::Device(at::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block { void* p; size_t cap; };
  struct Cache { std::mutex mu; std::vector<Block*> free; size_t bytes = 0; };

  static Cache& cache() {   // never destroyed: tensors may be freed after static destructors have run
    static Cache* c = new Cache;
    return *c;
  }
  static Block* take(size_t cap) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    for (size_t i = c.free.size(); i-- > 0;) {   // the most recently freed first
      if (c.free[i]->cap != cap) continue;
      Block* block = c.free[i];
      c.free.erase(c.free.begin() + static_cast<std::ptrdiff_t>(i));
      c.bytes -= cap;
      return block;
    }
    return nullptr;
  }
  static void release(void* ctx) {
    if (ctx == nullptr) return;
    auto* block = static_cast<Block*>(ctx);
    Cache& c = cache();
    {
      std::lock_guard<std::mutex> lock(c.mu);
      if (c.bytes + block->cap <= kCachedBytes) {
        c.free.push_back(block);
        c.bytes += block->cap;
        return;
      }
    }
    std::free(block->p);
    delete block;
  }
};
#endif

// An uninitialised contiguous CPU tensor.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
#ifdef __linux__
  if (c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype)) >=
      static_cast<int64_t>(kHugePage)) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     c10::nullopt);
  }
#endif
  return at::empty(sizes, at::TensorOptions().dtype(dtype));
}

// ---- row loops ----

// sum_d term(d) over one row, in kLanes partial sums: independent chains that the vectorised loop keeps in
// registers (4 AVX2 registers of floats), so the adds do not wait on each other's latency.
constexpr int64_t kLanes = 32;

template <typename acc_t, typename F>
HOPE_L1_INLINE acc_t row_sum(int64_t D, const F& term) {
  acc_t part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) part[j] += term(d + j);
  }
  for (int64_t j = 0; j < D - d; ++j) part[j] += term(d + j);
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) part[j] += part[j + w];
  }
  return part[0];
}

// Layer-norm statistics of one row.
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE void row_stats(const scalar_t* t, int64_t D, bool normalize, acc_t eps, acc_t& mean, acc_t& rstd) {
  if (!normalize) { mean = 0; rstd = 1; return; }
  const acc_t m = row_sum<acc_t>(D, [=](int64_t d) HOPE_L1_INLINE_LAMBDA { return static_cast<acc_t>(t[d]); }) / D;
  const acc_t v = row_sum<acc_t>(D, [=](int64_t d) HOPE_L1_INLINE_LAMBDA {
    const acc_t x = static_cast<acc_t>(t[d]) - m;
    return x * x;
  });
  mean = m;
  rstd = acc_t(1) / std::sqrt(v / D + eps);
}

// sum_d |p - (t - mean) * rstd| over one row.
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE acc_t row_abs_sum(const scalar_t* p, const scalar_t* t, int64_t D, acc_t mean, acc_t rstd) {
  return row_sum<acc_t>(D, [=](int64_t d) HOPE_L1_INLINE_LAMBDA {
    return std::abs(static_cast<acc_t>(p[d]) - (static_cast<acc_t>(t[d]) - mean) * rstd);
  });
}

// Signs are kept as two bitmaps per row, W = ceil(D / 8) bytes each: bit j of byte w of `up` is set where
// x = p - (t - mean) * rstd > 0 at d = 8 w + j, of `down` where x < 0. Neither for 0 and NaN: their gradient is
// 0, exactly as autograd of abs (torch.sign(nan) is 0).
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE acc_t row_abs_sum_bits(const scalar_t* p, const scalar_t* t, uint8_t* up, uint8_t* down,
                                      int64_t D, acc_t mean, acc_t rstd) {
  for (int64_t w = 0; 8 * w < D; ++w) {
    unsigned u = 0, v = 0;
    for (int64_t j = 0; j < 8 && 8 * w + j < D; ++j) {
      const int64_t d = 8 * w + j;
      const acc_t x = static_cast<acc_t>(p[d]) - (static_cast<acc_t>(t[d]) - mean) * rstd;
      u |= unsigned(x > 0) << j;
      v |= unsigned(x < 0) << j;
    }
    up[w] = static_cast<uint8_t>(u);
    down[w] = static_cast<uint8_t>(v);
  }
  return row_abs_sum<scalar_t, acc_t>(p, t, D, mean, rstd);
}

// g = c * sign over one row of bitmaps.
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE void row_grad_from_bits(const uint8_t* up, const uint8_t* down, scalar_t* g, int64_t D,
                                       acc_t c) {
  for (int64_t d = 0; d < D; ++d) {
    const bool u = (up[d >> 3] >> (d & 7)) & 1, v = (down[d >> 3] >> (d & 7)) & 1;
    g[d] = static_cast<scalar_t>(u ? c : (v ? -c : acc_t(0)));
  }
}

#if HOPE_L1_X86
// The same two loops for float rows on AVX2, 8 elements per step. Forward: one pass, |x| into four running
// sums, the bits from two compares and vmovmskps. Backward: each bitmap byte, broadcast and masked with the
// lane's bit, selects c, -c or 0.
HOPE_L1_AVX2 HOPE_L1_INLINE __m256 abs_sum_bits_step(const float* p, const float* t, uint8_t* up, uint8_t* down,
                                                    int64_t d, __m256 mean, __m256 rstd, __m256 acc) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(p + d), _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(t + d), mean),
                                                                      rstd));
  up[d >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ)));
  down[d >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ)));
  return _mm256_add_ps(acc, _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))));
}

HOPE_L1_AVX2 float row_abs_sum_bits_avx2(const float* p, const float* t, uint8_t* up, uint8_t* down,
                                         int64_t D, float mean, float rstd) {
  const __m256 m = _mm256_set1_ps(mean), r = _mm256_set1_ps(rstd);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    // the next row's 128 bytes at this offset into L2: its statistics passes then find it there, and memory is
    // read while this row computes, not only in its own passes
    _mm_prefetch(reinterpret_cast<const char*>(t + D + d), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(t + D + d + 16), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(p + D + d), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(p + D + d + 16), _MM_HINT_T1);
    a0 = abs_sum_bits_step(p, t, up, down, d, m, r, a0);
    a1 = abs_sum_bits_step(p, t, up, down, d + 8, m, r, a1);
    a2 = abs_sum_bits_step(p, t, up, down, d + 16, m, r, a2);
    a3 = abs_sum_bits_step(p, t, up, down, d + 24, m, r, a3);
  }
  for (; d + 8 <= D; d += 8) a0 = abs_sum_bits_step(p, t, up, down, d, m, r, a0);
  const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  if (d < D) {
    unsigned u = 0, v = 0;
    for (int64_t j = 0; d + j < D; ++j) {
      const float x = p[d + j] - (t[d + j] - mean) * rstd;
      s += std::abs(x);
      u |= unsigned(x > 0) << j;
      v |= unsigned(x < 0) << j;
    }
    up[d >> 3] = static_cast<uint8_t>(u);
    down[d >> 3] = static_cast<uint8_t>(v);
  }
  return s;
}

// lanes whose bit is set in `byte` (all ones), the others 0
HOPE_L1_AVX2 HOPE_L1_INLINE __m256 bit_mask(uint8_t byte) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), bit), bit));
}

HOPE_L1_AVX2 void row_grad_from_bits_avx2(const uint8_t* up, const uint8_t* down, float* g, int64_t D,
                                          float c) {
  const __m256 pos = _mm256_set1_ps(c), neg = _mm256_set1_ps(-c), zero = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 v = _mm256_blendv_ps(zero, neg, bit_mask(down[d >> 3]));
    _mm256_storeu_ps(g + d, _mm256_blendv_ps(v, pos, bit_mask(up[d >> 3])));
  }
  if (d < D) row_grad_from_bits<float, float>(up + (d >> 3), down + (d >> 3), g + d, D - d, c);
}
#endif

// The AVX2 float loops where they apply (`avx2`: ATen's capability allows it), the generic ones otherwise.
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE acc_t abs_sum_bits(bool, const scalar_t* p, const scalar_t* t, uint8_t* up, uint8_t* down,
                                  int64_t D, acc_t mean, acc_t rstd) {
  return row_abs_sum_bits<scalar_t, acc_t>(p, t, up, down, D, mean, rstd);
}
HOPE_L1_INLINE float abs_sum_bits(bool avx2, const float* p, const float* t, uint8_t* up, uint8_t* down,
                                  int64_t D, float mean, float rstd) {
#if HOPE_L1_X86
  if (avx2) return row_abs_sum_bits_avx2(p, t, up, down, D, mean, rstd);
#endif
  return row_abs_sum_bits<float, float>(p, t, up, down, D, mean, rstd);
}
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE void grad_from_bits(bool, const uint8_t* up, const uint8_t* down, scalar_t* g, int64_t D,
                                   acc_t c) {
  row_grad_from_bits<scalar_t, acc_t>(up, down, g, D, c);
}
HOPE_L1_INLINE void grad_from_bits(bool avx2, const uint8_t* up, const uint8_t* down, float* g, int64_t D,
                                   float c) {
#if HOPE_L1_X86
  if (avx2) return row_grad_from_bits_avx2(up, down, g, D, c);
#endif
  row_grad_from_bits<float, float>(up, down, g, D, c);
}

// g = c * sign(p - (t - mean) * rstd) over one row.
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE void row_grad(const scalar_t* p, const scalar_t* t, scalar_t* g, int64_t D, acc_t mean, acc_t rstd,
                             acc_t c) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const acc_t diff = static_cast<acc_t>(p[d]) - (static_cast<acc_t>(t[d]) - mean) * rstd;
    g[d] = static_cast<scalar_t>(diff > 0 ? c : (diff < 0 ? -c : acc_t(0)));
  }
}

// ---- one parallel loop over rows, compiled once per instruction set ----

bool use_avx2() {
#if HOPE_L1_X86
  static const bool yes = [] {
    const std::string cap = at::get_cpu_capability();
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2");
  }();
  return yes;
#else
  return false;
#endif
}

// f(begin, end) is inlined into both functions, so its row loops are vectorized once for each instruction set.
template <typename F>
void rows_baseline(const F& f, int64_t begin, int64_t end) { f(begin, end); }
#if HOPE_L1_X86
template <typename F>
HOPE_L1_AVX2 void rows_avx2(const F& f, int64_t begin, int64_t end) { f(begin, end); }
#endif

// Rows [0, rows) of length D in chunks of about at::internal::GRAIN_SIZE elements per thread.
template <typename F>
void parallel_rows(int64_t rows, int64_t D, const F& f) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
  const bool avx2 = use_avx2();
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
#if HOPE_L1_X86
    if (avx2) return rows_avx2(f, begin, end);
#endif
    rows_baseline(f, begin, end);
  });
}

// ---- ops ----

// (B, T, N) row sums -> (T,) means over b, n, d
at::Tensor per_step_means(const at::Tensor& row_sums, int64_t D) {
  return row_sums.sum(at::IntArrayRef{0, 2}).div_(static_cast<double>(row_sums.size(0) * row_sums.size(2) * D));
}

// The forward; with `bits` (B, T, N, 2, ceil(D / 8)) uint8 defined, also the sign bitmaps of every row.
at::Tensor l1_forward(const at::Tensor& pred_in, const at::Tensor& target_in, bool normalize, double eps,
                      const at::Tensor& bits) {
  check_inputs(pred_in, target_in);
  auto pred = pred_in.contiguous();
  auto target = target_in.contiguous();
  const int64_t B = pred.size(0), T = pred.size(1), N = pred.size(2), D = pred.size(3), W = (D + 7) / 8;
  const auto out_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto row_sums = at::empty({B, T, N}, pred.options().dtype(out_dtype));
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_cpu", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    uint8_t* b = bits.defined() ? bits.data_ptr<uint8_t>() : nullptr;
    acc_t* out = row_sums.data_ptr<acc_t>();
    const acc_t eps_ = static_cast<acc_t>(eps);
    parallel_rows(B * T * N, D, [=](int64_t begin, int64_t end) HOPE_L1_INLINE_LAMBDA {
      for (int64_t r = begin; r < end; ++r) {
        acc_t mean, rstd;
        row_stats<scalar_t, acc_t>(t + r * D, D, normalize, eps_, mean, rstd);
        out[r] = b ? abs_sum_bits(avx2, p + r * D, t + r * D, b + 2 * W * r, b + 2 * W * r + W, D, mean, rstd)
                   : row_abs_sum<scalar_t, acc_t>(p + r * D, t + r * D, D, mean, rstd);
      }
    });
  });
  return per_step_means(row_sums, D);
}

at::Tensor l1_per_step_cpu(const at::Tensor& pred, const at::Tensor& target, bool normalize, double eps) {
  return l1_forward(pred, target, normalize, eps, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> l1_per_step_signs_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                         bool normalize, double eps) {
  check_inputs(pred, target);
  auto bits = empty_output({pred.size(0), pred.size(1), pred.size(2), 2, (pred.size(3) + 7) / 8}, at::kByte);
  auto per_step = l1_forward(pred, target, normalize, eps, bits);
  return {per_step, bits};
}

// coef (T,) in the accumulation type, on the CPU
template <typename acc_t>
at::Tensor coef_for(const at::Tensor& coef_in, int64_t T) {
  TORCH_CHECK(coef_in.dim() == 1 && coef_in.size(0) == T, "coef must be (T,) = (", T, ",), got ", coef_in.sizes());
  return coef_in.to(at::kCPU, c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

at::Tensor l1_per_step_backward_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& coef_in,
                                    bool normalize, double eps) {
  check_inputs(pred_in, target_in);
  auto pred = pred_in.contiguous();
  auto target = target_in.contiguous();
  const int64_t B = pred.size(0), T = pred.size(1), N = pred.size(2), D = pred.size(3);
  auto grad = empty_output(pred.sizes(), pred.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_backward_cpu", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    auto coef = coef_for<acc_t>(coef_in, T);
    const acc_t* c = coef.data_ptr<acc_t>();
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t eps_ = static_cast<acc_t>(eps);
    parallel_rows(B * T * N, D, [=](int64_t begin, int64_t end) HOPE_L1_INLINE_LAMBDA {
      for (int64_t r = begin; r < end; ++r) {
        acc_t mean, rstd;
        row_stats<scalar_t, acc_t>(t + r * D, D, normalize, eps_, mean, rstd);
        row_grad<scalar_t, acc_t>(p + r * D, t + r * D, g + r * D, D, mean, rstd, c[(r / N) % T]);
      }
    });
  });
  return grad;
}

at::Tensor l1_signs_backward_cpu(const at::Tensor& bits_in, const at::Tensor& coef_in, int64_t D,
                                 at::ScalarType dtype) {
  TORCH_CHECK(D >= 1 && bits_in.dim() == 5 && bits_in.size(3) == 2 && bits_in.size(4) == (D + 7) / 8 &&
                  bits_in.scalar_type() == at::kByte,
              "signs must be (B, T, N, 2, ceil(D / 8)) uint8 with D = ", D, ", got ", bits_in.sizes(), " ",
              bits_in.scalar_type());
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be floating point, got ", dtype);
  auto bits = bits_in.contiguous();
  const int64_t T = bits.size(1), N = bits.size(2), W = bits.size(4);
  auto grad = empty_output({bits.size(0), T, N, D}, dtype);
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "l1_signs_backward_cpu", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    auto coef = coef_for<acc_t>(coef_in, T);
    const acc_t* c = coef.data_ptr<acc_t>();
    const uint8_t* b = bits.data_ptr<uint8_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    parallel_rows(bits.size(0) * T * N, D, [=](int64_t begin, int64_t end) HOPE_L1_INLINE_LAMBDA {
      for (int64_t r = begin; r < end; ++r)
        grad_from_bits(avx2, b + 2 * W * r, b + 2 * W * r + W, g + r * D, D, c[(r / N) % T]);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("l1_per_step", &l1_per_step_cpu);
  m.impl("l1_per_step_signs", &l1_per_step_signs_cpu);
  m.impl("l1_per_step_backward", &l1_per_step_backward_cpu);
  m.impl("l1_signs_backward", &l1_signs_backward_cpu);
}
