// Fused L1 teacher-forcing / rollout loss on the CPU.
// One pass per row (b, t, n): the target row's layer-norm statistics are computed in registers/cache, then
// |pred - target_n| is summed (forward) or coef[t] * sign(pred - target_n) written (backward).
// Rows are split over threads with at::parallel_for; accumulation in float (float/half inputs) or double.
// `omp simd` lets the row reductions vectorize (it permits reassociating the float sums).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

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

// Layer-norm statistics of one row (two passes over a cached row: exact for large means).
template <typename scalar_t, typename acc_t>
inline void row_stats(const scalar_t* t, int64_t D, bool normalize, acc_t eps, acc_t& mean, acc_t& rstd) {
  if (!normalize) { mean = 0; rstd = 1; return; }
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += static_cast<acc_t>(t[d]);
  mean = s / D;
  acc_t v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t d = 0; d < D; ++d) { acc_t x = static_cast<acc_t>(t[d]) - mean; v += x * x; }
  rstd = acc_t(1) / std::sqrt(v / D + eps);
}

at::Tensor l1_per_step_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, bool normalize, double eps) {
  check_inputs(pred_in, target_in);
  auto pred = pred_in.contiguous();
  auto target = target_in.contiguous();
  const int64_t B = pred.size(0), T = pred.size(1), N = pred.size(2), D = pred.size(3);
  const auto out_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto row_sums = at::zeros({B, T, N}, pred.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_cpu", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    acc_t* out = row_sums.data_ptr<acc_t>();
    at::parallel_for(0, B * T * N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* pr = p + r * D;
        const scalar_t* tr = t + r * D;
        acc_t mean, rstd;
        row_stats<scalar_t, acc_t>(tr, D, normalize, static_cast<acc_t>(eps), mean, rstd);
        acc_t s = 0;
        _Pragma("omp simd reduction(+ : s)")
        for (int64_t d = 0; d < D; ++d)
          s += std::abs(static_cast<acc_t>(pr[d]) - (static_cast<acc_t>(tr[d]) - mean) * rstd);
        out[r] = s;
      }
    });
  });
  // (B, T, N) row sums -> (T,) means over b, n, d
  return row_sums.sum(at::IntArrayRef{0, 2}).div_(static_cast<double>(B * N * D));
}

at::Tensor l1_per_step_backward_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& coef_in,
                                    bool normalize, double eps) {
  check_inputs(pred_in, target_in);
  auto pred = pred_in.contiguous();
  auto target = target_in.contiguous();
  const int64_t B = pred.size(0), T = pred.size(1), N = pred.size(2), D = pred.size(3);
  TORCH_CHECK(coef_in.dim() == 1 && coef_in.size(0) == T, "coef must be (T,) = (", T, ",), got ", coef_in.sizes());
  auto grad = at::empty_like(pred);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "l1_per_step_backward_cpu", [&] {
    using acc_t = typename acc_of<scalar_t>::type;
    auto coef = coef_in.to(at::kCPU, c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* c = coef.data_ptr<acc_t>();
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, B * T * N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* pr = p + r * D;
        const scalar_t* tr = t + r * D;
        scalar_t* gr = g + r * D;
        const acc_t cr = c[(r / N) % T];
        acc_t mean, rstd;
        row_stats<scalar_t, acc_t>(tr, D, normalize, static_cast<acc_t>(eps), mean, rstd);
        _Pragma("omp simd")  // inside the dispatch macro: #pragma is not allowed there
        for (int64_t d = 0; d < D; ++d) {
          const acc_t diff = static_cast<acc_t>(pr[d]) - (static_cast<acc_t>(tr[d]) - mean) * rstd;
          // sign(0) = sign(NaN) = 0, exactly as autograd of abs (torch.sign(nan) is 0)
          gr[d] = static_cast<scalar_t>(diff > 0 ? cr : (diff < 0 ? -cr : acc_t(0)));
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("l1_per_step", &l1_per_step_cpu);
  m.impl("l1_per_step_backward", &l1_per_step_backward_cpu);
}
