"""adapt_stream: prequential order, parameter sets per strategy, reset, divergence guard, HOPE memory / CMS."""

import copy
import math

import pytest
import torch

import hope_kernels.adapt as adapt_mod
from helpers.aba_standins import TinyHOPE, TinyPredictor, make_clip, make_stream
from hope_kernels.adapt import STRATEGIES, StreamLog, adapt_stream, score_clip

OPTS = dict(lr=5e-3, steps=2)


# tiny tensors: extra intra-op threads only add contention on a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _changed(before, model):
    return {k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())}


@pytest.mark.parametrize(
    "model_cls,strategy",
    [
        (TinyPredictor, "full"),
        (TinyPredictor, "layernorm"),
        (TinyPredictor, "lora"),
        (TinyHOPE, "hope"),
        (TinyHOPE, "hope+ttt"),
    ],
)
def test_prequential_score_precedes_adaptation(model_cls, strategy):
    """The score of clip k equals the score of clip k by the model adapted on clips 0..k-1 only."""
    stream = make_stream(3)
    k = 4
    base = model_cls()
    opts = dict(OPTS, merge_lora=False) if strategy == "lora" else OPTS
    states = {}
    log = adapt_stream(
        copy.deepcopy(base),
        stream.clips,
        strategy,
        **opts,
        callback=lambda i, m: states.__setitem__(i, copy.deepcopy(m)),
    )
    # replay the first k clips, then score clip k with that model: must match the logged score exactly
    m = copy.deepcopy(base)
    adapt_stream(m, stream.clips[:k], strategy, **dict(opts, merge_lora=True) if strategy == "lora" else opts)
    if strategy in ("hope", "hope+ttt"):
        m.carry_memory = True  # adapt_stream carries the memory of clip k-1 into clip k
    s = score_clip(m, stream.clips[k])
    assert s["tf"] == pytest.approx(log.tf[k], rel=1e-6, abs=1e-7)
    assert s["rollout"] == pytest.approx(log.rollout[k], rel=1e-6, abs=1e-7)
    # and differs from the score after adapting on clip k (so the test can fail)
    m2 = states[k]
    if strategy in ("hope", "hope+ttt"):
        m2.carry_memory = True
    if strategy != "lora":  # the logged copy's lora adapters were hooks, removed at the end
        assert score_clip(m2, stream.clips[k])["tf"] != log.tf[k]


def test_changing_clip_k_does_not_change_earlier_or_own_score():
    stream = make_stream(3)
    k = 5
    other = make_clip("B", 99, shift=5.0)
    clips2 = stream.clips[:k] + [dict(stream.clips[k])] + [other] + stream.clips[k + 1 :]
    l1 = adapt_stream(TinyPredictor(), stream.clips, "full", **OPTS)
    l2 = adapt_stream(TinyPredictor(), clips2, "full", **OPTS)
    assert l1.tf[: k + 1] == l2.tf[: k + 1]
    assert l1.tf[k + 1] != l2.tf[k + 1]


def _ln_names(model):
    ids = {id(p) for p in model.layernorm_parameters()}
    return {k for k, p in model.named_parameters() if id(p) in ids}


def test_each_strategy_changes_only_allowed_params():
    stream = make_stream(2)
    a1 = [make_clip("A1", 500 + i) for i in range(3)]
    base = TinyPredictor()
    names = set(_params(base))
    allowed = {
        "none": set(),
        "layernorm": _ln_names(base),
        "last_block": {k for k in names if k.startswith("blocks.1.")},
        "full": names,
        "ewc": names,
        "reset": names,
        "replay": names,
        "lora": {k for k in names if k.startswith("blocks.") and k.endswith("fc.weight")},
    }
    for strategy, ok in allowed.items():
        m = copy.deepcopy(base)
        before = _params(m)
        adapt_stream(m, stream.clips, strategy, **OPTS, fisher_clips=a1, replay_clips=a1, reset_every=100)
        changed = _changed(before, m)
        assert changed <= ok, (strategy, changed - ok)
        if strategy != "none":
            assert changed, f"{strategy} changed nothing"
    m = copy.deepcopy(base)
    before = _params(m)
    adapt_stream(m, stream.clips, "lora", **OPTS, merge_lora=False)
    assert not _changed(before, m)


def test_hope_updates_cms_only_with_one_optimizer_per_level(monkeypatch):
    built = []
    real = adapt_mod._make_optimizer
    monkeypatch.setattr(adapt_mod, "_make_optimizer", lambda ps, o: built.append((len(ps), o["lr"])) or real(ps, o))
    m = TinyHOPE()
    before = _params(m)
    cms_names = {k for k in before if k.startswith("cms.")}
    adapt_stream(m, make_stream(2).clips, "hope", cms_lr=0.05)
    changed = _changed(before, m)
    assert changed and changed <= cms_names
    assert built == [(len(list(lvl.parameters())), 0.05) for lvl in m.cms]


def test_hope_cms_step_is_the_size_of_an_optimizer_step():
    """At the default cms_lr (1e-3, the LN-TTA learning rate) a CMS update moves its level by lr per weight, as
    AdamW does: plain SGD moved it by lr * gradient, ~1e-7 relative, and `hope` scored like the frozen model."""
    m = TinyHOPE()
    lvl = list(m.cms[0].parameters())
    before = [p.detach().clone() for p in lvl]
    adapt_stream(m, make_stream(1).clips[:1], "hope", cms_periods=[1] * len(m.cms))
    step = max((p - b).abs().max().item() for p, b in zip(lvl, before))
    assert abs(step - 1e-3) < 1e-5, step  # AdamW's first step: lr per weight, whatever the gradient's scale


def test_hope_ttt_changes_chosen_params_plus_cms():
    m = TinyHOPE()
    before = _params(m)
    ok = {k for k in before if k.startswith("cms.")} | _ln_names(m)
    adapt_stream(m, make_stream(2).clips, "hope+ttt", ttt_params="layernorm", cms_lr=0.05, **OPTS)
    changed = _changed(before, m)
    assert changed <= ok and changed & _ln_names(m) and changed & {k for k in before if k.startswith("cms.")}


def test_cms_levels_update_at_their_periods():
    m = TinyHOPE()
    lvl0 = [p for p in m.cms[0].parameters()]
    lvl1 = [p for p in m.cms[1].parameters()]
    prev0, prev1 = [p.detach().clone() for p in lvl0], [p.detach().clone() for p in lvl1]
    snaps = []
    adapt_stream(
        m,
        make_stream(2).clips,
        "hope",
        cms_lr=0.05,
        callback=lambda i, mod: snaps.append(([p.clone() for p in lvl0], [p.clone() for p in lvl1])),
    )
    for i, (s0, s1) in enumerate(snaps):
        assert any(not torch.equal(a, b) for a, b in zip(s0, prev0)), f"period-1 level idle at clip {i}"
        moved1 = any(not torch.equal(a, b) for a, b in zip(s1, prev1))
        assert moved1 == ((i + 1) % 2 == 0), f"period-2 level at clip {i}: moved={moved1}"
        prev0, prev1 = s0, s1


def test_hope_carries_memory_only_when_asked():
    stream = make_stream(2)
    m = TinyHOPE()
    adapt_stream(m, stream.clips, "hope")
    assert m.carry_memory and m._memory is not None
    m2 = TinyHOPE()
    adapt_stream(m2, stream.clips, "hope", carry_memory=False)
    assert not m2.carry_memory and m2._memory is None
    # a non-hope strategy on a HOPE model never carries memory
    m3 = TinyHOPE()
    adapt_stream(m3, stream.clips, "layernorm", **OPTS)
    assert not m3.carry_memory


def test_hope_on_ac_model_raises():
    with pytest.raises(ValueError, match="HOPE"):
        adapt_stream(TinyPredictor(), make_stream(1).clips, "hope")


def test_reset_restores_stream_start_weights_exactly():
    stream = make_stream(3)
    base = TinyPredictor()
    start = _params(base)
    states = {}
    m = copy.deepcopy(base)
    log = adapt_stream(
        m, stream.clips, "reset", reset_every=4, **OPTS, callback=lambda i, mod: states.__setitem__(i, _params(mod))
    )
    for i in range(len(stream.clips)):
        same = all(torch.equal(states[i][k], start[k]) for k in start)
        assert same == ((i + 1) % 4 == 0), i
    frozen = adapt_stream(copy.deepcopy(base), stream.clips, "none")
    assert log.tf[4] == frozen.tf[4] and log.tf[8] == frozen.tf[8]
    assert log.tf[5] != frozen.tf[5]


def test_guard_rolls_back_injected_nan(monkeypatch):
    stream = make_stream(2)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned_step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:  # clip 2, first of its 2 steps
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    states = {}
    m = TinyPredictor()
    log = adapt_stream(m, stream.clips, "full", **OPTS, callback=lambda i, mod: states.__setitem__(i, _params(mod)))
    assert log.rollbacks == 1
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])  # clip 2's update undone
    assert not all(torch.equal(states[2][k], states[3][k]) for k in states[2])  # later clips adapt again
    assert all(math.isfinite(x) for x in log.tf)


def test_guard_rolls_back_explosion():
    m = TinyPredictor()
    log = adapt_stream(m, make_stream(2).clips, "full", lr=1e3, steps=3, guard_factor=1.01, grad_clip=0)
    assert log.rollbacks >= 1


def test_copy_baseline_and_scores():
    clip = make_clip("A1", 0, shift=0.0)  # constant latents: copying the last latent is exact
    s = score_clip(TinyPredictor(), clip)
    assert s["copy_tf"] == pytest.approx(0.0, abs=1e-6)
    assert s["copy_rollout"] == pytest.approx([0.0] * 4, abs=1e-6)
    assert len(s["rollout"]) == 4 and s["tf"] > 0
    moving = score_clip(TinyPredictor(), make_clip("A1", 0, shift=1.0))
    assert moving["copy_rollout"][3] > moving["copy_rollout"][0] > 0


def test_heldout_matrix_and_log_roundtrip():
    stream = make_stream(2)
    log = adapt_stream(TinyPredictor(), stream, "layernorm", **OPTS)
    assert list(log.heldout) == ["A1", "B", "A2"]
    assert set(log.heldout["B"]) == {"A1", "B", "A2"}
    assert log.phases == ["A1"] * 2 + ["B"] * 2 + ["A2"] * 2
    assert log.updates == 6
    again = StreamLog.from_dict(log.to_dict())
    assert again == log
    assert len(log.errors("rollout")) == 6


def test_bad_inputs():
    m = TinyPredictor()
    with pytest.raises(ValueError, match="strategy"):
        adapt_stream(m, make_stream(1).clips, "magic")
    with pytest.raises(TypeError, match="unknown adaptation option keys"):
        adapt_stream(m, make_stream(1).clips, "full", lrr=1)
    with pytest.raises(ValueError, match="fisher_clips"):
        adapt_stream(m, make_stream(1).clips, "ewc")
    with pytest.raises(ValueError, match="replay_clips"):
        adapt_stream(m, make_stream(1).clips, "replay")
    with pytest.raises(ValueError, match="latents"):
        score_clip(m, {"actions": torch.zeros(5, 2)})
    with pytest.raises(ValueError, match=r"\(T, A\)"):
        score_clip(m, {"latents": torch.zeros(5, 4, 8), "actions": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="no clips"):
        adapt_stream(m, [], "none")
    assert set(STRATEGIES) >= {"none", "layernorm", "hope", "hope+ttt"}


def test_guard_rolls_back_non_finite_carried_memory():
    """HOPE with CMS off (no parameters to adapt): a clip whose forward leaves a NaN in the carried memory is
    rolled back to the memory before that clip, so later clips still score finite."""
    from hope_kernels.models import build_predictor

    stream = make_stream(2)
    clip = stream.clips[0]
    T, N, D = clip["latents"].shape
    H = int(math.isqrt(N))
    m = build_predictor(
        "hope",
        "tiny",
        enc_dim=D,
        grid=(T, H, N // H),
        action_dim=clip["actions"].shape[-1],
        width=32,
        heads=2,
        depth=1,
        cms=False,
    )
    real_forward = type(m).forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real_forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 4 and self._memory is not None:  # clip 1's adaptation forward
            self._memory = [s.clone().fill_(float("nan")) for s in self._memory]
        return out

    m.forward = poisoned.__get__(m)
    log = adapt_stream(m, stream.clips[:4], "hope")
    assert log.rollbacks == 1
    assert all(math.isfinite(x) for x in log.tf)
    assert all(torch.isfinite(s).all() for s in m._memory)


@pytest.mark.parametrize(
    "model_cls,strategy", [(TinyPredictor, "layernorm"), (TinyPredictor, "none"), (TinyHOPE, "hope")]
)
def test_non_finite_stream_latents_are_named(model_cls, strategy):
    stream = make_stream(2)
    stream.clips[3]["latents"][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"clip 3 \(phase B\): latents contain NaN or inf"):
        adapt_stream(model_cls(), stream.clips, strategy, **OPTS)


def test_memory_lr_scale_scales_the_memory_step_for_the_stream_only():
    """memory_lr_scale multiplies a HOPE memory's eta_max while the stream runs (predictions change) and
    restores it after; strategies without a memory refuse it."""
    from hope_kernels.models import build_predictor

    torch.manual_seed(0)
    model = build_predictor("hope", "tiny", enc_dim=8, grid=(5, 2, 2))
    torch.nn.init.normal_(model.proj.weight, std=0.1)
    stream = make_stream(2)
    etas = [m.eta_max for m in model.modules() if hasattr(m, "eta_max")]
    seen = []
    cb = lambda i, m: seen.append([x.eta_max for x in m.modules() if hasattr(x, "eta_max")])  # noqa: E731
    a = adapt_stream(copy.deepcopy(model), stream, "hope", cms_lr=0.0, callback=cb)
    b = adapt_stream(model, stream, "hope", cms_lr=0.0, memory_lr_scale=3.0)
    assert a.tf != b.tf
    assert seen[0] == etas and [m.eta_max for m in model.modules() if hasattr(m, "eta_max")] == etas
    with pytest.raises(ValueError, match="memory_lr_scale scales a HOPE memory"):
        adapt_stream(build_predictor("ac", "tiny", enc_dim=8, grid=(5, 2, 2)), stream, "layernorm", memory_lr_scale=2.0)
    with pytest.raises(ValueError, match="finite number > 0"):
        adapt_stream(model, stream, "hope", memory_lr_scale=0.0)


def test_compile_option_is_checked():
    with pytest.raises(ValueError, match="compile must be a bool, got 1"):
        adapt_stream(TinyPredictor(), make_stream(1).clips, "full", compile=1)


@pytest.mark.slow(minutes=4)  # compiling takes minutes on a small CPU
def test_compiled_stream_matches_eager():
    """compile=True: the model's forward runs under torch.compile for the stream; the scores equal the eager
    stream's within float32 rounding, and the model's own forward is back afterwards."""
    clips = make_stream(1, heldout=0).clips
    logs = {}
    for c in (False, True):
        model = TinyPredictor()
        logs[c] = adapt_stream(model, clips, "full", **OPTS, compile=c)
        assert "forward" not in vars(model)
    assert logs[True].tf == pytest.approx(logs[False].tf, rel=1e-4, abs=1e-6)
    flat = {c: [x for r in logs[c].rollout for x in r] for c in logs}
    assert flat[True] == pytest.approx(flat[False], rel=1e-4, abs=1e-6)


def test_aba_compile_key_reaches_pretraining_and_every_stream(tmp_path, monkeypatch):
    """An A-B-A config's top-level `compile` goes to the pre-training config and to every adapt_stream call (the
    calls are recorded, then run eager here: the compiled numbers are test_compiled_stream_matches_eager's)."""
    import hope_kernels.aba as aba
    from helpers.aba_standins import StandInHooks

    cfg = {
        "seeds": [0],
        "stream": {"phases": ["A1", "B", "A2"], "clips_per_phase": 1, "heldout_per_phase": 1},
        "pretrain": {"steps": 1},
        "compile": True,
        "runs": [{"name": "ac+full", "model": "ac", "strategy": "full"}],
    }
    seen = {"train": [], "adapt": []}
    hooks = StandInHooks(train_steps=1)
    real_train, real_adapt = hooks.train, aba.adapt_stream
    hooks.train = lambda config: seen["train"].append(config["compile"]) or real_train(config)

    def adapt(*a, compile, **k):
        seen["adapt"].append(compile)
        return real_adapt(*a, **k)

    monkeypatch.setattr(aba, "adapt_stream", adapt)
    aba.run_aba(cfg, hooks=hooks, out=tmp_path, progress=False)
    assert seen == {"train": [True], "adapt": [True]}
    with pytest.raises(ValueError, match="aba.compile must be a bool, got 'yes'"):
        aba.validate_config({**cfg, "compile": "yes"})
