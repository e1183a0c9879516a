// 3D RoPE rotation on CUDA (docs/design.md#rope-attention), forward and backward; composed with PyTorch SDPA as
// the `cuda` backend of rope_attention. cos/sin tables (L, d) are built once per call with ATen elementwise ops (exact
// angles pos * omega, accurate sin/cos even under --use_fast_math); one thread then rotates one column pair
// (r, l, j) of x viewed as (R, L, d):
//   forward   y[2j] = x[2j] C[2j] - x[2j+1] S[2j]        y[2j+1] = x[2j+1] C[2j+1] + x[2j] S[2j+1]
//   backward  dx[2j] = g[2j] C[2j] + g[2j+1] S[2j+1]     dx[2j+1] = g[2j+1] C[2j+1] - g[2j] S[2j]   (transpose)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

template <typename T>
struct rope_cuda_acc { using type = float; };
template <>
struct rope_cuda_acc<double> { using type = double; };

template <typename scalar_t, typename acc_t, bool BACKWARD>
__global__ void rope3d_pairs_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ C,
                                    const acc_t* __restrict__ S, scalar_t* __restrict__ y, int64_t pairs,
                                    int64_t L, int64_t half) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int64_t j = i % half;
  const int64_t l = (i / half) % L;
  const int64_t c = 2 * j;
  const int64_t t = l * 2 * half + c;  // table offset
  const acc_t x0 = static_cast<acc_t>(x[2 * i]), x1 = static_cast<acc_t>(x[2 * i + 1]);
  if (BACKWARD) {
    y[2 * i] = static_cast<scalar_t>(x0 * C[t] + x1 * S[t + 1]);
    y[2 * i + 1] = static_cast<scalar_t>(x1 * C[t + 1] - x0 * S[t]);
  } else {
    y[2 * i] = static_cast<scalar_t>(x0 * C[t] - x1 * S[t]);
    y[2 * i + 1] = static_cast<scalar_t>(x1 * C[t + 1] + x0 * S[t + 1]);
  }
}

at::Tensor rope3d_apply_cuda(const at::Tensor& x_in, const at::Tensor& pos, const at::Tensor& freqs, bool backward) {
  TORCH_CHECK(x_in.is_cuda() && pos.is_cuda() && freqs.is_cuda(), "x, pos and freqs must be CUDA tensors");
  TORCH_CHECK(x_in.dim() >= 2, "x must be (..., L, d), got ", x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "x must be floating point, got ", x_in.scalar_type());
  const int64_t L = x_in.size(-2), d = x_in.size(-1);
  TORCH_CHECK(d % 2 == 0, "head_dim d must be even, got ", d);
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == L && pos.size(1) == 3, "pos must be (L, 3) = (", L, ", 3), got ",
              pos.sizes());
  TORCH_CHECK(freqs.dim() == 2 && freqs.size(0) == 3 && freqs.size(1) == d, "freqs must be (3, d) = (3, ", d,
              "), got ", freqs.sizes());
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto out = at::empty_like(x);
  const int64_t pairs = x.numel() / 2;
  if (pairs == 0) return out;
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // angle[l, c] = sum_s pos[l, s] * freqs[s, c]: one non-zero term per column, so the sum is exact
  auto angle = (pos.to(acc_type).unsqueeze(-1) * freqs.to(acc_type).unsqueeze(0)).sum(1);
  auto C = angle.cos().contiguous(), S = angle.sin().contiguous();
  const int threads = 256;
  const int64_t blocks = (pairs + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope3d_cuda", [&] {
    using acc_t = typename rope_cuda_acc<scalar_t>::type;
    if (backward) {
      rope3d_pairs_kernel<scalar_t, acc_t, true><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), C.data_ptr<acc_t>(), S.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), pairs, L,
          d / 2);
    } else {
      rope3d_pairs_kernel<scalar_t, acc_t, false><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), C.data_ptr<acc_t>(), S.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), pairs, L,
          d / 2);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor rope3d_fwd_cuda(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& freqs) {
  return rope3d_apply_cuda(x, pos, freqs, false);
}

at::Tensor rope3d_bwd_cuda(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& freqs) {
  return rope3d_apply_cuda(grad, pos, freqs, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(hope_kernels, CUDA, m) {
  m.impl("rope3d_fwd", &rope3d_fwd_cuda);
  m.impl("rope3d_bwd", &rope3d_bwd_cuda);
}
