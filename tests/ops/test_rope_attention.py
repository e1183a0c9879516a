"""rope_attention / rope3d: reference against naive loops, every fast path against the reference (forward and
backward), edge shapes, both RoPE modes, window semantics, opcheck, torch.compile, NaN poison, bad inputs."""

import math

import pytest
import torch

from helpers import RTOL, rel_err, requires_cuda
from hope_kernels.ops import rope3d, rope_attention
from hope_kernels.ops.rope_attention import reference as ref


# ------------------------------------------------------------------------------------------------ helpers
def make_pos(T, H, W, actions=0, device="cpu"):
    """(t, h, w) per token for T timesteps of [actions action tokens (h = w = 0), H*W patches row-major]."""
    rows = []
    for t in range(T):
        rows += [(t, 0, 0)] * actions
        rows += [(t, h, w) for h in range(H) for w in range(W)]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def naive_rope(x, pos, compat=None):
    """Independent per-column loop over the maths of docs/design.md#rope-attention (true rotation or the vjepa2
    formula)."""
    d = x.shape[-1]
    n = 2 * (d // 6)
    out = x.clone().double()
    xd = x.double()
    for s in range(3):
        p = pos[:, s].double()
        for c in range(n):
            j = c // 2 if compat is None else c % (n // 2)
            a = p * 10000.0 ** (-2.0 * j / n)
            col = s * n + c
            partner = -xd[..., col + 1] if c % 2 == 0 else xd[..., col - 1]
            out[..., col] = xd[..., col] * torch.cos(a) + partner * torch.sin(a)
    return out


def naive_attention(q, k, v, pos, window=None, compat=None, scale=None):
    qr, kr, v = naive_rope(q, pos, compat), naive_rope(k, pos, compat), v.double()
    L, d = q.shape[-2:]
    scale = 1 / math.sqrt(d) if scale is None else scale
    t = pos[:, 0].tolist()
    out = torch.empty_like(qr)
    for i in range(L):
        js = [j for j in range(L) if t[j] <= t[i] and (window is None or t[i] - t[j] < window)]
        s = (qr[..., i : i + 1, :] * kr[..., js, :]).sum(-1) * scale
        out[..., i, :] = (s.softmax(-1)[..., None] * v[..., js, :]).sum(-2)
    return out


def qkv(B, H, L, d, dtype=torch.float32, device="cpu", grad=False):
    return [torch.randn(B, H, L, d, dtype=dtype, device=device, requires_grad=grad) for _ in range(3)]


def attn_backends_cpu():
    from hope_kernels import backends
    from hope_kernels.ops.rope_attention import _ATTN_BACKENDS

    avail = backends()
    return [b for b in ("cpu", "triton") if b in _ATTN_BACKENDS and avail[b]]


def rope_backends_cpu():
    from hope_kernels import backends
    from hope_kernels.ops.rope_attention import _ROPE_BACKENDS

    return [b for b in ("cpu",) if b in _ROPE_BACKENDS and backends()[b]]


# -------------------------------------------------------------------------------------- reference maths
@pytest.mark.parametrize("compat", [None, "vjepa2"])
@pytest.mark.parametrize("d", [6, 32, 64, 70])
def test_rope3d_reference_matches_naive(compat, d):
    pos = make_pos(3, 2, 3, actions=1)
    x = torch.randn(2, 2, pos.shape[0], d, dtype=torch.float64)
    assert rel_err(ref.rope3d_reference(x, pos, compat), naive_rope(x, pos, compat)) < 1e-12


def test_rope3d_remainder_unrotated_and_actions():
    d = 64  # slices of 20: columns 60..63 stay as they are
    pos = make_pos(2, 2, 2, actions=1)
    x = torch.randn(pos.shape[0], d, dtype=torch.float64)
    y = ref.rope3d_reference(x, pos)
    assert torch.equal(y[:, 60:], x[:, 60:])
    a = pos[:, 1] == 0
    a &= pos[:, 2] == 0  # action tokens and patch (0, 0): h, w slices fixed
    assert torch.allclose(y[a, 20:60], x[a, 20:60], atol=1e-15)
    assert not torch.allclose(y[pos[:, 0] > 0, :20], x[pos[:, 0] > 0, :20])


def test_rope3d_vjepa2_is_official_formula():
    """rope_compat='vjepa2': per slice, angles tiled [f_0..f_{n/2-1}, f_0..f_{n/2-1}] (torch `repeat`), then
    x * cos + (-x_odd, x_even interleaved) * sin, as in the official rotate_queries_or_keys."""
    d, L = 64, 7
    pos = torch.stack([torch.arange(L) // 3, torch.arange(L) % 3, (torch.arange(L) * 5) % 4], 1)
    x = torch.randn(1, 2, L, d, dtype=torch.float64)
    n = 20
    parts = []
    for s in range(3):
        xs = x[..., s * n : (s + 1) * n]
        omega = 1.0 / 10000 ** (torch.arange(n // 2, dtype=torch.float64) / (n / 2))
        freq = pos[:, s].double()[:, None] * omega  # (L, n/2)
        cos, sin = freq.cos().repeat(1, 2), freq.sin().repeat(1, 2)  # tiled, not interleaved
        pairs = xs.unflatten(-1, (-1, 2))
        rot = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
        parts.append(xs * cos + rot * sin)
    parts.append(x[..., 3 * n :])
    assert rel_err(ref.rope3d_reference(x, pos, "vjepa2"), torch.cat(parts, -1)) < 1e-13


def test_rope3d_true_rotation_preserves_norms_vjepa2_does_not():
    pos = make_pos(4, 3, 3, actions=1) * 7
    x = torch.randn(3, pos.shape[0], 64, dtype=torch.float64)
    pair_norm = lambda z: z.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    assert torch.allclose(pair_norm(ref.rope3d_reference(x, pos)), pair_norm(x), atol=1e-12)
    assert not torch.allclose(pair_norm(ref.rope3d_reference(x, pos, "vjepa2")), pair_norm(x), atol=1e-6)


def test_rope3d_scores_depend_only_on_position_differences():
    pos = make_pos(3, 2, 2, actions=1)
    q = torch.randn(pos.shape[0], 32, dtype=torch.float64)
    k = torch.randn(pos.shape[0], 32, dtype=torch.float64)
    shift = torch.tensor([5, -3, 11])
    s0 = ref.rope3d_reference(q, pos) @ ref.rope3d_reference(k, pos).T
    s1 = ref.rope3d_reference(q, pos + shift) @ ref.rope3d_reference(k, pos + shift).T
    assert torch.allclose(s0, s1, atol=1e-12)


@pytest.mark.parametrize("window", [None, 1, 2])
@pytest.mark.parametrize("compat", [None, "vjepa2"])
def test_reference_attention_matches_naive(window, compat):
    pos = make_pos(4, 2, 2, actions=1)
    q, k, v = qkv(2, 2, pos.shape[0], 12, torch.float64)
    out = rope_attention(q, k, v, pos, window=window, rope_compat=compat, backend="reference")
    assert rel_err(out, naive_attention(q, k, v, pos, window, compat)) < 1e-12


def test_window_semantics():
    """window = timesteps visible, the current one included: window=1 -> own timestep only."""
    t = torch.tensor([0, 0, 1, 2, 2, 3])
    m = ref.block_causal_mask(t, 2)
    assert m.tolist()[3] == [False, False, True, True, True, False]
    assert ref.block_causal_mask(t, 1).tolist()[2] == [False, False, True, False, False, False]
    assert ref.block_causal_mask(t).tolist()[5] == [True] * 6
    assert ref.block_causal_mask(t).tolist()[0] == [True, True, False, False, False, False]


def test_scale_argument():
    pos = make_pos(2, 1, 3)
    q, k, v = qkv(1, 1, pos.shape[0], 12, torch.float64)
    out = rope_attention(q, k, v, pos, scale=0.3, backend="reference")
    assert rel_err(out, naive_attention(q, k, v, pos, scale=0.3)) < 1e-12


# ------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    pos = make_pos(2, 2, 2)
    L = pos.shape[0]
    q, k, v = qkv(1, 2, L, 12)
    with pytest.raises(ValueError, match=r"pos must be \(L, 3\)"):
        rope_attention(q, k, v, pos[:, :2])
    with pytest.raises(ValueError, match=r"pos must be \(L, 3\)"):
        rope_attention(q, k, v, pos[:-1])
    with pytest.raises(TypeError, match="integer dtype"):
        rope_attention(q, k, v, pos.float())
    for narrow in (torch.uint8, torch.int16):  # uint8 t_i - t_j wrapped: every query saw the future
        with pytest.raises(TypeError, match=r"int32 or int64"):
            rope_attention(q, k, v, pos.to(narrow))
    with pytest.raises(ValueError, match="non-decreasing"):
        rope_attention(q, k, v, pos.flip(0))
    with pytest.raises(ValueError, match="even and >= 6"):
        rope_attention(*qkv(1, 2, L, 13), pos)
    with pytest.raises(ValueError, match="even and >= 6"):
        rope_attention(*qkv(1, 2, L, 4), pos)
    with pytest.raises(ValueError, match="shape of q"):
        rope_attention(q, k[:, :1], v, pos)
    with pytest.raises(ValueError, match=r"\(B, H, L, d\)"):
        rope_attention(q[0], k[0], v[0], pos)
    with pytest.raises(TypeError, match="dtype"):
        rope_attention(q, k.double(), v, pos)
    with pytest.raises(TypeError, match="floating-point"):
        rope_attention(q.int(), k.int(), v.int(), pos)
    with pytest.raises(ValueError, match="window"):
        rope_attention(q, k, v, pos, window=0)
    with pytest.raises(ValueError, match="rope_compat"):
        rope_attention(q, k, v, pos, rope_compat="vjepa")
    with pytest.raises(ValueError, match="scale"):
        rope_attention(q, k, v, pos, scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        rope_attention(q, k, v, pos, backend="nope")
    with pytest.raises(ValueError, match="pos must be"):
        rope3d(q, pos[:3])
    with pytest.raises(ValueError, match="even and >= 6"):
        rope3d(q[..., :5], pos)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            rope_attention(q, k, v, pos.cuda())
    else:
        with pytest.raises(ValueError, match="device"):
            rope_attention(q, k, v.to("meta"), pos)


def test_pos_order_read_once_per_tensor_version(monkeypatch):
    """The t-order check reads pos (a host sync on a GPU): once per pos tensor, again after an in-place edit."""
    pos = make_pos(2, 2, 2)
    q, k, v = qkv(1, 2, pos.shape[0], 12)
    rope_attention(q, k, v, pos, backend="reference")
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "nonzero", lambda *a, **kw: pytest.fail("pos was read again"))
        rope_attention(q, k, v, pos, backend="reference")
    pos[:, 0] = pos[:, 0].flip(0)
    with pytest.raises(ValueError, match="non-decreasing"):
        rope_attention(q, k, v, pos, backend="reference")


def test_block_causal_mask_of_unsigned_timesteps():
    t = torch.tensor([0, 0, 1, 2, 2, 3])
    for window in (None, 2):
        assert torch.equal(ref.block_causal_mask(t.to(torch.uint8), window), ref.block_causal_mask(t, window))
    assert not ref.block_causal_mask(t.to(torch.uint8))[0, 2]


def test_triton_rejects_more_heads_than_a_grid_axis():
    from hope_kernels.ops.rope_attention.triton import rope_attention_fwd_triton

    pos = make_pos(1, 1, 1)
    q = torch.zeros(1, 65536, 1, 6)
    w = torch.zeros(3, 6)
    with pytest.raises(ValueError, match="B \\* H = 65536 exceeds 65535"):
        rope_attention_fwd_triton(q, q, q, pos, w, 0, 1.0)


# ------------------------------------------------------------------------------ fast paths vs reference
# (T, H, W, actions, truncate, d, window, compat): L not a multiple of any block (16 in the interpreter,
# 32/64 on GPU), T = 1, one token per timestep, action tokens, window on/off, both RoPE modes, d with an
# unrotated remainder (32: 2 columns, 64: 4) and a half width that is not a power of two (48).
CASES = [
    (4, 3, 3, 1, 37, 32, None, None),
    (4, 3, 3, 1, None, 64, 2, "vjepa2"),
    (1, 5, 5, 0, 23, 48, None, "vjepa2"),
    (20, 1, 1, 0, None, 32, 3, None),
    (3, 3, 3, 1, None, 128, 1, None),
]
CASE_IDS = ["L37-d32", "win2-vjepa2-d64", "T1-d48", "token-per-step-win3", "win1-d128"]


def _fwd_bwd(fn, q, k, v, g):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), g))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", attn_backends_cpu())
def test_fast_attention_matches_reference(backend, case):
    T, Hg, Wg, actions, trunc, d, window, compat = case
    pos = make_pos(T, Hg, Wg, actions)[:trunc]
    q, k, v = qkv(1, 2, pos.shape[0], d)
    g = torch.randn_like(q)
    got = _fwd_bwd(
        lambda a, b, c: rope_attention(a, b, c, pos, window=window, rope_compat=compat, backend=backend), q, k, v, g
    )
    want = _fwd_bwd(
        lambda a, b, c: rope_attention(a, b, c, pos, window=window, rope_compat=compat, backend="reference"),
        q.double(),
        k.double(),
        v.double(),
        g.double(),
    )
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < 5 * RTOL[torch.float32], name


def _uneven_pos(sizes):
    """pos with timestep t holding sizes[t] tokens (h, w running over the tokens)."""
    rows = [(t, i // 4, i % 4) for t, n in enumerate(sizes) for i in range(n)]
    return torch.tensor(rows, dtype=torch.int64)


requires_ext = pytest.mark.skipif("cpu" not in attn_backends_cpu(), reason="the C++ extension is not built")


@requires_ext
@pytest.mark.parametrize("avx2", ["1", "0"], ids=["avx2-if-cpu-has-it", "baseline-isa"])
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_block_attention_matches_reference(monkeypatch, dtype, window, avx2):
    """The cpu backend (C++ rotation + block kernels of csrc/block_attention_cpu.cpp) against the float64
    reference, forward and backward: timesteps of 1, 7, 130 (cut into row tiles: 130 > 96) and 23 tokens, d = 40
    (columns past the register tiles), q, k, v as head views of (B, L, H, d) memory; both builds of the kernels.
    o is a (B, H, L, d) view of (B, L, H, d) memory (merging the heads is a view), the gradients contiguous."""
    monkeypatch.setenv("HOPE_KERNELS_NO_AVX2", "0" if avx2 == "1" else "1")
    pos = _uneven_pos([1, 7, 130, 23])
    B, H, L, d = 2, 3, pos.shape[0], 40
    q, k, v, g = (torch.randn(B, L, H, d, dtype=torch.float64).transpose(1, 2) for _ in range(4))
    want = _fwd_bwd(lambda a, b, c: ref.rope_attention_reference(a, b, c, pos, window, "vjepa2", 0.3), q, k, v, g)
    got = _fwd_bwd(
        lambda a, b, c: rope_attention(a, b, c, pos, window=window, rope_compat="vjepa2", scale=0.3, backend="cpu"),
        *(x.to(dtype) for x in (q, k, v, g)),
    )
    tol = {torch.float64: 1e-12, torch.float32: 5 * RTOL[torch.float32], torch.bfloat16: 2e-2}[dtype]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == (B, H, L, d), name
        assert (a.transpose(1, 2) if name == "o" else a).is_contiguous(), name
        assert rel_err(a, b) < tol, name


@requires_ext
@pytest.mark.parametrize("window", [None, 2])
def test_cpu_block_attention_reads_no_masked_key(window):
    """Keys and values a query may not see are never read: NaN in them leaves the outputs and dq of the queries
    that cannot see them finite and equal to the reference without them (dk, dv of the other keys take 0 * NaN
    from the queries that do see them). 4 timesteps of 7 tokens; no
    window: the last timestep's k, v are NaN; window 2: the first timestep's (the last two timesteps cannot
    see it)."""
    pos = make_pos(4, 2, 3, actions=1)
    q, k, v = qkv(1, 2, pos.shape[0], 16, dtype=torch.float64)
    bad, good = (slice(21, 28), slice(0, 21)) if window is None else (slice(0, 7), slice(14, 28))
    keys = slice(0, 21) if window is None else slice(7, 28)  # what the good queries see, all of it finite
    kn, vn = k.clone(), v.clone()
    kn[:, :, bad] = vn[:, :, bad] = float("nan")
    g = torch.zeros_like(q)
    g[:, :, good] = torch.randn_like(q[:, :, good])
    got = _fwd_bwd(lambda a, b, c: rope_attention(a, b, c, pos, window=window, backend="cpu"), q, kn, vn, g)
    sub = lambda x: x[:, :, keys]  # noqa: E731
    want = _fwd_bwd(
        lambda a, b, c: ref.rope_attention_reference(a, b, c, pos[keys], window), sub(q), sub(k), sub(v), sub(g)
    )
    rows = slice(good.start - keys.start, good.stop - keys.start)
    assert rel_err(got[0][:, :, good], want[0][:, :, rows]) < 1e-12
    assert rel_err(got[1][:, :, good], want[1][:, :, rows]) < 1e-12  # dq of the good queries


@requires_ext
def test_cpu_attention_opcheck():
    pos = _uneven_pos([3, 5, 4])
    q, k, v = qkv(2, 2, pos.shape[0], 8, dtype=torch.float64, grad=True)
    for args in ((2, True, 0.5), (0, False, 0.3)):
        torch.library.opcheck(torch.ops.hope_kernels.rope_attention_cpu, (q, k, v, pos, *args))


@requires_ext
def test_cpu_block_attention_bad_inputs():
    """The C++ op names the wrong argument (rope_attention checks first; this guards direct calls)."""
    pos = make_pos(2, 1, 2)
    q, k, v = qkv(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match=r"pos must be \(L, 3\)"):
        torch.ops.hope_kernels.block_attention_fwd(q, k, v, pos[:3], 0, 1.0)
    with pytest.raises(RuntimeError, match="q, k, v must have one shape"):
        torch.ops.hope_kernels.block_attention_fwd(q, k[:, :, :3], v, pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        torch.ops.hope_kernels.block_attention_fwd(q, k, v, pos, -1, 1.0)


@pytest.mark.parametrize("backend", attn_backends_cpu())
def test_fast_attention_bf16(backend):
    """bf16 inputs: error against a float64 reference at most 2x that of the eager bf16 reference (+ slack)."""
    pos = make_pos(3, 3, 3, actions=1)[:29]
    q, k, v = qkv(1, 2, pos.shape[0], 32)
    g = torch.randn_like(q)
    lo = [x.bfloat16() for x in (q, k, v, g)]
    f = lambda b: lambda a, c, e: rope_attention(a, c, e, pos, window=2, backend=b)  # noqa: E731
    want = _fwd_bwd(f("reference"), q.double(), k.double(), v.double(), g.double())
    eager = _fwd_bwd(f("reference"), *lo)
    got = _fwd_bwd(f(backend), *lo)
    for name, a, e, w in zip(("o", "dq", "dk", "dv"), got, eager, want):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, w) <= 2 * rel_err(e, w) + 2e-3, name


@pytest.mark.skipif("triton" not in attn_backends_cpu(), reason="triton cannot run here")
def test_triton_outputs_fully_written(monkeypatch):
    """Every kernel-allocated output (o, lse, dq, dk, dv) starts as NaN: any unwritten element shows up."""
    from hope_kernels.ops.rope_attention import triton as tri

    monkeypatch.setattr(tri, "_empty_like", lambda x: torch.full_like(x, float("nan")))
    pos = make_pos(3, 2, 3, actions=1)[:19]
    q, k, v = qkv(2, 1, pos.shape[0], 32)
    o, lse = torch.ops.hope_kernels.rope_attention_triton(q, k, v, pos, 0, False, 0.2)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    got = _fwd_bwd(lambda a, b, c: rope_attention(a, b, c, pos, backend="triton"), q, k, v, torch.randn_like(q))
    want = _fwd_bwd(lambda a, b, c: rope_attention(a, b, c, pos, backend="reference"), q, k, v, torch.ones_like(q))
    assert all(torch.isfinite(x).all() for x in got)
    assert rel_err(got[0], want[0]) < 5 * RTOL[torch.float32]


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("block,step", [(16, 16), (32, 16), (16, 32), (64, 32)])
def test_triton_tile_ranges(block, step, window):
    """The host-side tile ranges against the mask: every visible pair lies in [lo, hi), and the tiles marked
    whole (fwd/dq: [lo, mid); dk/dv: [mid, hi)) are fully visible to every real row of the block."""
    from hope_kernels.ops.rope_attention.triton import _NO_WINDOW, _ranges

    t = torch.tensor(sorted(torch.randint(0, 6, (61,)).tolist()))
    L = t.shape[0]
    mask = ref.block_causal_mask(t, window)  # (query, key)
    win = window or _NO_WINDOW
    for keys_of_queries, m in ((True, mask), (False, mask.T)):
        lo, mid, hi = _ranges(t, block, step, win, keys_of_queries=keys_of_queries)
        for b in range(lo.shape[0]):
            own = m[b * block : (b + 1) * block]  # rows of this block, partners as columns
            seen = own.any(0).nonzero().flatten()
            assert seen.min() >= lo[b] and seen.max() < hi[b]
            whole = range(int(lo[b]), int(mid[b]), step) if keys_of_queries else range(int(mid[b]), int(hi[b]), step)
            # the two loops (lo -> mid, mid -> hi) must not overlap: mid on lo's tile grid, or at hi
            assert (int(mid[b]) - int(lo[b])) % step == 0 or mid[b] == hi[b]
            for start in whole:
                assert own[:, start : min(start + step, L)].all(), (b, start)
                assert keys_of_queries is False or start + step <= L  # unmasked key tiles never cross L
        if window is None and block == step == 16:
            assert any((mid - lo) > 0 if keys_of_queries else (hi - mid) > 0)  # the case is exercised


@pytest.mark.skipif("triton" not in attn_backends_cpu(), reason="triton cannot run here")
@pytest.mark.parametrize("config", ["32,16,1,1", "16,32,1,1"])
def test_triton_unequal_tiles(monkeypatch, config):
    """BM != BN: the masked / whole tile split holds when query blocks and key tiles differ in size."""
    monkeypatch.setenv("HOPE_ROPE_CONFIG", config)
    pos = make_pos(4, 3, 4, actions=1)[:53]
    q, k, v = qkv(1, 2, pos.shape[0], 32)
    g = torch.randn_like(q)
    got = _fwd_bwd(lambda a, b, c: rope_attention(a, b, c, pos, backend="triton"), q, k, v, g)
    want = _fwd_bwd(lambda a, b, c: rope_attention(a, b, c, pos, backend="reference"), q, k, v, g)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < 5 * RTOL[torch.float32], name


@pytest.mark.skipif("triton" not in attn_backends_cpu(), reason="triton cannot run here")
def test_triton_opcheck():
    pos = make_pos(2, 2, 2, actions=1)[:9]
    q, k, v = qkv(1, 1, pos.shape[0], 32, grad=True)
    torch.library.opcheck(
        torch.ops.hope_kernels.rope_attention_triton.default,
        (q, k, v, pos, 2, True, 0.25),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("backend", attn_backends_cpu())
def test_fast_attention_torch_compile(backend):
    pos = make_pos(2, 2, 3, actions=1)[:13]
    q, k, v = qkv(1, 2, pos.shape[0], 32)
    g = torch.randn_like(q)
    fn = torch.compile(lambda a, b, c: rope_attention(a, b, c, pos, window=1, backend=backend), fullgraph=True)
    got = _fwd_bwd(fn, q, k, v, g)
    want = _fwd_bwd(lambda a, b, c: rope_attention(a, b, c, pos, window=1, backend="reference"), q, k, v, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 5 * RTOL[torch.float32]


# ----------------------------------------------------------------------- compiled rotation (cpu / cuda)
@pytest.mark.parametrize("compat", [None, "vjepa2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", rope_backends_cpu())
def test_rope3d_fast_matches_reference(backend, dtype, compat):
    pos = make_pos(3, 3, 4, actions=1) * 3
    x = torch.randn(2, 3, pos.shape[0], 70, dtype=dtype)  # d = 70: 22-column slices, 4 unrotated
    g = torch.randn_like(x)
    xs = [x.detach().requires_grad_(True) for _ in range(2)]
    y = rope3d(xs[0], pos, rope_compat=compat, backend=backend)
    y_ref = rope3d(xs[1], pos, rope_compat=compat, backend="reference")
    (gx,) = torch.autograd.grad(y, xs[0], g)
    (gx_ref,) = torch.autograd.grad(y_ref, xs[1], g)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert y.dtype == dtype and gx.dtype == dtype
    assert rel_err(y, y_ref) < tol and rel_err(gx, gx_ref) < tol


@pytest.mark.parametrize("backend", rope_backends_cpu())
def test_rope3d_backward_is_inverse_rotation(backend):
    """For the true rotation the gradient map is the inverse: bwd(fwd(x)) == x."""
    pos = make_pos(2, 3, 3, actions=1) * 5
    x = torch.randn(2, pos.shape[0], 32, dtype=torch.float64)
    y = getattr(torch.ops.hope_kernels, f"rope3d_{backend}")(x, pos, False)
    assert torch.allclose(getattr(torch.ops.hope_kernels, f"rope3d_{backend}_backward")(y, pos, False), x, atol=1e-12)


@pytest.mark.parametrize("backend", rope_backends_cpu())
def test_rope3d_opcheck_and_compile(backend):
    pos = make_pos(2, 2, 2, actions=1)
    x = torch.randn(2, pos.shape[0], 32, requires_grad=True)
    ops = torch.ops.hope_kernels
    torch.library.opcheck(getattr(ops, f"rope3d_{backend}").default, (x, pos, True))
    torch.library.opcheck(getattr(ops, f"rope3d_{backend}_backward").default, (x.detach(), pos, False))
    fn = torch.compile(lambda a: rope3d(a, pos, backend=backend), fullgraph=True)
    assert rel_err(fn(x), rope3d(x, pos, backend="reference")) < 1e-6


# --------------------------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_attention_matches_reference(backend, dtype, case):
    from hope_kernels import backends

    if not backends()[backend]:
        pytest.skip(f"{backend} not available")
    T, Hg, Wg, actions, trunc, d, window, compat = case
    pos = make_pos(T, Hg, Wg, actions, device="cuda")[:trunc]
    q, k, v = qkv(2, 3, pos.shape[0], d, device="cuda")
    g = torch.randn_like(q)
    f = lambda b: lambda a, c, e: rope_attention(a, c, e, pos, window=window, rope_compat=compat, backend=b)  # noqa
    want = _fwd_bwd(f("reference"), q.double(), k.double(), v.double(), g.double())
    if dtype == torch.float32:
        got = _fwd_bwd(f(backend), q, k, v, g)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert rel_err(a, b) < 1e-4, name  # SDPA / tl.dot on GPU: fp32 with fast math
    else:
        lo = [x.to(dtype) for x in (q, k, v, g)]
        eager = _fwd_bwd(f("reference"), *lo)
        got = _fwd_bwd(f(backend), *lo)
        for name, a, e, w in zip(("o", "dq", "dk", "dv"), got, eager, want):
            assert rel_err(a, w) <= 2 * rel_err(e, w) + 2e-3, name


@requires_cuda
def test_gpu_triton_long_sequence_and_auto():
    pos = make_pos(8, 16, 16, actions=1, device="cuda")
    q, k, v = qkv(1, 2, pos.shape[0], 64, torch.bfloat16, device="cuda")
    o = rope_attention(q, k, v, pos, window=3)
    ref_o = rope_attention(q.double(), k.double(), v.double(), pos, window=3, backend="reference")
    eager = rope_attention(q, k, v, pos, window=3, backend="reference")
    assert rel_err(o, ref_o) <= 2 * rel_err(eager, ref_o) + 2e-3
