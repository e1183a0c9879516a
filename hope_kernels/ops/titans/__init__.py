"""Chunk-parallel Titans neural memory (docs/design.md#titans-memory): public function, custom ops and dispatcher.

    o, final_state = titans_memory(q, k, v, alpha, eta, theta, chunk_size=16)

Semantics, closed form and shapes: hope_kernels/ops/titans/reference.py; backward derivation: docs/titans.md.
Backends: reference (eager chunked closed form, autograd; the token loop when chunk_size == 1) for both
memories; compiled C++ ("cpu", csrc/titans_{linear,mlp}_cpu.cpp, both memories: one fused chunk loop per (batch, head)),
Triton ("triton", hope_kernels/ops/titans/triton.py: float32/bf16/fp16 inputs; linear: dk, dv <= 128,
chunk_size <= 64; mlp: dk = dv, dh, chunk_size <= 64) and CUDA ("cuda", csrc/cuda/titans.cu, linear only: fused
token-serial kernel, any chunk_size, float64/32/bf16/fp16, dk up to the device's shared memory, any dv) fast
paths, listed in `LINEAR_BACKENDS` / `MLP_BACKENDS`. Auto prefers triton for CUDA tensors when triton takes the
call (not float64, not past its size limits), else cuda (linear) or reference (mlp); cpu for CPU tensors (both
memories), else reference. The fast paths are the registry tables `_LINEAR` and `_MLP`
(hope_kernels/ops/registry.py): custom ops `torch.ops.hope_kernels.titans_memory_linear_<backend>(q, k, v, alpha,
eta, theta, W0, S0, chunk_size) -> (o, Ws, Ss)` and `titans_memory_mlp_<backend>(q, k, v, alpha, eta, theta, W1,
W2, S1, S2, chunk_size) -> (o, W1s, W2s, S1s, S2s)` (chunk-boundary states (B, H, N+1, ., .)), whose backwards
are the custom ops `..._<backend>_backward`; all have fake kernels, so they trace under torch.compile.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from hope_kernels.dispatch import (
    cuda_shared_memory_need,
    cuda_shared_memory_problem,
    needs_backward,
    require_cuda_shared_memory,
)
from hope_kernels.ops.checks import accum_dtype, check_same_device, check_same_dtype, check_tensor, reads_values
from hope_kernels.ops.registry import Backend, OpTable, register
from hope_kernels.ops.titans.reference import (
    titans_chunked,
    titans_linear_chunked_bwd,
    titans_linear_chunked_fwd,
    titans_mlp_chunked_bwd,
    titans_mlp_chunked_fwd,
    titans_token_loop,
)

__all__ = ["titans_memory", "titans_token_loop", "titans_chunked", "LINEAR_BACKENDS", "MLP_BACKENDS"]

_OP = "titans_memory"
MEMORIES = ("linear", "mlp")
# Triton MLP kernels: D = dk = dv and dh at most MLP_MAX_D (four (D, dh) state tiles, eight in backward, live in
# registers), chunk_size at most MLP_MAX_CHUNK.
MLP_MAX_D = 64
MLP_MAX_CHUNK = 64


def mlp_unsupported(q: torch.Tensor, dh: int, chunk_size: int):
    """(exception type, message) saying why the triton MLP kernels cannot take these inputs; None when they can."""
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return TypeError, (
            f"{_OP}: the triton backend takes float32/bfloat16/float16 inputs (no fp64 tl.dot on "
            f"GPU), got {q.dtype}; use backend='reference' for float64"
        )
    D = q.shape[-1]
    if D > MLP_MAX_D or dh > MLP_MAX_D:
        return ValueError, (
            f"{_OP}: the triton backend for memory='mlp' supports dk = dv <= {MLP_MAX_D} and "
            f"dh <= {MLP_MAX_D}, got dk={D}, dh={dh}"
        )
    if chunk_size > MLP_MAX_CHUNK:
        return ValueError, (
            f"{_OP}: the triton backend for memory='mlp' supports chunk_size <= {MLP_MAX_CHUNK}, got {chunk_size}"
        )
    return None


def _validate(q, k, v, alpha, eta, theta, chunk_size, memory, initial_state) -> None:
    check_tensor("q", q, ndim=4, shape_doc="(B, H, L, dk)")
    check_tensor("k", k, ndim=4, shape_doc="(B, H, L, dk)")
    check_tensor("v", v, ndim=4, shape_doc="(B, H, L, dv)")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} = (B, H, L, dk), got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, H, L, dv) = {tuple(q.shape[:3])} + (dv,), got {tuple(v.shape)}")
    check_same_dtype(("q", "k", "v"), (q, k, v))
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    if L < 1 or dk < 1 or dv < 1:
        raise ValueError(f"q, k, v need L, dk, dv >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    for name, g in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        check_tensor(name, g, ndim=3, shape_doc=f"(B, H, L) = {(B, H, L)}")
        if g.shape != q.shape[:3]:
            raise ValueError(f"{name} must be (B, H, L) = {(B, H, L)}, got {tuple(g.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    state = list(initial_state) if initial_state is not None else []
    if memory == "linear" and initial_state is not None:
        if len(state) != 2:
            raise ValueError(f"initial_state for memory='linear' must be (W, S), got {len(state)} tensors")
        for name, s in zip(("W", "S"), state):
            check_tensor(f"initial_state {name}", s, ndim=4, shape_doc=f"(B, H, dk, dv) = {(B, H, dk, dv)}")
            if s.shape != (B, H, dk, dv):
                raise ValueError(
                    f"initial_state {name} must be (B, H, dk, dv) = {(B, H, dk, dv)}, got {tuple(s.shape)}"
                )
    if memory == "mlp":
        if initial_state is None:
            raise ValueError(
                "memory='mlp' needs initial_state=(W1, W2, S1, S2): W1, S1 (B, H, dk, dh), "
                "W2, S2 (B, H, dh, dv) (zero weights would never learn)"
            )
        if dk != dv:
            raise ValueError(f"memory='mlp' is residual and needs dk == dv, got dk={dk}, dv={dv}")
        if len(state) != 4:
            raise ValueError(f"initial_state for memory='mlp' must be (W1, W2, S1, S2), got {len(state)} tensors")
        for name, s in zip(("W1", "W2", "S1", "S2"), state):
            check_tensor(f"initial_state {name}", s, ndim=4, shape_doc="(B, H, dk, dh) / (B, H, dh, dv)")
        dh = state[0].shape[-1]
        for name, s, want in zip(
            ("W1", "W2", "S1", "S2"), state, ((B, H, dk, dh), (B, H, dh, dv), (B, H, dk, dh), (B, H, dh, dv))
        ):
            if s.shape != want:
                raise ValueError(f"initial_state {name} must be {want}, got {tuple(s.shape)}")
    names = ("q", "k", "v", "alpha", "eta", "theta") + tuple(f"initial_state[{i}]" for i in range(len(state)))
    check_same_device(names, (q, k, v, alpha, eta, theta, *state))


def _check_gate_values(alpha, eta, theta) -> None:
    # Value checks read the data: run outside tracing only.
    for name, g, lo, hi in (("alpha", alpha, 0.0, 1.0), ("eta", eta, 0.0, 1.0), ("theta", theta, 0.0, None)):
        if g.numel() == 0:  # B = 0 or H = 0: nothing to check (min() has no value)
            continue
        if not torch.isfinite(g).all():
            raise ValueError(f"{name} must be finite, got NaN/Inf")
        gmin = g.min().item()
        if gmin < lo or (hi is not None and g.max().item() > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"{name} must be in {rng}, got values in [{gmin}, {g.max().item()}]")


# Triton's limits (hope_kernels/ops/titans/triton.py MAX_D, MAX_CHUNK): register tiles.
TRITON_MAX_D = 128
TRITON_MAX_CHUNK = 64


def cuda_shared_memory(q: torch.Tensor, stage: str) -> tuple[int, str]:
    """(bytes per block, formula) of the linear-memory cuda kernels' shared memory: the bytes from the extension
    (csrc/cuda_smem.h, as csrc/cuda/titans.cu launches: tiles of 32 columns with a row stride of 40, 4 warps),
    the formula for error messages. stage: "fwd", "bwd" or "both"."""
    dk, acc = q.shape[-1], accum_dtype(q.dtype).itemsize
    fwd = (cuda_shared_memory_need("titans_linear_fwd", dk, 0, acc), f"forward 3 * dk * 40 * {acc} with dk={dk}")
    bwd = (
        cuda_shared_memory_need("titans_linear_bwd", dk, 0, acc),
        f"backward (4 * dk * 40 + 12 * dk + 12) * {acc} with dk={dk}",
    )
    return {"fwd": fwd, "bwd": bwd, "both": max(fwd, bwd)}[stage]


def _resolve(backend: str, memory: str, tensors, dh: int = 0, chunk_size: int = 1, stage: str = "both") -> str:
    """tensors: (q, k, v, alpha, eta, theta) (only q read for the mlp memory); stage: "fwd" or "both"."""
    q = tensors[0]
    v = tensors[2] if len(tensors) > 2 else q
    table = _LINEAR if memory == "linear" else _MLP
    return table.resolve(backend, tensors, (q, v, dh, chunk_size, stage))


# ---------------------------------------------------------------- backends
# accepts / prefers read (q, v, dh, chunk_size, stage). Forward and backward arguments: the linear and mlp
# schemas below. "explicit" runs the op with the PyTorch forward/backward of reference.py: never chosen by a
# backend name (tests and benchmarks call its custom op).


def _edge_gate_grads(g, alpha, eta):
    """The triton and explicit chunked backwards compute a gate's gradient as d(log gate) / gate (docs/titans.md,
    "Accuracy of the gate gradients"): at a gate exactly at its edge (1 - alpha = 0 or eta = 0) that is rounding
    noise / tiny, ~1e30. Return 0 there instead (finite; the true value is O(1)). The cuda and cpu kernels
    differentiate products only and are exact there."""
    return (*g[:3], torch.where(alpha == 1, 0.0, g[3]), torch.where(eta == 0, 0.0, g[4]), *g[5:])


def _triton_float64(inputs, device):
    if inputs[0].dtype == torch.float64:
        return TypeError(
            f"{_OP}: the triton backend does not take float64 inputs (no fp64 tl.dot on GPU), got "
            "q of dtype torch.float64; use float32/bfloat16/float16, or backend='cuda'/'cpu'/"
            "'reference'"
        )
    return None


def _triton_prefers(inputs) -> bool:
    q, v, _, chunk_size, _ = inputs
    return q.shape[-1] <= TRITON_MAX_D and v.shape[-1] <= TRITON_MAX_D and chunk_size <= TRITON_MAX_CHUNK


def _cuda_accepts(inputs, device):
    problem = cuda_shared_memory_problem(_OP, cuda_shared_memory(inputs[0], inputs[4]), device)
    return None if problem is None else ValueError(problem)


def _linear_triton_forward(*args):
    from hope_kernels.ops.titans.triton import titans_linear_fwd_triton

    return titans_linear_fwd_triton(*args)


def _linear_triton_backward(*args):
    from hope_kernels.ops.titans.triton import titans_linear_bwd_triton

    return _edge_gate_grads(titans_linear_bwd_triton(*args), args[3], args[4])


def _linear_compiled_forward(*args):
    return torch.ops.hope_kernels.titans_linear_fwd(*args)


def _linear_compiled_backward(*args):
    return torch.ops.hope_kernels.titans_linear_bwd(*args)


def _linear_cuda_backward(q, *args):
    require_cuda_shared_memory(_OP, cuda_shared_memory(q, "bwd"), q.device)
    return _linear_compiled_backward(q, *args)


def _linear_explicit_forward(q, k, v, alpha, eta, theta, W0, S0, chunk_size):
    o, Ws, Ss = titans_linear_chunked_fwd(*(x.to(W0.dtype) for x in (q, k, v)), alpha, eta, theta, W0, S0, chunk_size)
    return o.to(q.dtype), Ws, Ss


def _linear_explicit_backward(q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST, chunk_size):
    acc = Ws.dtype
    g = titans_linear_chunked_bwd(
        *(x.to(acc) for x in (q, k, v)), alpha, eta, theta, Ws, Ss, do.to(acc), dWT, dST, chunk_size
    )
    return _edge_gate_grads((g[0].to(q.dtype), g[1].to(k.dtype), g[2].to(v.dtype)) + tuple(g[3:]), alpha, eta)


def _num_chunks(L: int, chunk_size: int) -> int:
    return (L + chunk_size - 1) // chunk_size


def _linear_fake(q, k, v, alpha, eta, theta, W0, S0, chunk_size):
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    n = _num_chunks(L, chunk_size) + 1
    return (v.new_empty(B, H, L, dv), W0.new_empty(B, H, n, dk, dv), W0.new_empty(B, H, n, dk, dv))


def _linear_fake_backward(q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST, chunk_size):
    st = Ws[:, :, 0]
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(alpha),
        torch.empty_like(eta),
        torch.empty_like(theta),
        torch.empty_like(st),
        torch.empty_like(st),
    )


def _setup_context(ctx, inputs, output):
    # the boundary states: (B, H, N+1, ., .); the last one is the public final state
    q, k, v, alpha, eta, theta, *_, chunk_size = inputs
    ctx.save_for_backward(q, k, v, alpha, eta, theta, *output[1:])
    ctx.chunk_size = chunk_size
    # unused outputs' gradients stay None: materialised, the boundary states' would be (B, H, N+1, ., .) zeros
    ctx.set_materialize_grads(False)


def _backward(ctx, backward_op, do, *dstates):
    q, k, v, alpha, eta, theta, *bs = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    # only the last boundary state is a public output (the final state); earlier ones are saved internals
    dT = [b.new_zeros(b[:, :, -1].shape) if d is None else d[:, :, -1].contiguous() for b, d in zip(bs, dstates)]
    g = backward_op(q, k, v, alpha, eta, theta, *bs, do.contiguous(), *dT, ctx.chunk_size)
    return (*g, None)


_GATES = "Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor theta"
_LINEAR = register(
    OpTable(
        name="titans_memory_linear",
        label=_OP,
        schema=f"({_GATES}, Tensor W0, Tensor S0, int chunk_size) -> (Tensor, Tensor, Tensor)",
        backward_schema=f"({_GATES}, Tensor Ws, Tensor Ss, Tensor do, Tensor dWT, Tensor dST, int chunk_size) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        fake=_linear_fake,
        fake_backward=_linear_fake_backward,
        setup_context=_setup_context,
        backward=_backward,
        backends=(
            Backend("cpu", _linear_compiled_forward, _linear_compiled_backward, devices=("cpu",)),
            # triton (chunk-parallel) when it takes the call, else the CUDA token-serial kernel when the device's
            # shared memory holds its tiles, else the reference
            Backend(
                "triton",
                _linear_triton_forward,
                _linear_triton_backward,
                devices=("cuda",),
                priority=2,
                accepts=_triton_float64,
                prefers=_triton_prefers,
            ),
            Backend(
                "cuda",
                _linear_compiled_forward,
                _linear_cuda_backward,
                devices=("cuda",),
                priority=1,
                accepts=_cuda_accepts,
            ),
            Backend("explicit", _linear_explicit_forward, _linear_explicit_backward, devices=()),
        ),
    )
)
LINEAR_BACKENDS: Tuple[str, ...] = _LINEAR.supported


def _mlp_triton_accepts(inputs, device):
    q, _, dh, chunk_size, _ = inputs
    why = mlp_unsupported(q, dh, chunk_size)
    return None if why is None else why[0](why[1])


def _mlp_triton_forward(*args):
    from hope_kernels.ops.titans.triton import titans_mlp_fwd_triton

    return titans_mlp_fwd_triton(*args)


def _mlp_triton_backward(*args):
    from hope_kernels.ops.titans.triton import titans_mlp_bwd_triton

    return _edge_gate_grads(titans_mlp_bwd_triton(*args), args[3], args[4])


def _mlp_explicit_forward(q, k, v, alpha, eta, theta, W1, W2, S1, S2, chunk_size):
    acc = W1.dtype
    o, *bs = titans_mlp_chunked_fwd(*(x.to(acc) for x in (q, k, v)), alpha, eta, theta, W1, W2, S1, S2, chunk_size)
    return (o.to(q.dtype), *bs)


def _mlp_explicit_backward(q, k, v, alpha, eta, theta, W1s, W2s, S1s, S2s, do, dW1T, dW2T, dS1T, dS2T, chunk_size):
    acc = W1s.dtype
    g = titans_mlp_chunked_bwd(
        *(x.to(acc) for x in (q, k, v)),
        alpha,
        eta,
        theta,
        W1s,
        W2s,
        S1s,
        S2s,
        do.to(acc),
        dW1T,
        dW2T,
        dS1T,
        dS2T,
        chunk_size,
    )
    return _edge_gate_grads((g[0].to(q.dtype), g[1].to(k.dtype), g[2].to(v.dtype)) + tuple(g[3:]), alpha, eta)


def _mlp_fake(q, k, v, alpha, eta, theta, W1, W2, S1, S2, chunk_size):
    B, H, L, D = q.shape
    dh = W1.shape[-1]
    n = _num_chunks(L, chunk_size) + 1
    return (
        v.new_empty(B, H, L, D),
        W1.new_empty(B, H, n, D, dh),
        W1.new_empty(B, H, n, dh, D),
        W1.new_empty(B, H, n, D, dh),
        W1.new_empty(B, H, n, dh, D),
    )


def _mlp_fake_backward(q, k, v, alpha, eta, theta, W1s, W2s, S1s, S2s, do, dW1T, dW2T, dS1T, dS2T, chunk_size):
    s1, s2 = W1s[:, :, 0], W2s[:, :, 0]
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(alpha),
        torch.empty_like(eta),
        torch.empty_like(theta),
        torch.empty_like(s1),
        torch.empty_like(s2),
        torch.empty_like(s1),
        torch.empty_like(s2),
    )


_MLP = register(
    OpTable(
        name="titans_memory_mlp",
        label=_OP,
        schema=f"({_GATES}, Tensor W1, Tensor W2, Tensor S1, Tensor S2, int chunk_size) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        backward_schema=f"({_GATES}, Tensor W1s, Tensor W2s, Tensor S1s, Tensor S2s, Tensor do, Tensor dW1T, "
        "Tensor dW2T, Tensor dS1T, Tensor dS2T, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        fake=_mlp_fake,
        fake_backward=_mlp_fake_backward,
        setup_context=_setup_context,
        backward=_backward,
        backends=(
            Backend(
                "cpu",
                lambda *a: torch.ops.hope_kernels.titans_mlp_fwd(*a),
                lambda *a: torch.ops.hope_kernels.titans_mlp_bwd(*a),
                devices=("cpu",),
            ),
            Backend(
                "triton",
                _mlp_triton_forward,
                _mlp_triton_backward,
                devices=("cuda",),
                priority=1,
                accepts=_mlp_triton_accepts,
            ),
            Backend("explicit", _mlp_explicit_forward, _mlp_explicit_backward, devices=()),
        ),
    )
)
MLP_BACKENDS: Tuple[str, ...] = _MLP.supported


# ---------------------------------------------------------------- public function


def titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    *,
    chunk_size: int = 16,
    memory: str = "linear",
    initial_state: Optional[Sequence[torch.Tensor]] = None,
    output_final_state: bool = False,
    backend: str = "auto",
):
    """Titans neural memory with momentum and decay, chunk-parallel (docs/design.md#titans-memory).

    q, k: (B, H, L, dk); v: (B, H, L, dv), one floating dtype. Not normalised here (the layer L2-normalises).
    alpha (forget), eta (momentum), theta (inner learning rate): (B, H, L), any floating dtype;
        alpha in [0, 1], eta in [0, 1], theta >= 0.
    chunk_size: C >= 1; inside a chunk every token's gradient is taken at the chunk-start weights.
        C = 1 is exact sequential Titans. The result depends on C by definition (not a tuning knob).
    memory="linear": M_W(x) = x W. State (W, S), each (B, H, dk, dv); zeros when initial_state is None.
    memory="mlp": M(x) = x + silu(x W1) W2 (residual, dk == dv). The hidden width dh and the initial weights
        come from initial_state = (W1, W2, S1, S2), REQUIRED: W1, S1 (B, H, dk, dh); W2, S2 (B, H, dh, dv).
        Backends: reference, cpu and triton.
    Returns (o (B, H, L, dv) in q's dtype, final_state): final_state is None unless output_final_state, else
    the state tuple in the accumulation dtype (float32; float64 for float64 inputs).
    Gradients flow to q, k, v, alpha, eta, theta and initial_state. On triton the gradient to a gate
    g = 1 - alpha or eta has a relative error of about eps / g near its edge, and is 0 at g = 0 exactly (the
    forward is exact); gradients through sigmoid-parametrised gates stay accurate (docs/titans.md). reference,
    cpu and cuda give exact gate gradients, at the edges too.
    backend="cpu" (CPU tensors, both memories): the compiled C++ kernels, one fused chunk loop per (batch, head),
    any shapes and chunk_size; auto takes it for CPU tensors when the extension is built.
    backend="triton": float32/bfloat16/float16 only (float64 raises TypeError); linear memory: dk, dv <= 128 and
    chunk_size <= 64; mlp memory: dk = dv, dh and chunk_size <= 64 (auto falls back to reference outside). A
    chunk_size above L is taken as L (the same result), so it never counts against these limits.
    backend="cuda" (linear memory, CUDA tensors): fused token-serial kernel, any chunk_size and dv, dk limited by
    the device's shared memory (dk <= 128 everywhere from sm_80; beyond, a clear error). Its gate gradients are
    exact also at alpha = 1 or eta = 0. auto on CUDA tensors takes it when triton does not fit the call.
    """
    if initial_state is not None:
        if isinstance(initial_state, torch.Tensor) or not hasattr(initial_state, "__iter__"):
            raise TypeError(
                "initial_state must be a sequence of tensors, (W, S) for memory='linear' or "
                f"(W1, W2, S1, S2) for memory='mlp', got {type(initial_state).__name__}"
            )
        initial_state = tuple(initial_state)  # once: an iterator would be used up by the validation
    _validate(q, k, v, alpha, eta, theta, chunk_size, memory, initial_state)
    if reads_values(alpha, eta, theta):  # on a GPU only with HOPE_KERNELS_DEBUG=1: a host sync per call
        _check_gate_values(alpha, eta, theta)
    chunk_size = min(chunk_size, q.shape[2])  # a chunk longer than the sequence is the whole sequence
    dh = initial_state[0].shape[-1] if memory == "mlp" else 0
    tensors = (q, k, v, alpha, eta, theta)
    stage = "both" if needs_backward(*tensors, *(initial_state or ())) else "fwd"
    backend = _resolve(backend, memory, tensors, dh=dh, chunk_size=chunk_size, stage=stage)
    if backend == "reference":
        fn = titans_token_loop if chunk_size == 1 else titans_chunked
        o, state = fn(q, k, v, alpha, eta, theta, chunk_size=chunk_size, memory=memory, initial_state=initial_state)
        return o, (tuple(state) if output_final_state else None)
    acc = accum_dtype(q.dtype)
    gates = [g.to(acc).contiguous() for g in (alpha, eta, theta)]
    if memory == "mlp":
        W1, W2, S1, S2 = (s.to(acc).contiguous() for s in initial_state)
        o, *bs = _MLP(backend, q.contiguous(), k.contiguous(), v.contiguous(), *gates, W1, W2, S1, S2, chunk_size)
        # clones: a view would keep all N + 1 boundary states alive
        return o, (tuple(b[:, :, -1].clone() for b in bs) if output_final_state else None)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        W0 = S0 = q.new_zeros(B, H, dk, dv, dtype=acc)
    else:
        W0, S0 = (s.to(acc).contiguous() for s in initial_state)
    o, Ws, Ss = _LINEAR(backend, q.contiguous(), k.contiguous(), v.contiguous(), *gates, W0, S0, chunk_size)
    return o, ((Ws[:, :, -1].clone(), Ss[:, :, -1].clone()) if output_final_state else None)
