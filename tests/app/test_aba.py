"""run_aba orchestration with stand-in data/models/training (dependency injection through Hooks): results files,
resumability per (run, seed), config fingerprints, the CLI and the shipped presets."""

import json

import pytest
import torch

import hope_kernels.aba as aba
from helpers import ROOT
from helpers.aba_standins import StandInHooks
from hope_kernels.aba import load_config, run_aba, validate_config

# tiny tensors: extra intra-op threads only add contention on a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config():
    return {
        "seeds": [0, 1],
        "stream": {"phases": ["A1", "B", "A2"], "clips_per_phase": 3, "heldout_per_phase": 1},
        "pretrain": {"steps": 5},
        "adapt": {"lr": 5e-3, "steps": 1, "reset_every": 2},
        "metric_window": 2,
        "fisher_clips": 2,
        "replay_clips": 3,
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


def _count_adapt_calls(monkeypatch) -> dict:
    """Wrap aba.adapt_stream; the returned dict's "n" counts the calls."""
    count = {"n": 0}
    real = aba.adapt_stream

    def counting(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(aba, "adapt_stream", counting)
    return count


def test_run_aba_writes_results_and_resumes(tmp_path, monkeypatch):
    hooks = StandInHooks()
    res = run_aba(tiny_config(), hooks=hooks, out=tmp_path, progress=False)
    # pre-training: one per (model, overrides, phases), shared by the seeds
    assert hooks.calls["train"] == 4
    assert hooks.calls["train_clips"] == 4  # fisher + replay buffers, per seed
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
    count = _count_adapt_calls(monkeypatch)
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
    for preset in ("quick", "paper"):
        cfg = load_config(preset)
        assert len(cfg["seeds"]) >= 5
        names = [r["name"] for r in cfg["runs"]]
        assert names[:2] == ["hope", "ac+layernorm"] and cfg["baseline"] == "ac+layernorm"
        assert {"oracle", "hope+ttt", "hope+none", "hope[no-carry]", "ac+none"} <= set(names)
    assert {r["strategy"] for r in load_config("paper")["runs"]} == set(aba.STRATEGIES)
    quick = load_config("quick")
    # every adapting strategy of quick is tuned, on seeds the report never uses
    assert {r["strategy"] for r in quick["runs"]} - {"none"} <= set(quick["tuning"]["grids"])
    assert not set(quick["tuning"]["seeds"]) & set(quick["seeds"])


def tuning_config():
    cfg = tiny_config()
    cfg["runs"] = [r for r in cfg["runs"] if r["name"] in ("hope", "ac+layernorm", "ac+none", "oracle")]
    cfg["tuning"] = {
        "seeds": [100, 101],
        "reserve": 2,
        "clips_per_phase": 2,
        "grids": {"layernorm": [{"lr": 1e-5}, {"lr": 3e-2}], "hope": [{"cms_lr": 1e-5}, {"cms_lr": 3e-2}]},
    }
    return cfg


def test_tuning_chooses_on_validation_streams(tmp_path, monkeypatch):
    hooks = StandInHooks()
    res = run_aba(tuning_config(), hooks=hooks, out=tmp_path, progress=False)
    t = res.data["tuning"]
    assert set(t["runs"]) == {"hope", "ac+layernorm"}  # strategy none has nothing to tune
    for name, rec in t["runs"].items():
        assert len(rec["scores"]) == 2 and rec["chosen_index"] == min(range(2), key=rec["scores"].__getitem__)
        assert (
            rec["choice"]
            == tuning_config()["tuning"]["grids"][{"hope": "hope"}.get(name, "layernorm")][rec["chosen_index"]]
        )
        # the reported runs use the choice
        stored = json.loads((tmp_path / "runs" / name / "seed0.json").read_text())
        for k, v in rec["choice"].items():
            assert stored["log"]["options"][k] == v
    # validation streams only on the validation seeds, reported streams only on the reported seeds
    assert {seed for part, seed in hooks.parts if part == "validation"} == {100, 101}
    assert {seed for part, seed in hooks.parts if part == "report" and seed != 0} <= {1}
    assert len(list((tmp_path / "tuning").rglob("p*-seed*.json"))) == 2 * 2 * 2
    # a restart reuses the validation logs as well
    count = _count_adapt_calls(monkeypatch)
    run_aba(tuning_config(), hooks=StandInHooks(), out=tmp_path, progress=False)
    assert count["n"] == 0
    bad = tuning_config()
    bad["tuning"]["grids"]["hope"].append({"cms_lr": 1e-3})
    with pytest.raises(ValueError, match=r"aba.tuning.grids must give every strategy the same number of points"):
        validate_config(bad)
    bad = tuning_config()
    bad["tuning"]["clips_per_phase"] = 3
    with pytest.raises(ValueError, match=r"aba.tuning.clips_per_phase 3 exceeds aba.tuning.reserve 2"):
        validate_config(bad)


def test_results_hold_the_verdict_inputs(tmp_path):
    res = run_aba(tuning_config(), hooks=StandInHooks(), out=tmp_path, progress=False)
    d = res.data
    assert d["headline"] == ["hope", "ac+layernorm", "ac+none", "oracle"]
    comp = d["comparisons"]["tf"][0]
    assert (comp["a"], comp["b"]) == ("hope", "ac+layernorm")
    per = d["per_seed"]["tf"]
    want = sum(per["hope"][s]["B"] - per["ac+layernorm"][s]["B"] for s in (0, 1)) / 2
    assert comp["diffs"]["B"]["mean"] == pytest.approx(want)
    shift = d["shift"]["tf"]
    assert shift["ratio"] == pytest.approx(
        d["summary"]["tf"]["ac+none"]["B"]["mean"] / d["summary"]["tf"]["oracle"]["B"]["mean"]
    )
    # relative curves: error / copy-last on the same clip
    log = json.loads((tmp_path / "runs" / "ac+none" / "seed0.json").read_text())["log"]
    rel0 = [e / c for e, c in zip(log["tf"], log["copy_tf"])]
    log1 = json.loads((tmp_path / "runs" / "ac+none" / "seed1.json").read_text())["log"]
    rel1 = [e / c for e, c in zip(log1["tf"], log1["copy_tf"])]
    assert d["rel_curves"]["tf"]["ac+none"]["mean"] == pytest.approx([(a + b) / 2 for a, b in zip(rel0, rel1)])
    # every pre-trained model's held-out errors, once per model
    pre = {p["name"]: p for p in d["pretrained"]}
    assert set(pre) == {"hope-A1", "ac-A1", "ac-B"} and pre["ac-A1"]["source"] == "trained"
    assert set(pre["ac-A1"]["runs"]) == {"ac+layernorm", "ac+none"}
    assert set(pre["ac-B"]["heldout"]) == {"A1", "B", "A2"} and pre["ac-B"]["heldout"]["B"]["ratio"] > 0
    assert "## Verdict" in (tmp_path / "results.md").read_text() and (tmp_path / "aba_all.png").is_file()


def test_shipped_weights_are_used_only_for_their_spec_and_dataset(tmp_path, monkeypatch, capsys):
    """A shipped index entry whose spec and dataset id equal the job's replaces that pre-training; another
    dataset id pre-trains and says why."""
    from hope_kernels import pretrained
    from hope_kernels.models import build_predictor

    cfg = tuning_config()
    cfg["preset"] = "unit"
    cfg["runs"] = [r for r in cfg["runs"] if r["model"] == "ac"]
    spec = pretrained.spec_for(cfg, cfg["runs"][0], 0)
    model = build_predictor("ac", "tiny", enc_dim=8, grid=(5, 2, 2))
    root = tmp_path / "assets"
    pretrained.save_weights(root / "unit" / "ac-A1.safetensors", model, {}, torch.float16)

    def index(data_id):
        entry = {
            "name": "ac-A1",
            "file": "ac-A1.safetensors",
            "spec": spec,
            "data_id": data_id,
            "dtype": "float16",
            "steps": 5,
        }
        (root / "unit" / "index.json").write_text(
            json.dumps({"format": pretrained.FORMAT, "preset": "unit", "models": [entry]})
        )

    monkeypatch.setattr(pretrained, "ASSET_ROOT", root)
    hooks = StandInHooks()
    hooks.ensure_dataset(tmp_path / "o" / "data", "quick", 0)
    index(aba._data_id(tmp_path / "o" / "data"))
    res = run_aba(cfg, hooks=hooks, out=tmp_path / "o", progress=False)
    assert hooks.calls["train"] == 1  # the oracle (ac-B) only
    pre = {p["name"]: p for p in res.data["pretrained"]}
    assert pre["ac-A1"]["source"] == "shipped" and pre["ac-B"]["source"] == "trained"
    index("another")
    hooks = StandInHooks()
    res = run_aba(cfg, hooks=hooks, out=tmp_path / "p", progress=False)
    assert hooks.calls["train"] == 2
    err = capsys.readouterr().err
    assert "ac-A1: the shipped ac-A1 was trained on dataset another" in err and "pre-training it here" in err


def test_presets_are_package_data_found_from_any_folder(tmp_path, monkeypatch):
    """The presets are read from the package (hope_kernels/configs, importlib.resources), not from a folder next
    to it or the working directory; pyproject ships them. (tests/app/test_install.py checks a real wheel install.)"""
    import glob
    import importlib.resources
    import os
    import re

    from hope_kernels.config import shipped_configs

    root = importlib.resources.files("hope_kernels").joinpath("configs")
    assert root.joinpath("aba_quick.yaml").is_file() and root.joinpath("aba_paper.yaml").is_file()
    assert {"quick", "paper"} <= set(shipped_configs("aba_"))
    monkeypatch.chdir(tmp_path)
    assert load_config("quick")["preset"] == "quick"
    repo = str(ROOT)
    with open(os.path.join(repo, "pyproject.toml")) as f:  # (tomllib is Python 3.11+)
        package_data = re.search(r"\[tool\.setuptools\.package-data\]\n(?:#.*\n)*hope_kernels = \[([^]]*)\]", f.read())
    assert package_data and '"configs/*.yaml"' in package_data.group(1)
    stray = glob.glob(os.path.join(repo, "configs", "*.yaml"))  # the old folder: a merge must not revive it
    assert not stray, f"{stray}: the configs live in hope_kernels/configs (package data)"


def test_bad_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"unknown A-B-A preset 'nope': the package ships \['paper', 'quick'"):
        load_config("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
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


def _fake_dataset(path, content):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"stand-in": content}))
    return {"dir": str(path), "imported": True}


def test_checkpoints_are_not_reused_across_datasets(tmp_path):
    cfg = tiny_config()
    cfg["runs"], cfg["seeds"] = cfg["runs"][1:3], [0]
    cfg["data"] = _fake_dataset(tmp_path / "d1", 1)
    hooks = StandInHooks()
    run_aba(cfg, hooks=hooks, out=tmp_path / "o", progress=False)
    assert hooks.calls["train"] == 1 and hooks.calls["verify_dataset"] == 1
    cfg["data"] = _fake_dataset(tmp_path / "d2", 2)  # other data, same everything else
    hooks = StandInHooks()
    res = run_aba(cfg, hooks=hooks, out=tmp_path / "o", progress=False)
    assert hooks.calls["train"] == 1 and hooks.calls["load_checkpoint"] == 0
    assert len(list((tmp_path / "o" / "checkpoints").glob("*.json"))) == 2
    assert res.data["data_path"] == str(tmp_path / "d2")


def test_imported_data_is_verified(tmp_path):
    import torch

    from hope_kernels.data.format import DatasetWriter

    d = tmp_path / "d"
    with DatasetWriter(d, grid=(2, 1, 1), enc_dim=4, action_dim=2) as w:
        w.add_shard(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 2), "A1", "stream")
    shard = d / "A1-stream-0000.safetensors"
    b = bytearray(shard.read_bytes())
    b[-3] ^= 0xFF
    shard.write_bytes(bytes(b))
    hooks = StandInHooks()
    hooks.verify_dataset = aba.Hooks().verify_dataset
    cfg = tiny_config()
    cfg["data"] = {"dir": str(d), "imported": True}
    with pytest.raises(ValueError, match="shard A1-stream-0000.safetensors is corrupt"):
        run_aba(cfg, hooks=hooks, out=tmp_path / "o", progress=False)
    assert hooks.calls["make_stream"] == 0


def test_cuda_without_cuda_fails_before_the_data(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_config()
    cfg["device"] = "cuda"
    hooks = StandInHooks()
    with pytest.raises(RuntimeError, match="CUDA requested but torch.cuda.is_available"):
        run_aba(cfg, hooks=hooks, out=tmp_path / "o", progress=False)
    assert hooks.calls["ensure_dataset"] == 0


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(basline="ac+none"), r"unknown A-B-A config keys \['basline'\] at aba; known: \['adapt', "),
        (
            lambda c: c["stream"].update(clip_per_phase=1),
            r"unknown A-B-A stream keys \['clip_per_phase'\] at aba.stream",
        ),
        (lambda c: c["runs"][0].update(option={}), r"unknown A-B-A run keys \['option'\] at aba.runs\[0\]"),
        (
            lambda c: c["runs"][6].update(train_phase=["B"]),
            r"unknown A-B-A run keys \['train_phase'\] at aba.runs\[6\]",
        ),
        (lambda c: c["stream"].update(phases=["A1", "C"]), r"aba.stream.phases must be a non-empty list of phases"),
        (lambda c: c["runs"][6].update(train_phases=["b"]), r"aba.runs\[6\].train_phases must be"),
        (lambda c: c.update(seeds=["a"]), r"aba.seeds\[0\] must be an int, got 'a'"),
        (lambda c: c.update(seeds=[-1]), r"aba.seeds must be non-negative ints"),
        (lambda c: c["stream"].update(clips_per_phase=-1), r"aba.stream.clips_per_phase must be a non-negative int"),
        (lambda c: c.update(fisher_clips=-2), r"aba.fisher_clips must be a non-negative int, got -2"),
        (lambda c: c["runs"][3].update(options={"lr": "x"}), r"aba.runs\[3\].options.lr must be a number, got 'x'"),
        (lambda c: c["adapt"].update(lrr=1), r"unknown adaptation option keys \['lrr'\] at aba.adapt"),
        (
            lambda c: c["pretrain"].update(stepz=1),
            r"aba.pretrain has keys that are not training config fields: \['stepz",
        ),
        (lambda c: c.update(compile="yes"), r"aba.compile must be a bool, got 'yes'"),
        (lambda c: c["runs"][2].pop("model"), r"aba.runs\[2\] is missing 'model'"),
    ],
    ids=[
        "top",
        "stream",
        "run-option",
        "run-train_phase",
        "phases",
        "train_phases",
        "seeds",
        "negative-seed",
        "clips",
        "fisher",
        "run-options-type",
        "adapt-key",
        "pretrain-key",
        "compile",
        "run-missing",
    ],
)
def test_config_typos_and_bad_values_are_named(edit, match):
    cfg = tiny_config()
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)


def test_cli_aba_bad_yaml_and_out_file(tmp_path, capsys):
    from hope_kernels.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("seeds: [0\nruns: []\n")
    assert main(["aba", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not valid YAML" in err and len(err.strip().splitlines()) == 1
    assert main(["aba", "--config", str(path), "--out", str(path)]) == 2
    path.write_text(json.dumps(tiny_config()))
    assert main(["aba", "--config", str(path), "--out", str(path)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_fingerprint_covers_fisher_clips_and_resolves_paths(tmp_path, monkeypatch):
    cfg = tiny_config()
    cfg["runs"] = [r for r in cfg["runs"] if r["name"] in ("ac+none", "ac+ewc")]
    cfg["seeds"], cfg["baseline"] = [0], None
    monkeypatch.chdir(tmp_path)
    run_aba(cfg, hooks=StandInHooks(), out="rel", progress=False)
    count = _count_adapt_calls(monkeypatch)
    # the same output folder, named from another working directory: everything is reused
    monkeypatch.chdir(tmp_path.parent)
    hooks = StandInHooks()
    run_aba(cfg, hooks=hooks, out=tmp_path / "rel", progress=False)
    assert count["n"] == 0 and hooks.calls["train"] == 0
    cfg["fisher_clips"] = 3
    run_aba(cfg, hooks=StandInHooks(), out=tmp_path / "rel", progress=False)
    assert count["n"] == 1  # only ac+ewc


def test_checkpoints_and_logs_not_reused_after_a_code_change(tmp_path, monkeypatch):
    """A changed model/training source retrains the checkpoints; a changed adaptation source reruns the runs
    (a gate change in the HOPE predictor had kept its checkpoint key)."""
    cfg = tiny_config()
    cfg["runs"], cfg["seeds"], cfg["baseline"] = cfg["runs"][1:3], [0], None
    run_aba(cfg, hooks=StandInHooks(), out=tmp_path / "o", progress=False)
    hooks = StandInHooks()
    run_aba(cfg, hooks=hooks, out=tmp_path / "o", progress=False)
    assert hooks.calls["train"] == 0
    real = aba._code_id
    monkeypatch.setattr(aba, "_code_id", lambda *m: real(*m) + ("x" if "models" in m else ""))
    hooks = StandInHooks()
    run_aba(cfg, hooks=hooks, out=tmp_path / "o", progress=False)
    assert hooks.calls["train"] == 1
    count = _count_adapt_calls(monkeypatch)
    monkeypatch.setattr(aba, "_code_id", lambda *m: real(*m) + "y")
    run_aba(cfg, hooks=StandInHooks(), out=tmp_path / "o", progress=False)
    assert count["n"] == len(cfg["runs"])


def test_select_runs_drops_references_to_removed_runs():
    cfg = load_config("quick")
    sub = aba.select_runs(cfg, ["ac+layernorm", "ac+none"])
    assert [r["name"] for r in sub["runs"]] == ["ac+layernorm", "ac+none"]
    assert sub["baseline"] == "ac+layernorm" and sub["frozen_run"] == "ac+none"
    assert sub["headline"] == ["ac+layernorm", "ac+none"] and sub["comparisons"] == []
    validate_config(sub)
    assert len(cfg["runs"]) > 2  # the original is left as it was
    with pytest.raises(ValueError, match=r"unknown run name\(s\) \['nope'\]"):
        aba.select_runs(cfg, ["nope"])
