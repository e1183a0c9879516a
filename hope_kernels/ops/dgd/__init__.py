"""HOPE's delta-gradient-descent memory (docs/design.md#dgd-memory): public function, custom ops and dispatcher.

    o, final_M = dgd_memory(q, k, v, alpha, eta, chunk_size=16, initial_state=M0, output_final_state=True)

q, k (B, H, L, dk); v (B, H, L, dv); alpha in (0, 1] and eta >= 0, both (B, H, L); M (B, H, dk, dv).
Semantics and the chunked form: reference.py; backward derivation: docs/dgd.md.

Backends: reference (eager chunked PyTorch, autograd), cpu (compiled C++ chunked), triton (chunked, any chunk
size as sub-chunks; dk, dv <= 64, larger heads go to cuda under auto),
cuda (fused token-serial recurrent). The fast paths are the table `_DGD` (hope_kernels/ops/registry.py): custom
ops `hope_kernels::dgd_memory_<backend>` (return o, the final state and the per-chunk start states saved for
backward) with backward ops `..._<backend>_backward`; all have fake kernels, so they trace under torch.compile.
"""

from __future__ import annotations

import torch

from hope_kernels.dispatch import cuda_shared_memory_need, cuda_shared_memory_problem, needs_backward
from hope_kernels.ops.checks import accum_dtype, check_same_device, check_same_dtype, check_tensor, reads_values
from hope_kernels.ops.dgd.reference import dgd_memory_chunked_reference, dgd_memory_token_loop
from hope_kernels.ops.registry import Backend, OpTable, register

__all__ = ["dgd_memory", "dgd_memory_token_loop", "dgd_memory_chunked_reference"]

_OP = "dgd_memory"
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
        check_tensor(
            "initial_state", initial_state, ndim=4, shape_doc=f"(B, H, dk, dv) = ({B}, {H}, {dk}, {v.shape[3]})"
        )
        if initial_state.shape != (B, H, dk, v.shape[3]):
            raise ValueError(
                f"initial_state must be (B, H, dk, dv) = ({B}, {H}, {dk}, {v.shape[3]}), "
                f"got {tuple(initial_state.shape)}"
            )
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
        raise ValueError(
            f"alpha must be in (0, 1], got {alpha[bad].flatten()[0].item()} ({int(bad.sum())} values out of range)"
        )
    bad = ~((eta >= 0) & torch.isfinite(eta))
    if bad.any():
        raise ValueError(
            f"eta must be finite and >= 0, got {eta[bad].flatten()[0].item()} ({int(bad.sum())} values out of range)"
        )


def cuda_shared_memory(q: torch.Tensor, v: torch.Tensor, stage: str) -> tuple[int, str]:
    """(bytes per block, formula) of the cuda kernels' shared memory: the bytes from the extension
    (csrc/cuda_smem.h, as csrc/cuda/dgd.cu launches), the formula for error messages. stage: "fwd", "bwd" or
    "both" (the larger)."""
    dk, dv = q.shape[-1], v.shape[-1]
    acc = accum_dtype(q.dtype).itemsize
    fwd = (cuda_shared_memory_need("dgd_fwd", dk, dv, acc), f"forward (2 dk dv + 2 dk) * {acc} with dk={dk}, dv={dv}")
    bwd = (
        cuda_shared_memory_need("dgd_bwd", dk, dv, acc),
        f"backward (3 dk dv + 2 dk + 3 dv + 128) * {acc} with dk={dk}, dv={dv}",
    )
    return {"fwd": fwd, "bwd": bwd, "both": max(fwd, bwd)}[stage]


def _resolve(backend: str, tensors, stage: str = "both") -> str:
    """tensors: (q, k, v, alpha, eta, initial_state); stage: "fwd" or "both" (a backward will run)."""
    return _DGD.resolve(backend, tensors, (tensors[0], tensors[2], stage))


# ---------------------------------------------------------------- backends
# forward(q, k, v, alpha, eta, initial_state, chunk_size) -> (o, final state, chunk-start states (B, H, N, dk, dv));
# backward(q, k, v, alpha, eta, states, do, dM, chunk_size) -> (dq, dk, dv, dalpha, deta, dM0). accepts / prefers
# read (q, v, stage).


def _checked(forward):
    """forward, after the gate-value check (inside the op: it reads the data, which tracing cannot)."""

    def run(q, k, v, alpha, eta, initial_state, chunk_size):
        if reads_values(alpha, eta):  # on a GPU only with HOPE_KERNELS_DEBUG=1: a host sync per call
            _check_gate_values(alpha, eta)
        return forward(q, k, v, alpha, eta, initial_state, chunk_size)

    return run


def _triton_forward(*args):
    from hope_kernels.ops.dgd.triton import dgd_fwd_triton

    return dgd_fwd_triton(*args)


def _triton_backward(*args):
    from hope_kernels.ops.dgd.triton import dgd_bwd_triton

    return dgd_bwd_triton(*args)


def _triton_prefers(inputs) -> bool:
    q, v, _ = inputs
    return max(q.shape[-1], v.shape[-1]) <= TRITON_MAX_HEAD_DIM


def _cuda_accepts(inputs, device):
    problem = cuda_shared_memory_problem(_OP, cuda_shared_memory(*inputs), device)
    return None if problem is None else ValueError(problem)


def _fake(q, k, v, alpha, eta, initial_state, chunk_size):
    B, H, L, dk = q.shape
    dv = v.shape[3]
    acc = accum_dtype(q.dtype)
    N = -(-L // chunk_size)
    return (
        q.new_empty((B, H, L, dv)),
        q.new_empty((B, H, dk, dv), dtype=acc),
        q.new_empty((B, H, N, dk, dv), dtype=acc),
    )


def _fake_backward(q, k, v, alpha, eta, states, do, dM, chunk_size):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(alpha),
        torch.empty_like(eta),
        torch.empty_like(dM),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, alpha, eta, initial_state, chunk_size = inputs
    ctx.save_for_backward(q, k, v, alpha, eta, output[2])
    ctx.chunk_size = chunk_size
    ctx.state_dtype = None if initial_state is None else initial_state.dtype
    ctx.set_materialize_grads(False)


def _backward(ctx, backward_op, do, dM, _dstates):
    q, k, v, alpha, eta, states = ctx.saved_tensors
    B, H, L, dk = q.shape
    dv = v.shape[3]
    acc = accum_dtype(q.dtype)
    if do is None:
        do = q.new_zeros((B, H, L, dv))
    if dM is None:
        dM = q.new_zeros((B, H, dk, dv), dtype=acc)
    dq, dk_, dv_, dalpha, deta, dM0 = backward_op(
        q, k, v, alpha, eta, states, do.contiguous(), dM.to(acc).contiguous(), ctx.chunk_size
    )
    dM0 = None if ctx.state_dtype is None else dM0.to(ctx.state_dtype)
    return dq, dk_, dv_, dalpha, deta, dM0, None


_DGD = register(
    OpTable(
        name=_OP,
        label=_OP,
        schema="(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor? initial_state, int chunk_size) "
        "-> (Tensor, Tensor, Tensor)",
        backward_schema="(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor states, Tensor do, Tensor dM, "
        "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        fake=_fake,
        fake_backward=_fake_backward,
        setup_context=_setup_context,
        backward=_backward,
        saved_only=1,
        backends=(
            Backend(
                "cpu",
                _checked(lambda *a: torch.ops.hope_kernels.dgd_chunk_fwd(*a)),
                lambda *a: torch.ops.hope_kernels.dgd_chunk_bwd(*a),
                devices=("cpu",),
            ),
            # the Triton kernels hold (dk, dv) state tiles in registers: auto sends larger heads to cuda
            Backend(
                "triton",
                _checked(_triton_forward),
                _triton_backward,
                devices=("cuda",),
                priority=2,
                prefers=_triton_prefers,
            ),
            Backend(
                "cuda",
                _checked(lambda *a: torch.ops.hope_kernels.dgd_recurrent_fwd(*a)),
                lambda *a: torch.ops.hope_kernels.dgd_recurrent_bwd(*a),
                devices=("cuda",),
                priority=1,
                accepts=_cuda_accepts,
            ),
        ),
    )
)
SUPPORTED = _DGD.supported


def dgd_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    *,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
):
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
    chunk_size = min(chunk_size, q.shape[2])  # a chunk longer than the sequence is the whole sequence
    backend = _resolve(
        backend,
        (q, k, v, alpha, eta, initial_state),
        "both" if needs_backward(q, k, v, alpha, eta, initial_state) else "fwd",
    )
    if backend == "reference":
        if reads_values(alpha, eta):
            _check_gate_values(alpha, eta)
        o, M = dgd_memory_chunked_reference(q, k, v, alpha, eta, chunk_size, initial_state)
    else:
        o, M = _DGD(backend, q, k, v, alpha, eta, initial_state, chunk_size)
    return o, (M if output_final_state else None)
