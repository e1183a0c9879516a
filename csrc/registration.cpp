// Schemas of every compiled hope_kernels op, in one place. Kernels attach with TORCH_LIBRARY_IMPL in the
// op family's file (csrc/<family>_cpu.cpp, csrc/cuda/<family>.cu). Autograd and fake (meta) kernels are
// registered from Python (hope_kernels/ops/<family>/__init__.py), where the public custom op lives.
#include <torch/library.h>

TORCH_LIBRARY(hope_kernels, m) {
  // l1_loss: per-timestep mean |pred - layer_norm(target)|, and its gradient coef[t] * sign(.)
  m.def("l1_per_step(Tensor pred, Tensor target, bool normalize_target, float eps) -> Tensor");
  m.def("l1_per_step_backward(Tensor pred, Tensor target, Tensor coef, bool normalize_target, float eps) -> Tensor");
  // CPU only (the eager lane): the forward also returns the signs of pred - target_n as bitmaps, (B, T, N, 2,
  // ceil(D / 8)) uint8, and the gradient (B, T, N, D) in `dtype` is built from them alone
  m.def("l1_per_step_signs(Tensor pred, Tensor target, bool normalize_target, float eps) -> (Tensor, Tensor)");
  m.def("l1_signs_backward(Tensor signs, Tensor coef, int D, ScalarType dtype) -> Tensor");
  // dgd: delta-gradient-descent memory (docs/design.md#dgd-memory); fwd returns (o, final state, chunk-start states),
  // bwd returns (dq, dk, dv, dalpha, deta, dM0). chunk: C++ CPU chunked; recurrent: CUDA token-serial.
  m.def("dgd_chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor? initial_state, "
        "int chunk_size) -> (Tensor, Tensor, Tensor)");
  m.def("dgd_chunk_bwd(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor states, Tensor do, "
        "Tensor dM, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dgd_recurrent_fwd(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor? initial_state, "
        "int chunk_size) -> (Tensor, Tensor, Tensor)");
  m.def("dgd_recurrent_bwd(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor states, Tensor do, "
        "Tensor dM, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // titans: chunked Titans memory; Ws, Ss are the chunk-boundary states (B, H, N+1, dk, dv) (linear), W1s, S1s
  // (B, H, N+1, D, dh) and W2s, S2s (B, H, N+1, dh, D) (MLP, M(x) = x + silu(x W1) W2)
  m.def("titans_linear_fwd(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor theta, Tensor W0, "
        "Tensor S0, int chunk_size) -> (Tensor, Tensor, Tensor)");
  m.def("titans_linear_bwd(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor theta, Tensor Ws, "
        "Tensor Ss, Tensor grad_o, Tensor grad_W, Tensor grad_S, int chunk_size) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("titans_mlp_fwd(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor theta, Tensor W1, Tensor W2, "
        "Tensor S1, Tensor S2, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("titans_mlp_bwd(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor theta, Tensor W1s, "
        "Tensor W2s, Tensor S1s, Tensor S2s, Tensor grad_o, Tensor grad_W1, Tensor grad_W2, Tensor grad_S1, "
        "Tensor grad_S2, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  // rope_attention: 3D RoPE rotation of x (..., L, d) by pos (L, 3) with per-column frequencies freqs (3, d),
  // and its transpose (the gradient)
  m.def("rope3d_fwd(Tensor x, Tensor pos, Tensor freqs) -> Tensor");
  m.def("rope3d_bwd(Tensor grad, Tensor pos, Tensor freqs) -> Tensor");
  // block-causal attention of rotated q, k, v (B, H, L, d) over the timesteps t = pos[:, 0] (window 0: none):
  // (o, lse) and (dq, dk, dv); C++ CPU (csrc/block_attention_cpu.cpp)
  m.def("block_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor pos, int window, float scale) -> (Tensor, Tensor)");
  m.def("block_attention_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor pos, "
        "int window, float scale) -> (Tensor, Tensor, Tensor)");
}
