"""Predictors: shapes, presets, causality (memory included), action dependence, rollout gradients, HOPE memory
carry and CMS levels, official V-JEPA 2-AC key mapping, RoPE properties."""

import math

import pytest
import torch

from helpers import rel_err
from hope_kernels.models import build_predictor, predictor_from_config
from hope_kernels.ops import rope_attention

GRID, ENC = (3, 2, 2), 16
SMALL = dict(enc_dim=ENC, grid=GRID, width=24, heads=2, depth=2)
VARIANTS = [
    ("ac", {}),
    ("hope", {}),
    ("hope", dict(self_referential=False)),
    ("hope", dict(memory_rule="titans")),
    ("hope", dict(cms=False)),
    ("ac", dict(state_dim=3)),
    ("hope", dict(state_dim=3)),
]


def make(kind, **kw):
    m = build_predictor(kind, **{**SMALL, **kw}).double()
    with torch.no_grad():  # predict_delta zero-initialises the head: give it weights, as training would
        m.proj.weight.normal_(0, 0.02)
    return m


def inputs(B=2, T=3, S=0):
    z = torch.randn(B, T, GRID[1] * GRID[2], ENC, dtype=torch.float64)
    a = torch.randn(B, T, 2, dtype=torch.float64)
    s = torch.randn(B, T, S, dtype=torch.float64) if S else None
    return z, a, s


@pytest.mark.parametrize("kind,kw", VARIANTS)
def test_shapes_and_causality(kind, kw):
    m = make(kind, **kw)
    z, a, s = inputs(S=kw.get("state_dim", 0))
    y = m(z, a, s)
    assert y.shape == z.shape and m.kind == kind and torch.isfinite(y).all()
    for tp in range(1, z.shape[1]):
        for which in ("z", "a") + (("s",) if s is not None else ()):
            z2, a2 = z.clone(), a.clone()
            s2 = None if s is None else s.clone()
            {"z": z2, "a": a2, "s": s2}[which][:, tp] += torch.randn_like(
                z2[:, tp] if which == "z" else a2[:, tp] if which == "a" else s2[:, tp]
            )
            y2 = m(z2, a2, s2)
            torch.testing.assert_close(y2[:, :tp], y[:, :tp], rtol=0, atol=1e-12)
            assert (y2[:, tp] - y[:, tp]).abs().max() > 1e-6, f"{which}[:, {tp}] does not reach z_hat[:, {tp}]"


@pytest.mark.parametrize("kind", ["ac", "hope"])
def test_rollout_matches_forward_and_gradients_reach_first_step(kind):
    m = make(kind)
    z, a, _ = inputs()
    zc = z[:, :1].clone().requires_grad_(True)
    r = m.rollout(zc, a, steps=2)
    assert r.shape == (2, 2, 4, ENC)
    torch.testing.assert_close(r[:, 0], m(z[:, :1], a[:, :1])[:, 0])
    # step 2 is the forward on [z0, prediction]
    torch.testing.assert_close(r[:, 1], m(torch.cat([z[:, :1], r[:, :1].detach()], 1), a[:, :2])[:, 1])
    r[:, -1].abs().sum().backward()
    assert zc.grad is not None and zc.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="actions"):
        m.rollout(z[:, :2], a, steps=3)


@pytest.mark.parametrize("kind", ["ac", "hope"])
def test_positions_built_once_per_length(kind, monkeypatch):
    """Every forward of one length passes the same pos tensor, so rope_attention's order check (a host sync
    on a GPU) reads it once; a new length builds its own."""
    import hope_kernels.models.base as base
    from hope_kernels.models.rope import token_positions

    lengths = []
    monkeypatch.setattr(base, "token_positions", lambda T, *a, **kw: lengths.append(T) or token_positions(T, *a, **kw))
    m = make(kind)
    for T in (3, 3, 2, 3):
        z, a, _ = inputs(T=T)
        m(z, a)
    assert lengths == [3, 2]


@pytest.mark.parametrize("kw", [{}, dict(memory_rule="titans"), dict(self_referential=False)])
def test_hope_memory_survives_a_clip(kw):
    """The retention gate is per timestep (each of its P tokens keeps the P-th root): an untrained memory keeps
    most of its norm over one clip. With 0.99 per token it kept 0.4% over 8 timesteps of 65 tokens, so carrying
    memory across clips changed nothing."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    T, P = 8, 65
    m = build_predictor("hope", "tiny", enc_dim=16, grid=(T, 8, 8), **kw)
    mem = m.blocks[0].memory
    x = F.layer_norm(torch.randn(1, T * P, m.config.width), (m.config.width,))
    out_mem = lambda s: (s[0] if isinstance(s, tuple) else s)[..., -mem.dh :]  # noqa: E731
    state = mem.initial_state(1)
    start = out_mem(state).norm()
    with torch.no_grad():
        for t in range(T):
            _, state = mem(x[:, t * P : (t + 1) * P], 1, state)
    assert out_mem(state).norm() > 0.5 * start  # measured 0.89 (0.005 with per-token retention)


@pytest.mark.parametrize("kw", [{}, dict(memory_rule="titans")])
def test_hope_memory_stays_bounded_across_clips(kw):
    """The self-generated targets have unit length per memory: a memory carried over 30 clips of an untrained
    model stays finite and near its start norm (with raw targets it went 20 -> 400 -> NaN within 4 clips)."""
    torch.manual_seed(0)
    m = build_predictor("hope", "tiny", enc_dim=16, grid=(4, 4, 4), **kw)
    m.carry_memory = True
    norms = []
    with torch.no_grad():
        for _ in range(30):
            m(torch.randn(1, 4, 16, 16), torch.randn(1, 4, 2))
            norms.append(max(float((s[0] if isinstance(s, tuple) else s).norm()) for s in m._memory))
    assert all(n == n and n < 3 * norms[0] for n in norms), norms


def test_predictions_depend_on_actions_only_forward_in_time():
    m = make("ac")
    z, a, _ = inputs()
    a2 = a.clone()
    a2[:, 0] += 1.0
    y, y2 = m(z, a), m(z, a2)
    assert all((y2[:, t] - y[:, t]).abs().max() > 1e-6 for t in range(3))


def test_hope_carry_memory():
    m = make("hope")
    z, a, _ = inputs(B=1)
    y0 = m(z, a)
    m.carry_memory = True
    y1 = m(z, a)
    torch.testing.assert_close(y1, y0)  # first call starts from the learned initial state
    stored = [s.clone() for s in m._memory]
    assert all(not s.requires_grad for s in m._memory)
    m.rollout(z[:, :1], a, steps=2)  # rollouts read but never store the memory
    assert all(torch.equal(s, t) for s, t in zip(stored, m._memory))
    y2 = m(z, a)
    assert (y2 - y1).abs().max() > 1e-6  # second call starts from the carried state
    m.reset_memory()
    torch.testing.assert_close(m(z, a), y0)
    m(*inputs(B=2)[:2])
    with pytest.raises(ValueError, match="batch"):
        m(*inputs(B=3)[:2])


@pytest.mark.parametrize("rule", ["dgd", "titans"])
def test_hope_memory_layouts_agree(monkeypatch, rule):
    # the five memories share q, k and the gates and the rules act per value column: one wide memory (CPU
    # layout) and five memories stacked along heads (CUDA layout) give the same outputs, end state and gradients
    from hope_kernels.models.hope_predictor import SelfModifyingMemory, _stack, _unstack

    t = torch.randn(2, 3, 4, 5 * 6)
    assert torch.equal(_unstack(_stack(t, 5), 5), t)
    m = make("hope", memory_rule=rule)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, a, _ = inputs()
    w = torch.randn_like(z)
    got = []
    for stack in (False, True):
        monkeypatch.setattr(SelfModifyingMemory, "stack_memories", stack)
        m.zero_grad()
        m.carry_memory = True
        m.reset_memory()
        y = m(z, a)
        (y * w).sum().backward()
        state = [torch.cat([u.flatten() for u in s]) if isinstance(s, tuple) else s.flatten() for s in m._memory]
        got.append((y.detach(), torch.cat(state), [p.grad.clone() for p in m.parameters()]))
    (y0, s0, g0), (y1, s1, g1) = got
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, s0, rtol=1e-12, atol=1e-12)
    for p0, p1 in zip(g0, g1):
        torch.testing.assert_close(p1, p0, rtol=1e-10, atol=1e-12)
    assert max(g.abs().max() for g in g0) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind,kw", [("ac", {}), ("hope", {}), ("hope", dict(memory_rule="titans"))])
def test_gpu_predictor_matches_cpu(kind, kw):
    """The whole model on the GPU paths (Triton attention, stacked HOPE memories on the Triton memory kernels)
    and on the CPU paths (C++ kernels, wide memories), both float32, against the float64 CPU model: outputs and
    every parameter gradient. On the CPU, float32 loses 1e-7 (outputs) to 2.5e-6 (gate gradients) here. TF32 is
    off for the GPU pass: cuDNN convolutions (the stem) default to TF32, which on an H200 moved the output by
    6e-5 and the stem's gradient by 8e-4 and hid whatever the package's own kernels lose."""
    torch.manual_seed(0)
    m = make(kind, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, a = inputs()[:2]
    w = torch.randn_like(z)
    got = {}
    for dev, dt in (("cpu", torch.float64), ("cpu", torch.float32), ("cuda", torch.float32)):
        md = m.to(device=dev, dtype=dt)
        md.zero_grad()
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                y = md(z.to(dev, dt), a.to(dev, dt))
                (y * w.to(dev, dt)).sum().backward()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        got[(dev, dt)] = (
            y.detach().cpu().double(),
            {n: p.grad.detach().cpu().double().clone() for n, p in md.named_parameters()},
        )
    y64, g64 = got[("cpu", torch.float64)]
    report = {}
    for dev in ("cpu", "cuda"):
        y, g = got[(dev, torch.float32)]
        errs = {n: rel_err(g[n], g64[n]) for n in g64 if g64[n].norm() > 0}
        report[dev] = (rel_err(y, y64), sorted(errs.items(), key=lambda kv: -kv[1])[:4])
    msg = f"rel. errors against float64 (output, worst gradients): {report}"
    assert report["cuda"][0] < 1e-5, msg
    assert report["cuda"][1][0][1] < 1e-4, msg


def test_hope_cms_levels_and_shared_attributes():
    m = make("hope")
    levels = m.cms_levels()
    assert [p for p, _ in levels] == list(m.config.cms_periods)
    ids = [id(p) for _, ps in levels for p in ps]
    assert len(ids) == len(set(ids)) == 6 * 2 * len(levels)  # norm, fc1, fc2 (weight + bias) x 2 blocks
    assert make("hope", cms=False).cms_levels() == []
    for kind in ("ac", "hope"):
        mm = make(kind)
        lns = mm.layernorm_parameters()
        assert lns and all(p.dim() == 1 for p in lns)
        assert isinstance(mm.blocks, torch.nn.ModuleList) and len(mm.blocks) == 2


@pytest.mark.parametrize("kind", ["ac", "hope"])
@pytest.mark.parametrize("preset", ["tiny", "small", "vjepa2-ac"])
def test_presets_construct(kind, preset):
    enc = 1024 if preset == "vjepa2-ac" else 64
    with torch.device("meta"):
        m = build_predictor(kind, preset, enc_dim=enc, grid=(8, 16, 16))
    n = sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        n_ac = sum(p.numel() for p in build_predictor("ac", preset, enc_dim=enc, grid=(8, 16, 16)).parameters())
    assert abs(n - n_ac) / n_ac < 0.15, (kind, preset, n, n_ac)
    if preset == "vjepa2-ac":
        assert (m.config.width, m.config.depth, m.config.heads) == (1024, 24, 16)
    if preset == "tiny":
        m = build_predictor(kind, preset, enc_dim=64, grid=(2, 2, 2))
        assert m(torch.randn(1, 2, 4, 64), torch.zeros(1, 2, 2)).shape == (1, 2, 4, 64)


def _truncated_normal_cdf(x, std, a, b):
    nd = lambda v: torch.special.ndtr(torch.as_tensor(v, dtype=torch.float64) / std)  # noqa: E731
    return (nd(x) - nd(a)) / (nd(b) - nd(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lo,hi", [(-2.0, 2.0), (-1.0, 3.0), (-4.0, -0.5), (-6.0, 6.0), (1.5, 5.0)])
def test_trunc_normal_distribution(lo, hi, dtype):
    """The predictors' truncated-normal init against the exact distribution: bounds, mean, std and the
    Kolmogorov-Smirnov distance to its CDF (seeded, so the statistical checks are deterministic). The last two
    bounds go to torch's own sampler (past 4 std)."""
    from hope_kernels.models.base import trunc_normal_

    std, n = 0.02, 1 << 20
    a, b = lo * std, hi * std
    torch.manual_seed(0)
    w = trunc_normal_(torch.empty(n // 1024, 1024, dtype=dtype), std, a, b)
    x = w.flatten().double().sort().values
    assert a <= x[0] and x[-1] <= b
    # moments of N(0, std^2) truncated to [a, b] (lo, hi in std units)
    pdf = lambda v: math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)  # noqa: E731
    Z = 0.5 * (math.erf(hi / math.sqrt(2)) - math.erf(lo / math.sqrt(2)))
    mean = std * (pdf(lo) - pdf(hi)) / Z
    var = std**2 * (1 + (lo * pdf(lo) - hi * pdf(hi)) / Z - ((pdf(lo) - pdf(hi)) / Z) ** 2)
    assert abs(float(x.mean()) - mean) < 5 * (var / n) ** 0.5
    assert abs(float(x.var()) / var - 1) < 0.01
    ks = (torch.arange(1, n + 1, dtype=torch.float64) / n - _truncated_normal_cdf(x, std, a, b)).abs().max()
    assert ks < 1.63 / n**0.5  # the 1% critical value


def test_trunc_normal_is_seeded_and_fills_any_layout():
    from hope_kernels.models.base import trunc_normal_

    draw = lambda seed, t: (torch.manual_seed(seed), trunc_normal_(t, 0.02, -0.04, 0.04))[1]  # noqa: E731
    assert torch.equal(draw(3, torch.empty(64, 33)), draw(3, torch.empty(64, 33)))
    assert not torch.equal(draw(3, torch.empty(64, 33)), draw(4, torch.empty(64, 33)))
    t = draw(3, torch.full((33, 64), float("nan")).t())  # non-contiguous: every element written, in range
    assert torch.isfinite(t).all() and t.abs().max() <= 0.04


def test_trunc_normal_all_batches_weights():
    """The predictors draw their Linear weights in batches (one buffer, copied out): every element of every weight
    written, in range, distributed as one trunc_normal_ draw, and seeded. Batch of 4096 elements here: weights
    split over several batches, one of them too big for a batch (drawn on its own), one non-contiguous."""
    from hope_kernels.models.base import trunc_normal_all_

    std, a, b = 0.02, -0.04, 0.04

    def draw(seed):
        torch.manual_seed(seed)
        ws = [torch.full(s, float("nan")) for s in ((300, 7), (1000,), (64, 80), (7, 3), (50, 40), (1, 1))]
        ws.append(torch.full((30, 20), float("nan")).t())
        trunc_normal_all_(ws, std, a, b, batch=4096)
        return ws

    ws = draw(0)
    x = torch.cat([w.flatten() for w in ws]).double().sort().values
    assert torch.isfinite(x).all() and a <= x[0] and x[-1] <= b
    n = x.numel()
    ks = (torch.arange(1, n + 1, dtype=torch.float64) / n - _truncated_normal_cdf(x, std, a, b)).abs().max()
    assert ks < 1.63 / n**0.5
    assert all(torch.equal(u, v) for u, v in zip(ws, draw(0)))
    assert not torch.equal(ws[0], draw(1)[0])


@pytest.mark.parametrize("kind", ["ac", "hope"])
def test_init_is_seeded_and_complete(kind):
    """Linear and Conv3d weights skip their default draw (models.base._InitLater): _init_weights must set every
    one, and the whole build stays a function of the seed."""

    def build():
        torch.manual_seed(0)
        return build_predictor(kind, "tiny", enc_dim=64, grid=(2, 2, 2))

    m1, m2 = build(), build()
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.isfinite(p1).all() and torch.equal(p1, p2), name
    std = m1.config.init_std
    for name, mod in m1.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.weight.abs().max() <= 2 * std and (mod.bias is None or not mod.bias.any()), name
    s = std / m1.stem.weight[0, 0].numel() ** 0.5  # the stem (Conv3d), also built without its default draw
    assert m1.stem.weight.abs().max() <= 2 * s and m1.stem.weight.std() > s / 2
    lin = m1.blocks[0].attn.qkv
    lin.reset_parameters()  # a later reset is nn.Linear's Kaiming-uniform init
    assert lin.weight.abs().max() > 2 * std and lin.bias.any()


def test_config_roundtrip_and_bad_inputs():
    m = make("hope", memory_rule="titans")
    m2 = predictor_from_config(m.config.to_dict())
    assert m2.config == m.config
    with pytest.raises(TypeError, match="unknown predictor option"):
        build_predictor("ac", enc_dim=8, grid=GRID, widht=3)
    with pytest.raises(ValueError, match="kind"):
        build_predictor("rnn", enc_dim=8, grid=GRID)
    with pytest.raises(ValueError, match="preset"):
        build_predictor("ac", "huge", enc_dim=8, grid=GRID)
    z, a, _ = inputs()
    with pytest.raises(ValueError, match=r"z must be \(B, T, N, D\)"):
        m(z[..., :5], a)
    with pytest.raises(ValueError, match="actions must be"):
        m(z, a[:, :2])
    with pytest.raises(ValueError, match="states"):
        make("ac", state_dim=2)(z, a)


# -- official V-JEPA 2-AC checkpoint layout --
def official_state_dict(c):
    w, hid = c.width, int(c.width * c.mlp_ratio)
    shapes = {
        "predictor_embed.weight": (w, c.enc_dim),
        "predictor_embed.bias": (w,),
        "action_encoder.weight": (w, c.action_dim),
        "action_encoder.bias": (w,),
        "predictor_norm.weight": (w,),
        "predictor_norm.bias": (w,),
        "predictor_proj.weight": (c.enc_dim, w),
        "predictor_proj.bias": (c.enc_dim,),
        "extrinsics_encoder.weight": (w, c.action_dim - 1),
        "extrinsics_encoder.bias": (w,),
    }
    if c.state_dim:
        shapes.update({"state_encoder.weight": (w, c.state_dim), "state_encoder.bias": (w,)})
    for i in range(c.depth):
        b = f"predictor_blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (w,),
                b + "norm1.bias": (w,),
                b + "attn.qkv.weight": (3 * w, w),
                b + "attn.qkv.bias": (3 * w,),
                b + "attn.proj.weight": (w, w),
                b + "attn.proj.bias": (w,),
                b + "norm2.weight": (w,),
                b + "norm2.bias": (w,),
                b + "mlp.fc1.weight": (hid, w),
                b + "mlp.fc1.bias": (hid,),
                b + "mlp.fc2.weight": (w, hid),
                b + "mlp.fc2.bias": (w,),
            }
        )
    return {"module." + k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}


def test_official_ac_keys_load():
    m = make("ac", state_dim=3, rope_compat="vjepa2", predict_delta=False, stem_kernel=0)
    sd = official_state_dict(m.config)
    m.load_official_state_dict(sd)
    assert torch.equal(m.blocks[1].attn.qkv.weight, sd["module.predictor_blocks.1.attn.qkv.weight"])
    assert torch.equal(m.embed.bias, sd["module.predictor_embed.bias"])
    assert torch.equal(m.state_encoder.weight, sd["module.state_encoder.weight"])
    assert torch.equal(m.proj.weight, sd["module.predictor_proj.weight"])
    bad = dict(sd)
    bad["module.predictor_proj.weight"] = torch.randn(3, 3)
    with pytest.raises(ValueError, match="predictor_proj|proj.weight"):
        m.load_official_state_dict(bad)
    bad = {k: v for k, v in sd.items() if "norm1" not in k}
    with pytest.raises(ValueError, match="lacks"):
        m.load_official_state_dict(bad)
    with pytest.raises(ValueError, match="predict_delta=False"):
        make("ac", state_dim=3, predict_delta=True, stem_kernel=0).load_official_state_dict(sd)
    with pytest.raises(ValueError, match="stem_kernel=0"):
        make("ac", state_dim=3, predict_delta=False).load_official_state_dict(sd)
    with pytest.raises(ValueError, match="rope_compat='vjepa2'"):  # loaded silently into the true rotation before
        make("ac", state_dim=3, predict_delta=False, stem_kernel=0).load_official_state_dict(sd)
    from hope_kernels.config import predictor_config

    official = predictor_config("ac", "vjepa2-ac")  # the official architecture, so its weights load as is
    assert official.predict_delta is False and official.stem_kernel == 0 and official.rope_compat == "vjepa2"


def test_official_ac_weights_give_the_official_outputs_and_gradients(monkeypatch):
    """Our AC predictor with the official V-JEPA 2-AC predictor's weights (facebookresearch/vjepa2, checkout named
    by HOPE_BENCH_VJEPA2, timm stubbed) gives its outputs and parameter gradients, float32, at T 8 and T 1. Our
    input layer norm is applied to the inputs beforehand (the official predictor takes them as given)."""
    import os
    import sys
    import types

    root = os.environ.get("HOPE_BENCH_VJEPA2")
    if not root or not os.path.isfile(os.path.join(root, "src", "models", "ac_predictor.py")):
        pytest.skip("set HOPE_BENCH_VJEPA2 to a facebookresearch/vjepa2 checkout")
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:  # its only use there: drop_path, rate 0
        layers = types.ModuleType("timm.models.layers")
        layers.drop_path = lambda x, drop_prob=0.0, training=False: x
        for name, mod in (
            ("timm", types.ModuleType("timm")),
            ("timm.models", types.ModuleType("timm.models")),
            ("timm.models.layers", layers),
        ):
            monkeypatch.setitem(sys.modules, name, mod)
    sys.path.insert(0, root)
    try:
        from src.models.ac_predictor import vit_ac_predictor
    finally:
        sys.path.remove(root)
    from hope_kernels.models.ac_predictor import official_to_local

    torch.manual_seed(0)
    T, H, W, D, A = 8, 4, 4, 32, 7
    off = vit_ac_predictor(
        img_size=(16 * H, 16 * W),
        patch_size=16,
        num_frames=2 * T,
        tubelet_size=2,
        embed_dim=D,
        predictor_embed_dim=64,
        depth=2,
        num_heads=4,
        action_embed_dim=A,
        use_rope=True,
        is_frame_causal=True,
    )
    ours = build_predictor(
        "ac",
        "tiny",
        enc_dim=D,
        grid=(T, H, W),
        width=64,
        depth=2,
        heads=4,
        action_dim=A,
        state_dim=A,
        stem_kernel=0,
        predict_delta=False,
        rope_compat="vjepa2",
    )
    ours.load_official_state_dict(off.state_dict())
    z = torch.nn.functional.layer_norm(torch.randn(2, T, H * W, D), (D,))
    a, s = torch.randn(2, T, A), torch.randn(2, T, A)
    for t in (T, 1):
        want = off(z[:, :t].flatten(1, 2), a[:, :t], s[:, :t]).view(2, t, H * W, D)
        got = ours(z[:, :t], a[:, :t], s[:, :t])
        assert rel_err(got, want) < 1e-5, t
        g = torch.randn_like(want)
        (want * g).sum().backward()
        (got * g).sum().backward()
    grads = official_to_local({k: p.grad for k, p in off.named_parameters() if p.grad is not None})
    for k, p in ours.named_parameters():
        assert rel_err(p.grad, grads[k]) < 1e-5, k


@pytest.mark.parametrize("kind", ["ac", "hope"])
def test_predict_delta_output_is_last_latent_plus_head(kind):
    torch.manual_seed(0)
    m = build_predictor(kind, **SMALL).double()
    z, a, _ = inputs()
    assert not m.proj.weight.any() and not m.proj.bias.any()  # an untrained predictor is copy-last
    with torch.no_grad():
        torch.testing.assert_close(m(z, a), torch.nn.functional.layer_norm(z, z.shape[-1:]))
        m.config.predict_delta = False
        assert m(z, a).abs().max() == 0


# -- RoPE properties through the public op --
def _scores(q, k, pos, compat=None):
    # attention of a single key against itself reads out exp-scores; use v = one-hot to read the weights
    # (the op takes v of q's shape: the one-hot rows are zero-padded to the head dim, which must be >= L)
    L, d = q.shape[2], q.shape[3]
    assert d >= L
    v = torch.zeros(L, d, dtype=q.dtype)
    v[:, :L] = torch.eye(L, dtype=q.dtype)
    return rope_attention(q, k, v.expand(q.shape[0], q.shape[1], L, d), pos, rope_compat=compat)[..., :L]


def test_rope_scores_depend_only_on_position_differences():
    L, d = 6, 12
    q, k = torch.randn(1, 1, L, d, dtype=torch.float64), torch.randn(1, 1, L, d, dtype=torch.float64)
    pos = torch.stack([torch.tensor([0, 0, 1, 1, 2, 2]), torch.randint(0, 5, (L,)), torch.randint(0, 5, (L,))], 1)
    w = _scores(q, k, pos)
    torch.testing.assert_close(_scores(q, k, pos + torch.tensor([3, 7, 2])), w)
    pos2 = pos.clone()
    pos2[1, 1] += 1  # a relative change must change the weights
    assert (_scores(q, k, pos2) - w).abs().max() > 1e-6


def official_rotate(x, pos):
    """The official V-JEPA 2 rotate_queries_or_keys formula, written from its maths."""
    D = x.shape[-1]
    omega = 1.0 / 10000 ** (torch.arange(D // 2, dtype=x.dtype) / (D / 2.0))
    freq = pos.to(x.dtype)[:, None] * omega
    sin, cos = freq.sin().repeat(1, 2), freq.cos().repeat(1, 2)
    y = x.unflatten(-1, (-1, 2))
    y = torch.stack((-y[..., 1], y[..., 0]), dim=-1).flatten(-2)
    return x * cos + y * sin


def test_rope_compat_reproduces_official_formula():
    L, d = 6, 14  # slices of 4 and 2 unrotated channels
    q, k, v = (torch.randn(1, 2, L, d, dtype=torch.float64) for _ in range(3))
    pos = torch.stack([torch.tensor([0, 0, 1, 1, 2, 2]), torch.randint(0, 4, (L,)), torch.randint(0, 4, (L,))], 1)
    s = 2 * (d // 6)

    def rot(x):
        return torch.cat(
            [official_rotate(x[..., i * s : (i + 1) * s], pos[:, i]) for i in range(3)] + [x[..., 3 * s :]], -1
        )

    att = (rot(q) @ rot(k).transpose(-1, -2)) / d**0.5
    att = att.masked_fill(pos[None, :, 0] > pos[:, None, 0], float("-inf")).softmax(-1)
    torch.testing.assert_close(rope_attention(q, k, v, pos, rope_compat="vjepa2"), att @ v)
    assert (rope_attention(q, k, v, pos) - att @ v).abs().max() > 1e-6  # the true rotation differs


def test_hope_alpha_gate_never_underflows_to_zero():
    """float32 sigmoid of a very negative logit is exactly 0; the memory ops need alpha in (0, 1]."""
    from hope_kernels.models import build_predictor

    m = build_predictor("hope", "tiny", enc_dim=8, grid=(2, 2, 2), width=32, heads=2, depth=1)
    mem = m.blocks[0].memory
    eta, alpha = mem._gates(torch.zeros(3), torch.tensor([-1e4, 0.0, 1e4]), chunk=5)
    assert (eta > 0).all() and (eta < mem.eta_max / 5).all()  # the per-token rate is eta_max / chunk
    assert (alpha > 0).all() and (alpha <= 1).all() and torch.isfinite(eta).all()
