// Schemas of every compiled hope_kernels op, in one place. Kernels attach with TORCH_LIBRARY_IMPL in the
// op family's file (csrc/<family>_cpu.cpp, csrc/cuda/<family>.cu). Autograd and fake (meta) kernels are
// registered from Python (hope_kernels/ops/<family>/__init__.py), where the public custom op lives.
#include <torch/library.h>

TORCH_LIBRARY(hope_kernels, m) {
  // l1_loss: per-timestep mean |pred - layer_norm(target)|, and its gradient coef[t] * sign(.)
  m.def("l1_per_step(Tensor pred, Tensor target, bool normalize_target, float eps) -> Tensor");
  m.def("l1_per_step_backward(Tensor pred, Tensor target, Tensor coef, bool normalize_target, float eps) -> Tensor");
  // rope_attention: 3D RoPE rotation of x (..., L, d) by pos (L, 3) with per-column frequencies freqs (3, d),
  // and its transpose (the gradient)
  m.def("rope3d_fwd(Tensor x, Tensor pos, Tensor freqs) -> Tensor");
  m.def("rope3d_bwd(Tensor grad, Tensor pos, Tensor freqs) -> Tensor");
}
