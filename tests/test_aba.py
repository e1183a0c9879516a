"""run_aba orchestration with stand-in data/models/training (dependency injection through Hooks): results files,
resumability per (run, seed), config fingerprints, the CLI and the shipped presets."""
import json

import pytest

import hope_kernels.aba as aba
from hope_kernels.aba import load_config, run_aba, validate_config

from aba_standins import StandInHooks


# tiny tensors: extra intra-op threads only add contention on a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config():
    return {
        "seeds": [0, 1],
        "stream": {"phases": ["A1", "B", "A2"], "clips_per_phase": 3, "heldout_per_phase": 1},
        "pretrain": {"steps": 5},
        "adapt": {"lr": 5e-3, "steps": 1, "reset_every": 2},
        "metric_window": 2, "fisher_clips": 2, "replay_clips": 3,
        "baseline": "ac+layernorm",
        "runs": [
            {"name": "hope", "model": "hope", "strategy": "hope", "options": {"cms_lr": 0.01}},
            {"name": "ac+layernorm", "model": "ac", "strategy": "layernorm"},
            {"name": "ac+none", "model": "ac", "strategy": "none"},
            {"name": "ac+ewc", "model": "ac", "strategy": "ewc"},
            {"name": "ac+replay", "model": "ac", "strategy": "replay", "privileged": True},
            {"name": "hope[no-cms]", "model": "hope", "strategy": "hope", "overrides": {"cms": False}},
            {"name": "oracle", "model": "ac", "strategy": "none", "train_phases": ["B"], "privileged": True},
        ],
    }


def test_run_aba_writes_results_and_resumes(tmp_path, monkeypatch):
    hooks = StandInHooks()
    res = run_aba(tiny_config(), hooks=hooks, out=tmp_path, progress=False)
    # pre-training: one per (model, overrides, phases), shared by the seeds
    assert hooks.calls["train"] == 4
    assert hooks.calls["train_clips"] == 4          # fisher + replay buffers, per seed
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["seeds"] == [0, 1] and data["baseline"] == "ac+layernorm" and data["oracle"] == "oracle"
    s = data["summary"]["tf"]
    assert set(s) == {r["name"] for r in tiny_config()["runs"]}
    assert s["hope"]["B"]["n"] == 2 and s["hope"]["B"]["half"] is not None
    assert "speed_oracle" in s["ac+layernorm"] and "R_B_A1" in s["ac+none"]
    assert data["paired"]["tf"]["ac+layernorm"]["B"]["mean"] == 0.0
    assert len(data["curves"]["rollout"]["hope"]["mean"]) == 9
    assert [r["privileged"] for r in data["runs"]] == [False, False, False, False, True, False, True]
    md = (tmp_path / "results.md").read_text()
    assert md.index("| hope |") < md.index("| ac+layernorm |")
    assert (tmp_path / "aba.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "runs").rglob("seed*.json"))) == 14

    # restart: every (run, seed) is finished -> no training, no adaptation, same numbers
    def no_adapt(*a, **k):
        raise AssertionError("finished runs must be skipped")
    monkeypatch.setattr(aba, "adapt_stream", no_adapt)
    hooks2 = StandInHooks()
    res2 = run_aba(tiny_config(), hooks=hooks2, out=tmp_path, progress=False)
    assert hooks2.calls["train"] == 0 and hooks2.calls["load_checkpoint"] == 0
    assert res2.summary["tf"]["hope"]["B"] == res.summary["tf"]["hope"]["B"]
    monkeypatch.undo()

    # a killed run: its file is missing -> only that (run, seed) reruns, from the stored checkpoint
    (tmp_path / "runs" / "ac+none" / "seed1.json").unlink()
    count = {"n": 0}
    real = aba.adapt_stream

    def counting(*a, **k):
        count["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(aba, "adapt_stream", counting)
    hooks3 = StandInHooks()
    res3 = run_aba(tiny_config(), hooks=hooks3, out=tmp_path, progress=False)
    assert count["n"] == 1 and hooks3.calls["train"] == 0 and hooks3.calls["load_checkpoint"] == 1
    assert res3.summary["tf"]["ac+none"]["B"]["mean"] == pytest.approx(res.summary["tf"]["ac+none"]["B"]["mean"])

    # changing a run's options invalidates only that run's results
    cfg = tiny_config()
    cfg["runs"][1]["options"] = {"lr": 1e-2}
    count["n"] = 0
    run_aba(cfg, hooks=StandInHooks(), out=tmp_path, progress=False)
    assert count["n"] == 2


def test_corrupt_result_file_is_rerun(tmp_path):
    cfg = tiny_config()
    cfg["runs"] = cfg["runs"][1:3]
    cfg["seeds"] = [0]
    run_aba(cfg, hooks=StandInHooks(), out=tmp_path, progress=False)
    (tmp_path / "runs" / "ac+none" / "seed0.json").write_text("{trunc")
    hooks = StandInHooks()
    run_aba(cfg, hooks=hooks, out=tmp_path, progress=False)
    assert json.loads((tmp_path / "runs" / "ac+none" / "seed0.json").read_text())["seed"] == 0


def test_presets_load_and_validate():
    for preset, n_seeds in (("quick", 3), ("paper", 5)):
        cfg = load_config(preset)
        assert len(cfg["seeds"]) >= n_seeds
        names = [r["name"] for r in cfg["runs"]]
        assert names[:2] == ["hope", "ac+layernorm"] and cfg["baseline"] == "ac+layernorm"
        assert {"oracle", "joint", "ac+replay"} <= set(names)
        strategies = {r["strategy"] for r in cfg["runs"]}
        assert strategies == set(aba.STRATEGIES)


def test_bad_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="presets"):
        load_config("nope")
    cfg = tiny_config()
    cfg["runs"][0]["strategy"] = "magic"
    with pytest.raises(ValueError, match="strategy"):
        validate_config(cfg)
    cfg = tiny_config()
    cfg["runs"].append(dict(cfg["runs"][0]))
    with pytest.raises(ValueError, match="twice"):
        validate_config(cfg)
    cfg = tiny_config()
    cfg["baseline"] = "nobody"
    with pytest.raises(ValueError, match="baseline"):
        validate_config(cfg)
    cfg = tiny_config()
    cfg["data"] = {"dir": str(tmp_path / "missing"), "imported": True}
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        run_aba(cfg, hooks=StandInHooks(), out=tmp_path / "o", progress=False)


def test_cli_aba(tmp_path, monkeypatch, capsys):
    import yaml

    from hope_kernels.cli import main
    cfg = tiny_config()
    cfg["runs"] = cfg["runs"][:3]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(aba, "Hooks", StandInHooks)
    assert main(["aba", "--config", str(path), "--out", str(tmp_path / "o"), "--seeds", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| hope |" in out and "results.json" in out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["seeds"] == [3]
    assert main(["aba", "--config", str(path), "--out", str(tmp_path / "o"), "--seeds", "x"]) == 2
