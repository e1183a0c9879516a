// Fused L1 teacher-forcing / rollout loss on the CPU.
// One pass per row (b, t, n): the target row's layer-norm statistics are computed while the row sits in L1
// (two passes over the cached row: exact for large means), then |pred - target_n| is summed. Entry points:
//   l1_per_step            forward only (no gradient wanted; the torch.compile lane)
//   l1_per_step_signs      forward that also writes s = sign(pred - target_n) as int8, 1 byte per element: the
//                          eager lane saves s, and its backward reads s instead of pred and target
//   l1_signs_backward      grad = coef[t] * s
//   l1_per_step_backward   grad = coef[t] * sign(pred - target_n), recomputed (the torch.compile lane)
// Rows are split over threads with at::parallel_for; accumulation in float (float/half inputs) or double.
// Each row loop is compiled twice, for baseline x86-64 and for AVX2, and picked at run time from ATen's CPU
// capability (ATEN_CPU_CAPABILITY=default picks the baseline); `omp simd` lets the row loops vectorize (it
// permits reassociating the float sums). Not FMA: a fused p - (t - mean) * rstd rounds once where PyTorch's
// layer norm and difference round twice, and exact ties would no longer give 0.
// Gradients of 2 MiB or more are allocated 2 MiB-aligned and advised MADV_HUGEPAGE: a fresh 32 MiB gradient
// otherwise takes 8192 page faults on its first write, more time than the kernel's own memory traffic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
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

// 2 MiB-aligned blocks advised MADV_HUGEPAGE: the first write faults once per 2 MiB instead of once per 4 KiB
// (when transparent huge pages are in "madvise" or "always" mode; otherwise they behave as plain malloc).
struct HugePageAllocator final : c10::Allocator {
  static void release(void* p) { std::free(p); }
  c10::DataPtr allocate(size_t nbytes) override {
    void* p = nullptr;
    if (nbytes > 0) {
      const size_t cap = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
      p = std::aligned_alloc(kHugePage, cap);
      TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "hope_kernels: could not allocate ", nbytes, " bytes");
      madvise(p, cap, MADV_HUGEPAGE);
    }
    return {p, p, &release, at::Device(at::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
#endif

// An uninitialised contiguous tensor of like's sizes in `dtype`.
at::Tensor empty_output(const at::Tensor& like, at::ScalarType dtype) {
#ifdef __linux__
  if (like.numel() * static_cast<int64_t>(c10::elementSize(dtype)) >= static_cast<int64_t>(kHugePage)) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(like.sizes(), &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     c10::nullopt);
  }
#endif
  return at::empty(like.sizes(), like.options().dtype(dtype));
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

// sum_d |p - (t - mean) * rstd| over one row; with `signs`, also writes the sign of each difference
// (sign(0) = sign(NaN) = 0, exactly as autograd of abs: torch.sign(nan) is 0).
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE acc_t row_abs_sum(const scalar_t* p, const scalar_t* t, int8_t* signs, int64_t D, acc_t mean,
                                 acc_t rstd) {
  auto diff = [=](int64_t d) HOPE_L1_INLINE_LAMBDA {
    return static_cast<acc_t>(p[d]) - (static_cast<acc_t>(t[d]) - mean) * rstd;
  };
  if (signs == nullptr) return row_sum<acc_t>(D, [=](int64_t d) HOPE_L1_INLINE_LAMBDA { return std::abs(diff(d)); });
  return row_sum<acc_t>(D, [=](int64_t d) HOPE_L1_INLINE_LAMBDA {
    const acc_t x = diff(d);
    signs[d] = static_cast<int8_t>((x > 0) - (x < 0));
    return std::abs(x);
  });
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

// g = c * s over one row of saved signs.
template <typename scalar_t, typename acc_t>
HOPE_L1_INLINE void row_grad_from_signs(const int8_t* s, scalar_t* g, int64_t D, acc_t c) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) g[d] = static_cast<scalar_t>(s[d] > 0 ? c : (s[d] < 0 ? -c : acc_t(0)));
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

// The forward; `signs` is undefined or an int8 tensor of pred's shape that receives sign(pred - target_n).
at::Tensor l1_forward(const at::Tensor& pred_in, const at::Tensor& target_in, bool normalize, double eps,
                      const at::Tensor& signs) {
  check_inputs(pred_in, target_in);
  auto pred = pred_in.contiguous();
  auto target = target_in.contiguous();
  const int64_t B = pred.size(0), T = pred.size(1), N = pred.size(2), D = pred.size(3);
  const auto out_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto row_sums = at::empty({B, T, N}, pred.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_cpu", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    int8_t* s = signs.defined() ? signs.data_ptr<int8_t>() : nullptr;
    acc_t* out = row_sums.data_ptr<acc_t>();
    const acc_t eps_ = static_cast<acc_t>(eps);
    parallel_rows(B * T * N, D, [=](int64_t begin, int64_t end) HOPE_L1_INLINE_LAMBDA {
      for (int64_t r = begin; r < end; ++r) {
        acc_t mean, rstd;
        row_stats<scalar_t, acc_t>(t + r * D, D, normalize, eps_, mean, rstd);
        out[r] = row_abs_sum<scalar_t, acc_t>(p + r * D, t + r * D, s ? s + r * D : nullptr, D, mean, rstd);
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
  auto signs = at::empty(pred.sizes(), pred.options().dtype(at::kChar));
  auto per_step = l1_forward(pred, target, normalize, eps, signs);
  return {per_step, signs};
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
  auto grad = empty_output(pred, pred.scalar_type());
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

at::Tensor l1_signs_backward_cpu(const at::Tensor& signs_in, const at::Tensor& coef_in, at::ScalarType dtype) {
  TORCH_CHECK(signs_in.dim() == 4 && signs_in.scalar_type() == at::kChar, "signs must be (B, T, N, D) int8, got ",
              signs_in.sizes(), " ", signs_in.scalar_type());
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be floating point, got ", dtype);
  auto signs = signs_in.contiguous();
  const int64_t T = signs.size(1), N = signs.size(2), D = signs.size(3);
  auto grad = empty_output(signs, dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "l1_signs_backward_cpu", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    auto coef = coef_for<acc_t>(coef_in, T);
    const acc_t* c = coef.data_ptr<acc_t>();
    const int8_t* s = signs.data_ptr<int8_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    parallel_rows(signs.size(0) * T * N, D, [=](int64_t begin, int64_t end) HOPE_L1_INLINE_LAMBDA {
      for (int64_t r = begin; r < end; ++r)
        row_grad_from_signs<scalar_t, acc_t>(s + r * D, g + r * D, D, c[(r / N) % T]);
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
