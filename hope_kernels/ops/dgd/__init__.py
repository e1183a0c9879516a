"""HOPE's delta-gradient-descent memory (docs/design.md#dgd-memory): public function, custom ops and dispatcher.

    o, final_M = dgd_memory(q, k, v, alpha, eta, chunk_size=16, initial_state=M0, output_final_state=True)

q, k (B, H, L, dk); v (B, H, L, dv); alpha in (0, 1] and eta >= 0, both (B, H, L); M (B, H, dk, dv).
Semantics and the chunked form: reference.py; backward derivation: docs/dgd.md.

Backends: reference (eager chunked PyTorch, autograd), cpu (compiled C++ chunked), triton (chunked, any chunk
size as sub-chunks; dk, dv <= 64, larger heads go to cuda under auto),
cuda (fused token-serial recurrent). The fast paths go through the custom op `hope_kernels::dgd_memory`
(returns o, the final state and the per-chunk start states saved for backward) whose backward is the custom
op `hope_kernels::dgd_memory_backward`; both have fake kernels, so they trace under torch.compile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from hope_kernels.dispatch import needs_backward, resolve_backend
from hope_kernels.ops.checks import accum_dtype, check_same_device, check_same_dtype, check_tensor, reads_values
from hope_kernels.ops.dgd.reference import dgd_memory_chunked_reference, dgd_memory_token_loop

__all__ = ["dgd_memory", "dgd_memory_token_loop", "dgd_memory_chunked_reference"]

_OP = "dgd_memory"
SUPPORTED = ("reference", "cpu", "triton", "cuda")
# the Triton kernels hold (dk, dv) state tiles in registers: larger heads spill (ptxas report in triton.py)
TRITON_MAX_HEAD_DIM = 64


def _validate(q, k, v, alpha, eta, chunk_size, initial_state) -> None:
    check_tensor("q", q, ndim=4, shape_doc="(B, H, L, dk)")
    check_tensor("k", k, ndim=4, shape_doc="(B, H, L, dk)")
    check_tensor("v", v, ndim=4, shape_doc="(B, H, L, dv)")
    B, H, L, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must be (B, H, L, dk) = {tuple(q.shape)} like q, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, H, L, dv) = ({B}, {H}, {L}, dv), got {tuple(v.shape)}")
    for name, g in (("alpha", alpha), ("eta", eta)):
        check_tensor(name, g, ndim=3, shape_doc=f"(B, H, L) = ({B}, {H}, {L})")
        if g.shape != q.shape[:3]:
            raise ValueError(f"{name} must be (B, H, L) = ({B}, {H}, {L}), got {tuple(g.shape)}")
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_same_device(("q", "k", "v", "alpha", "eta", "initial_state"), (q, k, v, alpha, eta, initial_state))
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, shape_doc=f"(B, H, dk, dv) = ({B}, {H}, {dk}, {v.shape[3]})")
        if initial_state.shape != (B, H, dk, v.shape[3]):
            raise ValueError(f"initial_state must be (B, H, dk, dv) = ({B}, {H}, {dk}, {v.shape[3]}), "
                             f"got {tuple(initial_state.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if L < 1 or dk < 1 or v.shape[3] < 1:
        raise ValueError(f"L, dk and dv must be >= 1, got q {tuple(q.shape)} and v {tuple(v.shape)}")


def _check_gate_values(alpha: torch.Tensor, eta: torch.Tensor) -> None:
    # Value checks read the data, so they run outside tracing only. NaN fails both comparisons.
    bad = ~((alpha > 0) & (alpha <= 1))
    if bad.any():
        raise ValueError(f"alpha must be in (0, 1], got {alpha[bad].flatten()[0].item()} "
                         f"({int(bad.sum())} values out of range)")
    bad = ~((eta >= 0) & torch.isfinite(eta))
    if bad.any():
        raise ValueError(f"eta must be finite and >= 0, got {eta[bad].flatten()[0].item()} "
                         f"({int(bad.sum())} values out of range)")


def cuda_shared_memory(q: torch.Tensor, v: torch.Tensor, stage: str) -> tuple[int, str]:
    """(bytes per block, formula) of the cuda kernels' shared memory, as csrc/cuda/dgd.cu sizes it.
    stage: "fwd", "bwd" or "both" (the larger)."""
    dk, dv = q.shape[-1], v.shape[-1]
    acc = accum_dtype(q.dtype).itemsize
    fwd = ((2 * dk * dv + 2 * dk) * acc, f"forward (2 dk dv + 2 dk) * {acc} with dk={dk}, dv={dv}")
    bwd = ((3 * dk * dv + 2 * dk + 3 * dv + 128) * acc,
           f"backward (3 dk dv + 2 dk + 3 dv + 128) * {acc} with dk={dk}, dv={dv}")
    return {"fwd": fwd, "bwd": bwd, "both": max(fwd, bwd)}[stage]


def _resolve(backend: str, tensors, stage: str = "both") -> str:
    q, v = tensors[0], tensors[2]
    fits = max(q.shape[-1], v.shape[-1]) <= TRITON_MAX_HEAD_DIM
    return resolve_backend(backend, tensors, op=_OP, gpu_order=("triton", "cuda") if fits else ("cuda",),
                           cpu_order=("cpu",), supported=SUPPORTED,
                           cuda_shared_memory=cuda_shared_memory(q, v, stage))


def _forward(backend, q, k, v, alpha, eta, initial_state, chunk_size):
    if backend == "triton":
        from hope_kernels.ops.dgd.triton import dgd_fwd_triton
        return dgd_fwd_triton(q, k, v, alpha, eta, initial_state, chunk_size)
    if backend == "cpu":
        return tuple(torch.ops.hope_kernels.dgd_chunk_fwd(q, k, v, alpha, eta, initial_state, chunk_size))
    if backend == "cuda":
        return tuple(torch.ops.hope_kernels.dgd_recurrent_fwd(q, k, v, alpha, eta, initial_state, chunk_size))
    raise AssertionError(backend)


def _backward_kernels(backend, q, k, v, alpha, eta, states, do, dM, chunk_size):
    if backend == "triton":
        from hope_kernels.ops.dgd.triton import dgd_bwd_triton
        return dgd_bwd_triton(q, k, v, alpha, eta, states, do, dM, chunk_size)
    if backend == "cpu":
        return tuple(torch.ops.hope_kernels.dgd_chunk_bwd(q, k, v, alpha, eta, states, do, dM, chunk_size))
    if backend == "cuda":
        return tuple(torch.ops.hope_kernels.dgd_recurrent_bwd(q, k, v, alpha, eta, states, do, dM, chunk_size))
    raise AssertionError(backend)


@torch.library.custom_op("hope_kernels::dgd_memory", mutates_args=())
def _dgd_memory_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, eta: torch.Tensor,
                   initial_state: Optional[torch.Tensor], chunk_size: int,
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (o (B, H, L, dv) in q's dtype, final state (B, H, dk, dv), chunk-start states (B, H, N, dk, dv)),
    states in the accumulation dtype."""
    if reads_values(alpha, eta):   # on a GPU only with HOPE_KERNELS_DEBUG=1: a host sync per call
        _check_gate_values(alpha, eta)
    # "auto" here resolves again in the backward op: size for both so that the two picks agree
    backend = _resolve(backend, (q, k, v, alpha, eta, initial_state), "both" if backend == "auto" else "fwd")
    return _forward(backend, q, k, v, alpha, eta, initial_state, chunk_size)


@_dgd_memory_op.register_fake
def _(q, k, v, alpha, eta, initial_state, chunk_size, backend):
    B, H, L, dk = q.shape
    dv = v.shape[3]
    acc = accum_dtype(q.dtype)
    N = -(-L // chunk_size)
    return (q.new_empty((B, H, L, dv)), q.new_empty((B, H, dk, dv), dtype=acc),
            q.new_empty((B, H, N, dk, dv), dtype=acc))


@torch.library.custom_op("hope_kernels::dgd_memory_backward", mutates_args=())
def _dgd_memory_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                            eta: torch.Tensor, states: torch.Tensor, do: torch.Tensor, dM: torch.Tensor,
                            chunk_size: int, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv, dalpha, deta, dM0) from do (B, H, L, dv) and the final-state gradient dM."""
    backend = _resolve(backend, (q, k, v, alpha, eta, states), "bwd")
    return _backward_kernels(backend, q, k, v, alpha, eta, states, do, dM, chunk_size)


@_dgd_memory_backward_op.register_fake
def _(q, k, v, alpha, eta, states, do, dM, chunk_size, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(alpha),
            torch.empty_like(eta), torch.empty_like(dM))


def _setup_context(ctx, inputs, output):
    q, k, v, alpha, eta, initial_state, chunk_size, backend = inputs
    ctx.save_for_backward(q, k, v, alpha, eta, output[2])
    ctx.chunk_size, ctx.backend = chunk_size, backend
    ctx.state_dtype = None if initial_state is None else initial_state.dtype


def _backward(ctx, do, dM, _dstates):
    q, k, v, alpha, eta, states = ctx.saved_tensors
    B, H, L, dk = q.shape
    dv = v.shape[3]
    acc = accum_dtype(q.dtype)
    if do is None:
        do = q.new_zeros((B, H, L, dv))
    if dM is None:
        dM = q.new_zeros((B, H, dk, dv), dtype=acc)
    grads = _dgd_memory_backward_op(q, k, v, alpha, eta, states, do.contiguous(), dM.to(acc).contiguous(),
                                    ctx.chunk_size, ctx.backend)
    dq, dk_, dv_, dalpha, deta, dM0 = grads
    dM0 = None if ctx.state_dtype is None else dM0.to(ctx.state_dtype)
    return dq, dk_, dv_, dalpha, deta, dM0, None, None


_dgd_memory_op.register_autograd(_backward, setup_context=_setup_context)


def dgd_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, eta: torch.Tensor, *,
               chunk_size: int = 16, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
               backend: str = "auto"):
    """Delta-gradient-descent memory: read o_t = q_t^T M_{t-1}, then
    M_t = (alpha_t I - eta_t k_t k_t^T) M_{t-1} - eta_t k_t (k_t^T M_ref - v_t^T), M_ref = the chunk-start state.

    q, k: (B, H, L, dk); v: (B, H, L, dv), same dtype as q; alpha (in (0, 1]), eta (>= 0): (B, H, L);
    initial_state: (B, H, dk, dv) or None (zeros). The op does not normalise q or k.
    Returns (o (B, H, L, dv) in q's dtype, final_M (B, H, dk, dv) in float32 (float64 for float64 inputs),
    or None unless output_final_state). Differentiable in q, k, v, alpha, eta and initial_state. On the chunked
    backends (all but cuda) the alpha gradient has a relative error of about eps / alpha for small alpha;
    gradients through a sigmoid-parametrised alpha stay accurate (docs/dgd.md).
    """
    _validate(q, k, v, alpha, eta, chunk_size, initial_state)
    chunk_size = min(chunk_size, q.shape[2])   # a chunk longer than the sequence is the whole sequence
    backend = _resolve(backend, (q, k, v, alpha, eta, initial_state),
                       "both" if needs_backward(q, k, v, alpha, eta, initial_state) else "fwd")
    if backend == "reference":
        if reads_values(alpha, eta):
            _check_gate_values(alpha, eta)
        o, M = dgd_memory_chunked_reference(q, k, v, alpha, eta, chunk_size, initial_state)
    else:
        o, M, _ = _dgd_memory_op(q, k, v, alpha, eta, initial_state, chunk_size, backend)
    return o, (M if output_final_state else None)
