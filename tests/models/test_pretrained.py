"""Shipped pre-trained predictors (hope_kernels.pretrained): which pre-trainings a preset needs, matching shipped
weights by spec and dataset, the weights file format, regeneration, and the shipped quick weights themselves."""

import json

import pytest
import torch

from hope_kernels import pretrained
from hope_kernels.aba import load_config
from hope_kernels.models import build_predictor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_with_steps_sets_every_pretraining_of_the_preset():
    """--steps (trial runs) reaches the shared steps, each kind's own and a run's own pretrain mapping (HOPE with
    CMS off pre-trains 2400 steps by its run line)."""
    specs = pretrained.pretrain_specs(pretrained.with_steps(load_config("quick"), 3))
    assert {pretrained.spec_name(s): s["train"]["steps"] for s, _ in specs} == {
        pretrained.spec_name(s): 3 for s, _ in specs
    }
    assert any(s["overrides"] == {"cms": False} for s, _ in specs)


def test_quick_preset_pretrainings():
    cfg = load_config("quick")
    specs = pretrained.pretrain_specs(cfg)
    names = [pretrained.spec_name(s) for s, _ in specs]
    assert names == [
        "hope-A1",
        "ac-A1",
        "hope-A1[self_referential=False]",
        "hope-A1[memory_rule=titans]",
        "hope-A1[cms=False]",
        "ac-B",
        "ac-A1+B",
    ]
    by_name = {pretrained.spec_name(s): (s, runs) for s, runs in specs}
    hope, runs = by_name["hope-A1"]
    assert {"hope", "hope+ttt", "hope+none", "hope[no-carry]"} <= set(runs)
    # HOPE pre-trains as a continual learner; the AC models do not get its fields
    assert hope["train"]["seq_clips"] == 4 and hope["train"]["cms_train_periods"] is True
    assert "seq_clips" not in by_name["ac-A1"][0]["train"] and "hope" not in by_name["ac-A1"][0]["train"]
    assert by_name["ac-B"][0]["phases"] == ["B"] and by_name["ac-A1+B"][0]["phases"] == ["A1", "B"]
    assert hope["train"]["steps"] == 2500 and by_name["ac-A1"][0]["train"]["steps"] == 2000
    assert pretrained.spec_name({**hope, "overrides": {"cms": False}, "seed": 3}) == "hope-A1[cms=False]-s3"


def test_a_runs_pretrain_fields_are_part_of_its_spec():
    cfg = load_config("quick")
    run = {
        "name": "hope[no-cms]",
        "model": "hope",
        "strategy": "hope",
        "overrides": {"cms": False},
        "pretrain": {"lr": 1.0e-3},
    }
    spec = pretrained.spec_for(cfg, run, 0)
    shared = pretrained.spec_for(cfg, {**run, "pretrain": None}, 0)
    assert spec["train"]["lr"] == 1.0e-3 and shared["train"]["lr"] == cfg["pretrain"]["lr"]
    assert spec["train"]["seq_clips"] == 4 and spec["train"]["steps"] == 2500  # the hope section still applies
    assert {k: v for k, v in spec["train"].items() if k != "lr"} == {
        k: v for k, v in shared["train"].items() if k != "lr"
    }
    # two runs that differ only in their pretrain fields are two pre-trainings
    two = load_config("quick", runs=cfg["runs"] + [run, {**run, "name": "b", "pretrain": {"lr": 2.0e-3}}])
    assert len(pretrained.pretrain_specs(two)) == len(pretrained.pretrain_specs(cfg)) + 2
    with pytest.raises(ValueError, match="pretrain must be a mapping"):
        load_config("quick", runs=cfg["runs"] + [{**run, "pretrain": 1.0e-3}])


def _index(tmp_path, spec, data_id="d1", model=None):
    root = tmp_path / "assets"
    (root / "quick").mkdir(parents=True)
    model = model or build_predictor("ac", "tiny", enc_dim=8, grid=(3, 2, 2))
    pretrained.save_weights(root / "quick" / "ac-A1.safetensors", model, {"spec": spec}, torch.float16)
    entry = {"name": "ac-A1", "file": "ac-A1.safetensors", "spec": spec, "data_id": data_id, "dtype": "float16"}
    (root / "quick" / "index.json").write_text(
        json.dumps({"format": pretrained.FORMAT, "preset": "quick", "models": [entry]})
    )
    return root, model


def test_find_shipped_matches_spec_and_dataset(tmp_path):
    cfg = load_config("quick")
    spec = pretrained.spec_for(cfg, next(r for r in cfg["runs"] if r["name"] == "ac+layernorm"), 0)
    root, model = _index(tmp_path, spec)
    entry, why = pretrained.find_shipped("quick", spec, "d1", root)
    assert why == "" and entry["name"] == "ac-A1"
    loaded = pretrained.load_weights(entry["path"])
    for k, v in model.state_dict().items():  # float16 on disk, float32 in memory
        assert torch.equal(loaded.state_dict()[k], v.half().float())
    assert pretrained.find_shipped("quick", spec, "d2", root)[1] == (
        "the shipped ac-A1 was trained on dataset d1, this dataset is d2"
    )
    other = {**spec, "train": {**spec["train"], "steps": 5}}
    assert "no shipped weights with the config of ac-A1" in pretrained.find_shipped("quick", other, "d1", root)[1]
    assert pretrained.find_shipped("paper", spec, "d1", root) == (None, "no shipped weights for preset 'paper'")
    (root / "quick" / "ac-A1.safetensors").unlink()
    assert "is missing" in pretrained.find_shipped("quick", spec, "d1", root)[1]
    (root / "quick" / "index.json").write_text("{trunc")
    with pytest.raises(ValueError, match="index.json is corrupt"):
        pretrained.find_shipped("quick", spec, "d1", root)


def test_load_weights_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        pretrained.load_weights(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="bad.safetensors.*corrupt"):
        pretrained.load_weights(bad)
    model = build_predictor("ac", "tiny", enc_dim=8, grid=(3, 2, 2))
    with torch.no_grad():
        model.proj.weight[0, 0] = float("nan")
    pretrained.save_weights(tmp_path / "nan.safetensors", model, {}, torch.float32)
    with pytest.raises(ValueError, match="nan.safetensors.*NaN"):
        pretrained.load_weights(tmp_path / "nan.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a hope-kernels pretrained weights file"):
        pretrained.load_weights(tmp_path / "foreign.safetensors")


def test_heldout_errors_copy_last_model_is_one(tmp_path):
    # an untrained predict_delta predictor outputs layer_norm(z_t): exactly the copy-last-latent baseline
    g = torch.Generator().manual_seed(0)
    clips = [
        {"latents": torch.randn(3, 4, 8, generator=g), "actions": torch.randn(3, 2, generator=g)} for _ in range(3)
    ]
    model = build_predictor("ac", "tiny", enc_dim=8, grid=(3, 2, 2))
    torch.nn.init.zeros_(model.proj.weight)
    torch.nn.init.zeros_(model.proj.bias)
    err = pretrained.heldout_errors(model, {"A1": clips, "B": []})
    assert set(err) == {"A1"} and err["A1"]["clips"] == 3
    assert err["A1"]["ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow(minutes=2)
def test_regeneration_is_deterministic(tmp_path):
    """The regeneration command, a few steps: the same weights, byte for byte, from two fresh work folders."""
    from hope_kernels.cli import main

    cfg = load_config("quick")
    cfg["data"] = {"preset": "tiny", "seed": 0}
    cfg = pretrained.with_steps(cfg, 2)
    assert {s["train"]["steps"] for s, _ in pretrained.pretrain_specs(cfg)} == {2}
    runs = []
    for k in (1, 2):
        idx = pretrained.regenerate(
            cfg, tmp_path / f"work{k}", assets=tmp_path / f"assets{k}", only=["ac-A1", "hope-A1"], say=lambda m: None
        )
        runs.append(idx)
        assert [e["name"] for e in idx["models"]] == ["ac-A1", "hope-A1"]
    for name in ("ac-A1", "hope-A1"):
        a = (tmp_path / "assets1" / f"{name}.safetensors").read_bytes()
        b = (tmp_path / "assets2" / f"{name}.safetensors").read_bytes()
        # the metadata records wall time; compare the weights
        from safetensors.torch import load

        wa, wb = load(a), load(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    e = runs[0]["models"][1]
    assert e["steps"] == 2 and e["spec"]["train"]["seq_clips"] == 4 and e["data_id"]
    assert e["code"]["trained"]["train_code"] == e["code"]["indexed"]["train_code"]
    assert set(e["heldout"]) == {"A1", "B", "A2"}
    # the CLI refuses a trial run that would overwrite the package's weights
    assert main(["pretrain", "--preset", "quick", "--steps", "2"]) == 2


def test_data_id_names_content_not_the_run_that_wrote_it(tmp_path):
    """The same data written twice (other wall time, other thread count) has one id; other bytes, another id.
    (CI once failed here: the id hashed the generator's wall seconds.)"""
    import json

    import torch

    from hope_kernels.data import simulate_dataset

    kw = dict(train_a1=4, train_b=2, train_a2=2, stream=2, heldout=2, progress=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = simulate_dataset(tmp_path / "a", "tiny", 0, **kw)
        torch.set_num_threads(2)
        b = simulate_dataset(tmp_path / "b", "tiny", 0, **kw)
    finally:
        torch.set_num_threads(threads)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["generator"]["torch_threads"] != mb["generator"]["torch_threads"]
    assert pretrained.data_id(a) == pretrained.data_id(b)
    mb["shards"][0]["sha256"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(mb))
    assert pretrained.data_id(a) != pretrained.data_id(b)
    c = simulate_dataset(tmp_path / "c", "tiny", 1, **kw)
    assert pretrained.data_id(c) != pretrained.data_id(a)


def test_shipped_quick_weights_reproduce_their_heldout_errors(tmp_path):
    """Every shipped quick model loads and, on the quick dataset simulated here, gives the held-out errors its
    index records (and its dataset id is this dataset's)."""
    from hope_kernels.data import ensure_dataset

    idx = pretrained.read_index("quick")
    assert idx is not None, "no shipped weights for the quick preset (hope-kernels pretrain --preset quick)"
    data = ensure_dataset(tmp_path / "data", "quick", 0)
    assert all(e["data_id"] == pretrained.data_id(data) for e in idx["models"]), (
        "the quick dataset simulated here differs from the one the shipped weights were trained on"
    )
    held = pretrained.dataset_heldout(data)
    for e in idx["models"]:
        model = pretrained.load_weights(pretrained.ASSET_ROOT / "quick" / e["file"])
        got = pretrained.heldout_errors(model, held)
        for phase, want in e["heldout"].items():
            assert got[phase]["tf"] == pytest.approx(want["tf"], rel=1e-4), (e["name"], phase)
