"""dgd_memory (docs/design.md#dgd-memory): token loop vs eager chunked reference vs every fast path, forward and
backward.

The ground truth is `dgd_memory_token_loop` in float64 with autograd; every other path is compared with it.
"""

import pytest
import torch

from helpers import RTOL, cpu_fast_backends, rel_err, requires_cuda
from hope_kernels.dispatch import BackendUnavailableError
from hope_kernels.ops import dgd_memory
from hope_kernels.ops.dgd import SUPPORTED, dgd_memory_chunked_reference, dgd_memory_token_loop
from hope_kernels.ops.dgd.reference import dgd_memory_chunked_backward


def _fast_cpu():
    return [b for b in cpu_fast_backends() if b in SUPPORTED]


FAST = _fast_cpu()
GRAD_NAMES = ("q", "k", "v", "alpha", "eta", "M0")


def make(B=2, H=2, L=19, dk=8, dv=8, dtype=torch.float64, device="cpu", state=True, eta_max=1.0):
    g = lambda *s: torch.randn(*s, dtype=dtype, device=device)
    q = g(B, H, L, dk)
    k = torch.nn.functional.normalize(g(B, H, L, dk), dim=-1)  # keys in the regime HOPE uses (L2-normalised)
    v = g(B, H, L, dv)
    alpha = 0.5 + 0.5 * torch.rand(B, H, L, dtype=dtype, device=device)
    eta = eta_max * torch.rand(B, H, L, dtype=dtype, device=device)
    M0 = g(B, H, dk, dv) if state else None
    return q, k, v, alpha, eta, M0


def run_with_grads(fn, inputs, seed=1):
    """fn(q, k, v, alpha, eta, M0) -> (o, M); returns (o, M, grads) for a fixed random projection."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in inputs]
    o, M = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    wM = torch.randn(M.shape, generator=gen, dtype=torch.float64).to(M)
    ((o * wo).sum() + (M * wM).sum()).backward()
    return o.detach(), M.detach(), [x.grad if x is not None else None for x in leaves]


def run_nan_poisoned(fn, inputs):
    """run_with_grads with every tensor that torch.empty allocates filled with NaN first: an output element a
    kernel skips then fails the comparison."""
    det = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        return run_with_grads(fn, inputs)
    finally:
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def loop_fn(C):
    return lambda q, k, v, a, e, M0: dgd_memory_token_loop(q, k, v, a, e, C, M0)


def api_fn(C, backend):
    return lambda q, k, v, a, e, M0: dgd_memory(
        q, k, v, a, e, chunk_size=C, initial_state=M0, output_final_state=True, backend=backend
    )


def assert_close(got, ref, tol, what):
    o, M, grads = got
    o_r, M_r, grads_r = ref
    assert rel_err(o, o_r) < tol, f"{what}: o rel err {rel_err(o, o_r)}"
    assert rel_err(M, M_r) < tol, f"{what}: final M rel err {rel_err(M, M_r)}"
    for name, g, g_r in zip(GRAD_NAMES, grads, grads_r):
        if g_r is None:
            assert g is None
            continue
        assert g is not None, f"{what}: no gradient for {name}"
        assert rel_err(g, g_r) < tol, f"{what}: d{name} rel err {rel_err(g, g_r)}"


# ---------------------------------------------------------------- references against each other


@pytest.mark.parametrize("C", [1, 4, 16, 64])
@pytest.mark.parametrize("L", [1, 19, 64])
def test_chunked_reference_matches_token_loop(C, L):
    inputs = make(L=L, dk=6, dv=5)
    ref = run_with_grads(loop_fn(C), inputs)
    got = run_with_grads(lambda *x: dgd_memory_chunked_reference(*x[:5], C, x[5]), inputs)
    assert_close(got, ref, 1e-10, f"chunked C={C} L={L}")


def test_chunk_size_one_is_the_sequential_rule():
    # C = 1: M_ref = M_{t-1}, so M_t = (alpha I - 2 eta k k^T) M_{t-1} + eta k v^T, written out by hand here
    q, k, v, a, e, M0 = make(B=1, H=1, L=5, dk=3, dv=4)
    M = M0[0, 0]
    for t in range(5):
        kt = k[0, 0, t][:, None]
        o_t = q[0, 0, t] @ M
        M = (a[0, 0, t] * torch.eye(3, dtype=M.dtype) - 2 * e[0, 0, t] * kt @ kt.T) @ M + e[0, 0, t] * kt @ v[0, 0, t][
            None
        ]
        o, _ = dgd_memory_token_loop(q, k, v, a, e, 1, M0)
        assert torch.allclose(o[0, 0, t], o_t)
    assert torch.allclose(dgd_memory_token_loop(q, k, v, a, e, 1, M0)[1][0, 0], M)


def test_chunk_start_gradient_semantics():
    # inside one chunk the gradient term uses M_ref = M_0, not the running state
    q, k, v, a, e, M0 = make(B=1, H=1, L=2, dk=3, dv=3)
    o, M = dgd_memory_token_loop(q, k, v, a, e, 2, M0)
    M1 = a[0, 0, 0] * M0[0, 0] - e[0, 0, 0] * k[0, 0, 0][:, None] * (2 * k[0, 0, 0] @ M0[0, 0] - v[0, 0, 0])
    x2 = k[0, 0, 1] @ M1 + k[0, 0, 1] @ M0[0, 0] - v[0, 0, 1]
    M2 = a[0, 0, 1] * M1 - e[0, 0, 1] * k[0, 0, 1][:, None] * x2
    assert torch.allclose(o[0, 0, 1], q[0, 0, 1] @ M1)
    assert torch.allclose(M[0, 0], M2)


@pytest.mark.parametrize("C", [1, 5, 16])
def test_hand_backward_matches_autograd(C):
    # the eager transcription of docs/dgd.md's backward (what the C++ and Triton kernels implement)
    q, k, v, a, e, M0 = make(L=23, dk=5, dv=7)
    ref = run_with_grads(loop_fn(C), (q, k, v, a, e, M0))
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(ref[0].shape, generator=gen, dtype=torch.float64)
    dM = torch.randn(ref[1].shape, generator=gen, dtype=torch.float64)
    grads = dgd_memory_chunked_backward(q, k, v, a, e, M0, do, dM, C)
    for name, g, g_r in zip(GRAD_NAMES, grads, ref[2]):
        assert rel_err(g, g_r) < 1e-10, f"d{name}: {rel_err(g, g_r)}"


# ---------------------------------------------------------------- public API, every backend

ALL = ["reference"] + FAST


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("C,L", [(1, 3), (4, 10), (16, 37), (64, 9), (16, 16)])
def test_backend_matches_token_loop(backend, C, L):
    # covers L not a multiple of C, L < C, and an exact multiple
    inputs = make(L=L, dk=8, dv=8)
    ref = run_with_grads(loop_fn(C), inputs)
    got = run_with_grads(api_fn(C, backend), inputs)
    assert_close(got, ref, 1e-9, f"{backend} C={C} L={L}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("B,H,dk,dv", [(1, 1, 8, 8), (1, 3, 6, 10), (2, 1, 16, 4)])
def test_backend_edge_shapes(backend, B, H, dk, dv):
    inputs = make(B=B, H=H, L=13, dk=dk, dv=dv)
    ref = run_with_grads(loop_fn(4), inputs)
    got = run_with_grads(api_fn(4, backend), inputs)
    assert_close(got, ref, 1e-9, f"{backend} B={B} H={H} dk={dk} dv={dv}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("C,L", [(65, 65), (65, 150), (130, 131)])
def test_sub_chunked_long_chunk_matches_token_loop(backend, C, L):
    # chunks longer than Triton's 64-row tile run as sub-chunks that share the chunk-start reference state:
    # HOPE's chunk of one timestep (65 tokens at the embedded grid), a partial chunk, a 1-token tail sub-chunk
    inputs = make(B=1, H=2, L=L, dk=8, dv=12, eta_max=0.5)
    ref = run_with_grads(loop_fn(C), inputs)
    got = run_with_grads(api_fn(C, backend), inputs)
    assert_close(got, ref, 1e-9, f"{backend} C={C} L={L}")


@pytest.mark.parametrize("backend", ["reference"] + [b for b in FAST if b in ("cpu", "triton")])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_long_chunk_matches_token_loop(backend, dtype, tol):
    # HOPE's chunk = one timestep of 258 tokens: a full chunk and a partial one, all gradients
    inputs = make(B=1, H=2, L=300, dk=24, dv=20, dtype=dtype, eta_max=0.5)
    ref = run_with_grads(loop_fn(258), [x.double() for x in inputs])
    got = run_with_grads(api_fn(258, backend), inputs)
    assert_close(got, ref, tol, f"{backend} C=258 {dtype}")


@pytest.mark.skipif("cpu" not in FAST, reason="C++ extension not built")
@pytest.mark.parametrize("C,L", [(4, 13), (16, 37)])
def test_cpu_baseline_isa_build(monkeypatch, C, L):
    # the C++ kernels are compiled twice (baseline ISA and AVX2 + FMA); this runs the one the CPU does not pick
    monkeypatch.setenv("HOPE_KERNELS_NO_AVX2", "1")
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        inputs = make(B=1, H=2, L=L, dk=20, dv=36, dtype=dtype)
        ref = run_with_grads(loop_fn(C), [x.double() for x in inputs])
        got = run_with_grads(api_fn(C, "cpu"), inputs)
        assert_close(got, ref, tol, f"baseline ISA C={C} {dtype}")


@pytest.mark.parametrize("backend", ALL)
def test_backend_without_initial_state(backend):
    inputs = make(L=11, state=False)
    ref = run_with_grads(loop_fn(4), inputs)
    got = run_with_grads(api_fn(4, backend), inputs)
    assert_close(got, ref, 1e-9, f"{backend} no initial state")
    o, M = dgd_memory(*inputs[:5], chunk_size=4, backend=backend)
    assert M is None and o.shape == (2, 2, 11, 8)


@pytest.mark.parametrize("backend", ALL)
def test_backend_float32(backend):
    inputs = make(L=33, dk=16, dv=16, dtype=torch.float32)
    ref = run_with_grads(loop_fn(16), [x.double() for x in inputs])
    got = run_with_grads(api_fn(16, backend), inputs)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(got, ref, 1e-4, f"{backend} float32")


@pytest.mark.parametrize("backend", ALL)
def test_backend_bfloat16_inputs(backend):
    inputs = make(L=20, dk=16, dv=16, dtype=torch.float32)
    low = [x.bfloat16() for x in inputs[:5]] + [inputs[5]]
    ref = run_with_grads(loop_fn(4), [x.double() for x in low])
    got = run_with_grads(api_fn(4, backend), low)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert rel_err(got[0], ref[0]) < RTOL[torch.bfloat16]
    assert rel_err(got[1], ref[1]) < 1e-4  # state accumulates in float32
    for name, g, g_r in zip(GRAD_NAMES, got[2], ref[2]):
        assert rel_err(g, g_r) < RTOL[torch.bfloat16], name


@pytest.mark.parametrize("backend", ALL)
def test_identity_gates_leave_memory_untouched(backend):
    q, k, v, a, e, M0 = make(L=21)
    a, e = torch.ones_like(a), torch.zeros_like(e)
    o, M = dgd_memory(q, k, v, a, e, chunk_size=4, initial_state=M0, output_final_state=True, backend=backend)
    assert torch.equal(M, M0)
    assert torch.allclose(o, torch.einsum("bhlk,bhkv->bhlv", q, M0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("C,split", [(4, 8), (4, 6), (16, 9)])
def test_split_equals_whole(backend, C, split):
    # split at a chunk boundary carries the state exactly; a split elsewhere starts a new chunk there,
    # which is the same as the token loop run on each part
    q, k, v, a, e, M0 = make(L=20)
    o, M = dgd_memory(q, k, v, a, e, chunk_size=C, initial_state=M0, output_final_state=True, backend=backend)
    parts = [slice(0, split), slice(split, 20)]
    state, outs = M0, []
    for s in parts:
        o_s, state = dgd_memory(
            q[:, :, s],
            k[:, :, s],
            v[:, :, s],
            a[:, :, s],
            e[:, :, s],
            chunk_size=C,
            initial_state=state,
            output_final_state=True,
            backend=backend,
        )
        outs.append(o_s)
    if split % C == 0:
        assert rel_err(torch.cat(outs, 2), o) < 1e-12 and rel_err(state, M) < 1e-12
    else:
        ref_state, ref_outs = M0, []
        for s in parts:
            o_s, ref_state = dgd_memory_token_loop(
                q[:, :, s], k[:, :, s], v[:, :, s], a[:, :, s], e[:, :, s], C, ref_state
            )
            ref_outs.append(o_s)
        assert rel_err(torch.cat(outs, 2), torch.cat(ref_outs, 2)) < 1e-10
        assert rel_err(state, ref_state) < 1e-10


@pytest.mark.parametrize("backend", ["reference"] + [b for b in FAST if b == "cpu"])
def test_long_sequence_stays_finite(backend):
    q, k, v, a, e, M0 = make(B=1, H=2, L=4096, dk=16, dv=16, dtype=torch.float32, state=False)
    o, M = dgd_memory(q, k, v, a, e, chunk_size=64, output_final_state=True, backend=backend)
    assert torch.isfinite(o).all() and torch.isfinite(M).all()


@pytest.mark.parametrize("backend", ALL)
def test_sigmoid_gate_preactivation_grads_match_token_loop(backend):
    """Gates from sigmoids of widely spread logits (many alpha within 1e-6 of 0): the gradients to the logits match
    the float64 token loop in float32. The alpha gradient itself loses eps/alpha relative accuracy for small alpha
    on every chunked path (docs/dgd.md); the sigmoid's factor alpha (1 - alpha) cancels it."""
    q, k, v, _, _, M0 = make(B=1, H=2, L=16, dtype=torch.float32)
    logits = [(6 * torch.randn(1, 2, 16)).float() for _ in range(2)]

    def run(fn, dtype):
        la, le = (t.to(dtype).requires_grad_(True) for t in logits)
        o, M = fn(q.to(dtype), k.to(dtype), v.to(dtype), torch.sigmoid(la), torch.sigmoid(le), M0.to(dtype))
        gen = torch.Generator().manual_seed(1)
        loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum() for t in (o, M))
        return torch.autograd.grad(loss, (la, le))

    ref = run(loop_fn(4), torch.float64)
    got = run(api_fn(4, backend), torch.float32)
    for name, g, r in zip(("alpha", "eta"), got, ref):  # measured <= 1e-6; a wrong sign or factor: >= 1
        assert rel_err(g, r) < 1e-4, f"d logit({name}) rel err {rel_err(g, r)}"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("BH", [(0, 2), (2, 0)])
def test_empty_batch_or_heads(backend, BH):
    """B = 0 or H = 0: empty outputs of the right shapes, forward and backward (as titans_memory)."""
    inputs = [t.requires_grad_(True) for t in make(B=BH[0], H=BH[1], L=5, dk=4, dv=3, dtype=torch.float32)]
    o, M = dgd_memory(*inputs[:5], chunk_size=2, initial_state=inputs[5], output_final_state=True, backend=backend)
    assert o.shape == (*BH, 5, 3) and M.shape == (*BH, 4, 3)
    grads = torch.autograd.grad(o.sum() + M.sum(), inputs)
    assert [g.shape for g in grads] == [t.shape for t in inputs]


@pytest.mark.parametrize("backend", ALL)
def test_chunk_size_above_length_is_length(backend, monkeypatch):
    """chunk_size > L gives the result of chunk_size = L, without building (C, C) tiles (the reference at
    C = 4096 held 1.2 GB for L = 5): the kernels get C = L."""
    import hope_kernels.ops.dgd as dgd
    import hope_kernels.ops.dgd.reference as dgd_reference

    inputs = make(B=1, H=2, L=5, dk=4, dv=3)
    ref = run_with_grads(api_fn(5, backend), inputs)
    # both take the chunk size last
    for module, name in ((dgd_reference, "_pad_chunks"), (type(dgd._DGD), "__call__")):

        def spy(*args, _fn=getattr(module, name), _name=name):
            assert args[-1] <= 5, f"{_name} got chunk_size={args[-1]} for L=5: not clamped"
            return _fn(*args)

        monkeypatch.setattr(module, name, spy)
    o, M, grads = run_with_grads(api_fn(4096, backend), inputs)
    assert torch.equal(o, ref[0]) and torch.equal(M, ref[1])
    assert all(torch.equal(g, g_r) for g, g_r in zip(grads, ref[2]))


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs():
    q, k, v, a, e, M0 = make(L=5, dk=4, dv=3)
    call = lambda **kw: dgd_memory(**{**dict(q=q, k=k, v=v, alpha=a, eta=e, initial_state=M0), **kw})
    with pytest.raises(ValueError, match=r"q must be \(B, H, L, dk\)"):
        call(q=q[0])
    with pytest.raises(ValueError, match="k must be"):
        call(k=k[..., :3])
    with pytest.raises(ValueError, match="v must be"):
        call(v=v[:, :, :4])
    with pytest.raises(ValueError, match="alpha must be"):
        call(alpha=a[..., :4])
    with pytest.raises(ValueError, match="eta must be"):
        call(eta=e[None])
    with pytest.raises(ValueError, match="initial_state must be"):
        call(initial_state=M0[..., :2])
    with pytest.raises(TypeError, match="dtype"):
        call(k=k.float())
    with pytest.raises(TypeError, match="floating"):
        call(q=q.long(), k=k.long(), v=v.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        call(q=q.tolist())
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        call(chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        call(chunk_size=2.0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        call(alpha=a * 0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        call(alpha=a + 1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        call(alpha=torch.where(a > 0.7, float("nan"), a))
    with pytest.raises(ValueError, match="eta must be finite and >= 0"):
        call(eta=-e)
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="fast")
    with pytest.raises(ValueError, match="must be >= 1"):
        call(q=q[:, :, :0], k=k[:, :, :0], v=v[:, :, :0], alpha=a[..., :0], eta=e[..., :0])
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            call(backend="cuda")


@pytest.mark.skipif("triton" not in FAST, reason="triton not available")
def test_triton_head_dim_limit():
    # head dims above 64 spill on sm_90 (docs/dgd.md, Limits): an explicit triton call says so
    q, k, v, a, e, M0 = make(L=5, dk=72, dv=8)
    with pytest.raises(ValueError, match=r"triton backend supports dk, dv <= 64, got dk=72"):
        dgd_memory(q, k, v, a, e, initial_state=M0, backend="triton")


def test_bad_device():
    q, k, v, a, e, M0 = make(L=5)
    with pytest.raises(ValueError, match="device"):
        dgd_memory(q, k, v, a, e, initial_state=M0.to("meta"))


@requires_cuda
def test_cuda_rejects_heads_too_big_for_shared_memory():
    """dk = dv = 256: 792 KB of backward tiles. Raised by the dispatcher, before the CUDA launcher (an error
    raised inside the Titans launcher crashed the process on an H200)."""
    q, k, v, a, e, _ = make(L=3, dk=256, dv=256, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        dgd_memory(q, k, v.requires_grad_(True), a, e, backend="cuda")
    o, _ = dgd_memory(q, k, v, a, e)  # auto: the reference
    assert torch.isfinite(o).all()


@requires_cuda
def test_gpu_auto_inside_torch_compile_fullgraph():
    """auto on CUDA tensors traces in one graph: the dispatcher's shared-memory lookup is a constant to dynamo."""
    inputs = make(L=9, dk=16, dv=8, dtype=torch.float32, device="cuda")
    torch._dynamo.reset()
    got = run_with_grads(torch.compile(api_fn(4, "auto"), fullgraph=True, backend="aot_eager"), inputs)
    assert_close(got, run_with_grads(loop_fn(4), [x.double() for x in inputs]), 1e-4, "auto compiled")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_triton_precomputed_t_matches_token_loop(monkeypatch, dtype):
    """HOPE_DGD_TSOLVE=precompute on the GPU (its compiled kernels: a one-warp solve, one pipeline stage), HOPE's
    own call included (one chunk of 258 tokens, dk = dv = 64). bf16: the reference runs on the same rounded
    inputs; the dots are tf32, so every output gets bf16's tolerance."""
    monkeypatch.setenv("HOPE_DGD_TSOLVE", "precompute")
    tol = 1e-4 if dtype == torch.float32 else RTOL[torch.bfloat16]
    for C, L, d in ((1, 7, 32), (16, 37, 32), (64, 130, 32), (258, 300, 64), (258, 258, 64)):
        inputs = make(L=L, dk=d, dv=d, dtype=torch.float32, device="cuda", eta_max=0.5)
        inputs = [x.to(dtype) for x in inputs[:5]] + [inputs[5]]
        ref = run_with_grads(loop_fn(C), [x.double() for x in inputs])
        got = run_with_grads(api_fn(C, "triton"), inputs)
        assert_close(got, ref, tol, f"triton precompute {dtype} C={C} L={L}")


@requires_cuda
def test_gpu_backends_match_token_loop():
    for backend in [b for b in ("triton", "cuda") if b in SUPPORTED]:
        for C, L in ((1, 7), (16, 37), (64, 130), (258, 300)):
            inputs = make(L=L, dk=32, dv=16, dtype=torch.float32, device="cuda")
            ref = run_with_grads(loop_fn(C), [x.double() for x in inputs])
            got = run_with_grads(api_fn(C, backend), inputs)
            assert_close(got, ref, 1e-4, f"{backend} cuda C={C} L={L}")


# ---------------------------------------------------------------- custom-op contract of the fast paths


@pytest.mark.parametrize("backend", FAST)
def test_outputs_fully_written(backend):
    # every tensor allocated with empty() is filled with NaN first: a kernel that skips an element fails here
    inputs = make(L=11, dk=8, dv=4)
    ref = run_with_grads(loop_fn(4), inputs)
    got = run_nan_poisoned(api_fn(4, backend), inputs)
    assert_close(got, ref, 1e-9, f"{backend} NaN-poisoned")


@pytest.mark.skipif("triton" not in FAST, reason="triton cannot run here")
@pytest.mark.parametrize("value_block", [0, 16, 32])
@pytest.mark.parametrize("C,L", [(16, 37), (40, 50)])
def test_triton_value_blocks_match_token_loop(monkeypatch, value_block, C, L):
    """The value columns split over programs (VALUE_BLOCK): dv = 40 in 1, 3 or 2 blocks (the last one partial),
    with one sub-chunk per chunk and with two (C = 40); dq, dk and the gates summed over blocks; every output
    element written (uninitialised memory NaN-filled)."""
    monkeypatch.setenv("HOPE_DGD_VALUE_BLOCK", str(value_block))
    inputs = make(B=1, H=2, L=L, dk=12, dv=40, eta_max=0.5)
    ref = run_with_grads(loop_fn(C), inputs)
    got = run_nan_poisoned(api_fn(C, "triton"), inputs)
    assert_close(got, ref, 1e-9, f"triton value block {value_block} C={C}")


@pytest.mark.skipif("triton" not in FAST, reason="triton cannot run here")
@pytest.mark.parametrize("C,L,dk", [(1, 5, 12), (4, 13, 12), (16, 37, 12), (40, 50, 12), (33, 70, 40), (80, 13, 12)])
def test_triton_precomputed_t_matches_token_loop(monkeypatch, C, L, dk):
    """HOPE_DGD_TSOLVE=precompute: every sub-chunk's T solved by dgd_tsolve_kernel before the walk. C = 1
    (S = 1 in a 16-row tile); one sub-chunk per chunk; C = 40 and dk = 12: sub-chunks of 32 (32 + 8); C = 33
    and dk = 40 (padded to 64): sub-chunks of 16 (16 + 16 + 1); L = 13 < C = 80 (sub-chunks past the end);
    three value blocks; NaN-filled outputs."""
    monkeypatch.setenv("HOPE_DGD_TSOLVE", "precompute")
    inputs = make(B=2, H=1, L=L, dk=dk, dv=40, eta_max=0.5)
    ref = run_with_grads(loop_fn(C), inputs)
    got = run_nan_poisoned(api_fn(C, "triton"), inputs)
    assert_close(got, ref, 1e-9, f"triton precomputed T C={C} L={L}")


@pytest.mark.skipif("triton" not in FAST, reason="triton cannot run here")
def test_triton_tsolve_env_must_be_a_mode(monkeypatch):
    monkeypatch.setenv("HOPE_DGD_TSOLVE", "fast")
    with pytest.raises(
        ValueError,
        match=r"HOPE_DGD_TSOLVE / tsolve must be one of \('inline', 'precompute'\), "
        r"got 'fast'",
    ):
        dgd_memory(*make(B=1, H=1, L=4, dk=4, dv=4)[:5], chunk_size=4, backend="triton")


@pytest.mark.skipif("triton" not in FAST, reason="triton cannot run here")
def test_triton_value_block_env_must_be_an_integer(monkeypatch):
    monkeypatch.setenv("HOPE_DGD_VALUE_BLOCK", "sixteen")
    with pytest.raises(ValueError, match="HOPE_DGD_VALUE_BLOCK must be an integer, got 'sixteen'"):
        dgd_memory(*make(B=1, H=1, L=4, dk=4, dv=4)[:5], chunk_size=4, backend="triton")


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    from hope_kernels.ops.dgd import _DGD

    op, backward_op = _DGD.ops[backend], _DGD.backward_ops[backend]
    q, k, v, a, e, M0 = make(B=1, H=1, L=5, dk=4, dv=4)
    leaves = [x.requires_grad_(True) for x in (q, k, v, a, e, M0)]
    torch.library.opcheck(op, (*leaves, 4))
    torch.library.opcheck(op, (q, k, v, a, e, None, 8))
    with torch.no_grad():
        _, _, states = op(q, k, v, a, e, M0, 4)
    torch.library.opcheck(
        backward_op,
        (
            q.detach(),
            k.detach(),
            v.detach(),
            a.detach(),
            e.detach(),
            states,
            torch.randn_like(v),
            torch.randn_like(M0),
            4,
        ),
    )


@pytest.mark.parametrize("backend", FAST)
def test_torch_compile(backend):
    inputs = make(L=9, dk=4, dv=4)
    ref = run_with_grads(loop_fn(4), inputs)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, a, e, M0):
        o, M = dgd_memory(q, k, v, a, e, chunk_size=4, initial_state=M0, output_final_state=True, backend=backend)
        return o * 1.0, M

    torch._dynamo.reset()
    got = run_with_grads(f, inputs)
    assert_close(got, ref, 1e-9, f"{backend} compiled")
