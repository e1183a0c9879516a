"""Our V-JEPA 2-AC predictor beside the official one (facebookresearch/vjepa2, `src/models/ac_predictor.py`,
built by its `vit_ac_predictor` factory), same config, same inputs, same loss, float32, on this device.

    HOPE_BENCH_VJEPA2=/path/to/vjepa2 pytest benchmarks/test_bench_predictor_peer.py --benchmark-only -s
    HOPE_BENCH_REAL=1 ...      # also the real-size forward (304 M parameters, 2064 tokens: ~15 s a call on CPU)

Our rows always run; the official rows skip with a message unless HOPE_BENCH_VJEPA2 names a checkout (its
only third-party import, timm's drop_path, is replaced by the identity when timm is missing: the rate is 0).
Ours and the official predictor are timed round by round, alternating the calls (20 rounds tiny, 3 real size),
so that a slow spell of a shared machine hits both alike: timed one after the other, the ratio of the same code
moved between 1.39x and 1.69x on this VM. Rows per group: backend "ours" and "official" (median ms, peak memory
above the resident set over one call); benchmarks/targets.py reads their ratio.
Build times: benchmarks/test_bench_build.py.

What is identical: width, depth, heads, MLP ratio 4, GELU, qkv bias, LayerNorm eps 1e-6, init std 0.02, block-
causal attention over timesteps, the V-JEPA 2 RoPE formula, one action and one state token per timestep, the
loss. What differs: our predictor layer-normalises its input latents (the official one takes them as given),
and its attention runs through `rope_attention` (auto backend) where the official code rotates q and k with
per-slice tensor ops and calls SDPA with a materialised mask.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F

from hope_kernels.models import build_predictor

VJEPA2 = os.environ.get("HOPE_BENCH_VJEPA2")
REAL = os.environ.get("HOPE_BENCH_REAL", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# name: (B, T, H, W, enc_dim, width, depth, heads, action_dim)
CONFIGS = {"tiny": (4, 8, 8, 8, 64, 128, 4, 4, 2), "vjepa2-ac": (1, 8, 16, 16, 1024, 1024, 24, 16, 7)}


def _official_factory():
    if not VJEPA2:
        pytest.skip("set HOPE_BENCH_VJEPA2 to a facebookresearch/vjepa2 checkout to time the official predictor")
    if not os.path.isfile(os.path.join(VJEPA2, "src", "models", "ac_predictor.py")):
        pytest.skip(f"HOPE_BENCH_VJEPA2={VJEPA2} has no src/models/ac_predictor.py")
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        layers = types.ModuleType("timm.models.layers")
        layers.drop_path = lambda x, drop_prob=0.0, training=False: x
        sys.modules.update(
            {
                "timm": types.ModuleType("timm"),
                "timm.models": types.ModuleType("timm.models"),
                "timm.models.layers": layers,
            }
        )
    if VJEPA2 not in sys.path:
        sys.path.insert(0, VJEPA2)
    from src.models.ac_predictor import vit_ac_predictor

    return vit_ac_predictor


def _build(who: str, name: str):
    """-> (model, forward(z (B, T, N, D), a, s) -> (B, T, N, D))."""
    B, T, H, W, D, width, depth, heads, A = CONFIGS[name]
    torch.manual_seed(0)
    if who == "official":
        m = _official_factory()(
            img_size=(16 * H, 16 * W),
            patch_size=16,
            num_frames=2 * T,
            tubelet_size=2,
            embed_dim=D,
            predictor_embed_dim=width,
            depth=depth,
            num_heads=heads,
            action_embed_dim=A,
            use_rope=True,
            is_frame_causal=True,
        )
        m = m.to(DEVICE)

        def forward(z, a, s):
            return m(z.flatten(1, 2), a, s).view(z.shape)
    else:
        m = build_predictor(
            "ac",
            "tiny",
            enc_dim=D,
            grid=(T, H, W),
            width=width,
            depth=depth,
            heads=heads,
            action_dim=A,
            state_dim=A,
            stem_kernel=0,
            predict_delta=False,
            rope_compat="vjepa2",
        ).to(DEVICE)
        forward = m
    return m, forward


def _inputs(name: str):
    B, T, H, W, D, *_, A = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(DEVICE) for s in ((B, T, H * W, D), (B, T, A), (B, T, A))]


def _tf_rollout_loss(forward, z, a, s):
    """Teacher forcing over all T steps plus one rollout step from z[:, :1], L1 against the next latents."""
    tgt = F.layer_norm(z, z.shape[-1:])
    tf = F.l1_loss(forward(z, a, s)[:, :-1], tgt[:, 1:])
    first = forward(z[:, :1], a[:, :1], s[:, :1])
    return tf + F.l1_loss(first, tgt[:, 1:2])


ROUNDS = {"tiny": 20, "vjepa2-ac": 3}


def _time_side_by_side(benchmark, bench_row, peak_bytes, name: str, group: str, make_step):
    """Time ours and (when HOPE_BENCH_VJEPA2 names a checkout) the official predictor round by round, alternating
    the calls, so that a slow spell of a shared machine hits both alike; one row per predictor (median ms, peak
    memory above the resident set over one call). make_step(forward, z, a, s) -> a no-argument step."""
    z, a, s = _inputs(name)
    steps, why_not = {}, None
    for who in ("ours", "official"):
        try:
            _, forward = _build(who, name)
        except pytest.skip.Exception as e:
            why_not = str(e)
            continue
        steps[who] = make_step(forward, z, a, s)
        steps[who]()  # warm-up
    peaks = {who: peak_bytes(step, DEVICE) for who, step in steps.items()}
    times = {who: [] for who in steps}

    def one_round():
        for who, step in steps.items():
            t0 = time.perf_counter()
            step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            times[who].append(time.perf_counter() - t0)

    # pytest-benchmark times the rounds (both predictors; --benchmark-only runs only tests that use it)
    benchmark.group = f"{group} (rounds: {' then '.join(steps)})"
    benchmark.pedantic(one_round, rounds=ROUNDS[name], iterations=1, warmup_rounds=0)
    for who, ts in times.items():
        peak = peaks[who]
        bench_row(
            group=group,
            backend=who,
            device=DEVICE,
            ms=statistics.median(ts) * 1e3,
            rounds=len(ts),
            peak_mib=peak / 2**20 if peak is not None else None,
        )
    if why_not:
        pytest.skip(why_not)


def test_predictor_tiny_fwd_bwd(benchmark, bench_row, peak_bytes):
    _time_side_by_side(
        benchmark,
        bench_row,
        peak_bytes,
        "tiny",
        "predictor ac tiny fwd+bwd",
        lambda forward, z, a, s: lambda: forward(z, a, s).abs().mean().backward(),
    )


def test_predictor_tiny_tf_rollout(benchmark, bench_row, peak_bytes):
    _time_side_by_side(
        benchmark,
        bench_row,
        peak_bytes,
        "tiny",
        "predictor ac tiny tf+rollout fwd+bwd",
        lambda forward, z, a, s: lambda: _tf_rollout_loss(forward, z, a, s).backward(),
    )


def test_predictor_real_size_fwd(benchmark, bench_row, peak_bytes):
    if not REAL:
        pytest.skip("the real-size forward takes ~15 s a call on CPU: set HOPE_BENCH_REAL=1")

    def make_step(forward, z, a, s):
        def step():
            with torch.no_grad():
                forward(z, a, s)

        return step

    _time_side_by_side(benchmark, bench_row, peak_bytes, "vjepa2-ac", "predictor ac vjepa2-ac fwd B=1", make_step)
