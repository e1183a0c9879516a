// 3D RoPE rotation on the CPU (docs/design.md#rope-attention), forward and backward.
// The angle of column c at token l is A[l, c] = sum_s pos[l, s] * freqs[s, c] (freqs (3, d) is built in Python
// and encodes the slice layout and the rope_compat mode). cos/sin tables (L, d) are computed once per call,
// then every row (r, l) of x viewed as (R, L, d) is rotated pair by pair:
//   forward   y[2j] = x[2j] C[2j] - x[2j+1] S[2j]        y[2j+1] = x[2j+1] C[2j+1] + x[2j] S[2j+1]
//   backward  dx[2j] = g[2j] C[2j] + g[2j+1] S[2j+1]     dx[2j+1] = g[2j+1] C[2j+1] - g[2j] S[2j]   (transpose)
// Arithmetic in float (float/half/bfloat16 inputs) or double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace {

template <typename T>
struct rope_acc { using type = float; };
template <>
struct rope_acc<double> { using type = double; };

void check_rope_inputs(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& freqs) {
  TORCH_CHECK(x.dim() >= 2, "x must be (..., L, d), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  const int64_t L = x.size(-2), d = x.size(-1);
  TORCH_CHECK(d % 2 == 0, "head_dim d must be even, got ", d);
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == L && pos.size(1) == 3, "pos must be (L, 3) = (", L, ", 3), got ",
              pos.sizes());
  TORCH_CHECK(!at::isFloatingType(pos.scalar_type()), "pos must be an integer tensor, got ", pos.scalar_type());
  TORCH_CHECK(freqs.dim() == 2 && freqs.size(0) == 3 && freqs.size(1) == d, "freqs must be (3, d) = (3, ", d,
              "), got ", freqs.sizes());
  TORCH_CHECK(x.device() == pos.device() && x.device() == freqs.device(), "x, pos and freqs must share a device");
}

template <typename acc_t>
void tables(const at::Tensor& pos_in, const at::Tensor& freqs_in, int64_t L, int64_t d, at::Tensor& cos_t,
            at::Tensor& sin_t) {
  at::Tensor pos = pos_in.to(at::kLong).contiguous();
  at::Tensor freqs = freqs_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const acc_t* f = freqs.data_ptr<acc_t>();
  acc_t* C = cos_t.data_ptr<acc_t>();
  acc_t* S = sin_t.data_ptr<acc_t>();
  at::parallel_for(0, L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const acc_t p0 = static_cast<acc_t>(p[3 * l]), p1 = static_cast<acc_t>(p[3 * l + 1]),
                  p2 = static_cast<acc_t>(p[3 * l + 2]);
      for (int64_t c = 0; c < d; ++c) {
        // one of the three frequencies is non-zero per column: the sum is exact
        const acc_t a = p0 * f[c] + p1 * f[d + c] + p2 * f[2 * d + c];
        C[l * d + c] = std::cos(a);
        S[l * d + c] = std::sin(a);
      }
    }
  });
}

at::Tensor rope3d_apply_cpu(const at::Tensor& x_in, const at::Tensor& pos, const at::Tensor& freqs, bool backward) {
  check_rope_inputs(x_in, pos, freqs);
  auto x = x_in.contiguous();
  const int64_t L = x.size(-2), d = x.size(-1);
  const int64_t rows = L == 0 ? 0 : x.numel() / d;
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope3d_cpu", [&] {
    using acc_t = typename rope_acc<scalar_t>::type;
    auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto cos_t = at::empty({L, d}, opts), sin_t = at::empty({L, d}, opts);
    tables<acc_t>(pos, freqs, L, d, cos_t, sin_t);
    const acc_t* C = cos_t.data_ptr<acc_t>();
    const acc_t* S = sin_t.data_ptr<acc_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t sgn = backward ? acc_t(-1) : acc_t(1);
    at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t l = r % L;
        const scalar_t* xr = xp + r * d;
        scalar_t* yr = op + r * d;
        const acc_t* Cl = C + l * d;
        const acc_t* Sl = S + l * d;
        for (int64_t c = 0; c < d; c += 2) {
          const acc_t x0 = static_cast<acc_t>(xr[c]), x1 = static_cast<acc_t>(xr[c + 1]);
          // forward uses the sine of its own column, backward the sine of the partner column
          const acc_t s0 = backward ? Sl[c + 1] : Sl[c];
          const acc_t s1 = backward ? Sl[c] : Sl[c + 1];
          yr[c] = static_cast<scalar_t>(x0 * Cl[c] - sgn * x1 * s0);
          yr[c + 1] = static_cast<scalar_t>(x1 * Cl[c + 1] + sgn * x0 * s1);
        }
      }
    });
  });
  return out;
}

at::Tensor rope3d_fwd_cpu(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& freqs) {
  return rope3d_apply_cpu(x, pos, freqs, false);
}

at::Tensor rope3d_bwd_cpu(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& freqs) {
  return rope3d_apply_cpu(grad, pos, freqs, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CPU, m) {
  m.impl("rope3d_fwd", &rope3d_fwd_cpu);
  m.impl("rope3d_bwd", &rope3d_bwd_cpu);
}
