"""Embedded physics: analytic Coulomb sliding, A vs B travel ratio, objects in view, no motion before the
impulse, actions at frame // 2, renderer against a full-frame coverage formula, determinism."""

import numpy as np
import pytest

from hope_kernels.data.physics import (
    AGENT_COLOUR,
    ARENA,
    BACKGROUND,
    FPS,
    IMG,
    G,
    Physics,
    actions_from,
    render,
    sample_scenes,
    simulate_clips,
    stopping_distance,
    trajectories,
)

A, B = Physics(0.5, 1.0), Physics(0.1, 0.5)


def test_b_travels_farther_by_the_analytic_ratio():
    sc = sample_scenes(32, np.random.default_rng(0))
    long_a = trajectories(sc, A, frames=400)  # 20 s: every object has come to rest
    long_b = trajectories(sc, B, frames=400)
    ratio = long_b["s"][:, -1] / long_a["s"][:, -1]
    expect = (A.mass**2 * A.mu) / (B.mass**2 * B.mu)  # d = J^2 / (2 m^2 mu g)
    assert expect == pytest.approx(20.0)
    np.testing.assert_allclose(ratio, expect, rtol=1e-9)
    Jn = np.linalg.norm(sc["J"], axis=1)
    np.testing.assert_allclose(long_a["s"][:, -1], [stopping_distance(j, A) for j in Jn], rtol=1e-9)
    # inside the 16-frame clip B still travels farther for the same impulse
    sa, sb = trajectories(sc, A)["s"][:, -1], trajectories(sc, B)["s"][:, -1]
    assert (sb > 2 * sa).all()


def test_path_follows_coulomb_friction():
    sc = sample_scenes(16, np.random.default_rng(1))
    for ph in (A, B):
        tr = trajectories(sc, ph)
        v0 = np.linalg.norm(sc["J"], axis=1) / ph.mass
        for i in range(16):
            for f in range(16):
                tau = max(0.0, (f - sc["impulse_frame"][i]) / FPS)
                t = min(tau, v0[i] / (ph.mu * G))
                assert tr["s"][i, f] == pytest.approx(v0[i] * t - 0.5 * ph.mu * G * t * t, abs=1e-12)
        # each frame-to-frame displacement is at most the path travelled (equal when no wall is hit)
        step = np.linalg.norm(np.diff(tr["pos"][:, :, 0], axis=1), axis=-1)
        ds = np.diff(tr["s"], axis=1)
        assert (step <= ds + 1e-12).all()
        assert np.isclose(step, ds, atol=1e-12).mean() > 0.5


def test_objects_stay_in_view_and_move_visibly():
    for ph, seed in ((A, 2), (B, 3)):
        sc = sample_scenes(200, np.random.default_rng(seed))
        tr = trajectories(sc, ph)
        e = sc["size"][:, None, :, None]
        present = (sc["size"] > 0)[:, None, :, None]
        pos = tr["pos"]
        assert ((pos >= e - 1e-12) & (pos <= ARENA - e + 1e-12) | ~present).all()
        if ph is A:  # "several patches" of travel in A: at least 14 px (a patch is 8 px)
            assert (tr["s"][:, -1] * IMG / ARENA >= 14).all()
            assert (tr["s"][:, -1] * IMG / ARENA).mean() > 24


def test_no_motion_before_the_impulse_and_actions():
    clips = simulate_clips(24, B, np.random.default_rng(4))
    f0 = clips["scenes"]["impulse_frame"]
    assert f0.min() >= 0 and f0.max() <= 7
    for i in range(24):
        f = f0[i]
        assert (clips["pos"][i, : f + 1] == clips["pos"][i, 0]).all()
        assert (clips["frames"][i, : f + 1] == clips["frames"][i, 0]).all()
        assert np.linalg.norm(clips["pos"][i, f + 1, 0] - clips["pos"][i, f, 0]) > 0.01  # starts moving
        assert (clips["pos"][i, :, 1:] == clips["pos"][i, 0, 1:]).all()  # distractors never move
        a = clips["actions"][i]
        assert a.shape == (8, 2) and a.dtype == np.float32
        assert (a[f // 2] == clips["scenes"]["J"][i].astype(np.float32)).all()
        assert (np.delete(a, f // 2, axis=0) == 0).all()
    assert clips["frames"].shape == (24, 16, 64, 64, 3) and clips["frames"].dtype == np.uint8


def test_renderer_matches_full_frame_coverage():
    sc = sample_scenes(6, np.random.default_rng(5))
    sc["size"][:, 1:] = 0  # the pushed object alone
    tr = trajectories(sc, B)
    frames = render(sc, tr["pos"]).astype(np.float64) / 255
    c = np.arange(IMG) + 0.5
    for i in range(6):
        for f in (0, 9, 15):
            px = tr["pos"][i, f, 0] * IMG / ARENA
            r = sc["size"][i, 0] * IMG / ARENA
            dx, dy = np.abs(c[None, :] - px[0]), np.abs(c[:, None] - px[1])
            if sc["shape"][i, 0]:
                cov = np.clip(r + 0.5 - dx, 0, 1) * np.clip(r + 0.5 - dy, 0, 1)
            else:
                cov = np.clip(r + 0.5 - np.sqrt(dx**2 + dy**2), 0, 1)
            want = BACKGROUND + cov[..., None] * (AGENT_COLOUR - BACKGROUND)
            np.testing.assert_allclose(frames[i, f], want, atol=1 / 255 + 1e-6)
            area = 4 * r * r if sc["shape"][i, 0] else np.pi * r * r
            assert cov.sum() == pytest.approx(area, rel=0.05)  # fully in view


def test_determinism_and_bad_physics():
    a = simulate_clips(3, A, np.random.default_rng(7))
    b = simulate_clips(3, A, np.random.default_rng(7))
    c = simulate_clips(3, A, np.random.default_rng(8))
    assert (a["frames"] == b["frames"]).all() and (a["actions"] == b["actions"]).all()
    assert not (a["frames"] == c["frames"]).all()
    with pytest.raises(ValueError, match="mu > 0 and mass > 0"):
        Physics(0.0, 1.0)
    assert actions_from(sample_scenes(2, np.random.default_rng(0))).shape == (2, 8, 2)
