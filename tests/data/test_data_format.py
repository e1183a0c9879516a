"""Dataset format: manifest + shards, lazy ClipDataset, make_stream, verify, ensure_dataset, atomic writes."""

import json
import os
import re

import pytest
import torch

from hope_kernels.cli import main
from hope_kernels.data import ClipDataset, ensure_dataset, make_stream, simulate_dataset, verify_dataset
from hope_kernels.data.format import MANIFEST, VERIFIED, DatasetWriter, read_manifest
from hope_kernels.data.simulate import PRESETS

TINY = PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("ds") / "tiny", preset="tiny", seed=0, progress=False)


def test_tiny_dataset_contract(tiny):
    ds = ClipDataset(tiny)
    assert len(ds) == sum(TINY[f"train_{p}"] for p in ("a1", "b", "a2")) + 3 * (TINY["stream"] + TINY["heldout"])
    assert ds.grid == (8, 8, 8) and ds.enc_dim == 64 and ds.action_dim == 2 and ds.state_dim == 0
    item = ds[0]
    assert set(item) == {"latents", "actions", "phase", "split", "index"}
    assert item["latents"].shape == (8, 64, 64) and item["latents"].dtype == torch.float16
    assert item["actions"].shape == (8, 2) and item["actions"].dtype == torch.float32
    assert torch.isfinite(item["latents"].float()).all()
    assert ((item["actions"] != 0).any(dim=1).sum()) == 1  # one impulse
    assert len(ClipDataset(tiny, phase="A1", split="train")) == TINY["train_a1"]
    assert len(ClipDataset(tiny, phase="B", split="train")) == TINY["train_b"]
    for p in ("A1", "B", "A2"):
        sub = ClipDataset(tiny, phase=p, split="heldout")
        assert len(sub) == TINY["heldout"]
        assert all(c["phase"] == p and c["split"] == "heldout" for c in sub)
    m = read_manifest(tiny)
    assert m["phases"]["A1"]["physics"]["mu"] == 0.5 and m["phases"]["B"]["physics"]["mass"] == 0.5
    assert m["phases"]["A2"]["physics"] == m["phases"]["A1"]["physics"]
    # A1 and A2 share physics but not clips
    a1, a2 = ClipDataset(tiny, phase="A1", split="stream")[0], ClipDataset(tiny, phase="A2", split="stream")[0]
    assert not torch.equal(a1["latents"], a2["latents"])
    assert len(ds.meta(0)["xy"]) == 8


def test_dataset_reads_lazily(tiny):
    ds = ClipDataset(tiny, phase="B", split="train")
    ds[0], ds[1]
    assert len(ds._handles) == 1  # only the one shard holding these rows was opened
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="phase 'C' is not in the dataset"):
        ClipDataset(tiny, phase="C")
    with pytest.raises(ValueError, match="split must be one of"):
        ClipDataset(tiny, split="test")


def test_make_stream(tiny):
    s = make_stream(tiny)
    assert s.phases == ("A1", "B", "A2")
    assert len(s.clips) == 3 * TINY["stream"] and s.boundaries == (0, TINY["stream"], 2 * TINY["stream"])
    assert [c["phase"] for c in s.clips] == ["A1"] * 6 + ["B"] * 6 + ["A2"] * 6
    assert all(c["split"] == "stream" for c in s.clips)
    assert {p: len(v) for p, v in s.heldout.items()} == {p: TINY["heldout"] for p in s.phases}
    assert all(c["split"] == "heldout" for c in s.heldout["B"])
    # seeds permute the order inside a phase, counts truncate
    idx0 = [c["index"] for c in make_stream(tiny, seed=0).clips]
    idx1 = [c["index"] for c in make_stream(tiny, seed=1).clips]
    assert idx0 != idx1 and sorted(idx0) == sorted(idx1)
    assert idx0 == [c["index"] for c in make_stream(tiny, seed=0).clips]
    s2 = make_stream(tiny, phases=("A1", "B"), clips_per_phase={"A1": 2, "B": 3})
    assert [c["phase"] for c in s2.clips] == ["A1", "A1", "B", "B", "B"]
    assert len(make_stream(tiny, clips_per_phase=4).clips) == 12
    with pytest.raises(ValueError, match="asks 99 stream clips"):
        make_stream(tiny, clips_per_phase=99)
    with pytest.raises(ValueError, match="phase 'X'"):
        make_stream(tiny, phases=("A1", "X"))


def test_make_stream_reserves_validation_clips(tiny):
    """reserve r: validation streams draw only from the last r stream clips of each phase, reported streams never
    do, whatever the seed."""
    report = {c["index"] for seed in range(8) for c in make_stream(tiny, seed=seed, reserve=2).clips}
    val = {c["index"] for seed in (100, 101) for c in make_stream(tiny, seed=seed, part="validation", reserve=2).clips}
    assert report and val and not report & val
    assert len(val) == 3 * 2 and len(report) == 3 * (TINY["stream"] - 2)
    v = make_stream(tiny, seed=100, part="validation", reserve=2, clips_per_phase=1)
    assert [c["phase"] for c in v.clips] == ["A1", "B", "A2"]
    with pytest.raises(ValueError, match="needs reserve > 0"):
        make_stream(tiny, part="validation")
    with pytest.raises(ValueError, match="leaves no reported stream clips"):
        make_stream(tiny, reserve=TINY["stream"])
    with pytest.raises(ValueError, match="part must be"):
        make_stream(tiny, part="test", reserve=1)


def test_verify_ok_and_cli(tiny, capsys):
    info = verify_dataset(tiny)
    assert info["clips"] == len(ClipDataset(tiny))
    assert main(["verify", str(tiny)]) == 0
    assert "ok:" in capsys.readouterr().out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_catches_corrupt_byte(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path / "c")
    shard = read_manifest(d)["shards"][1]["file"]
    p = d / shard
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=f"shard {shard} is corrupt: sha256"):
        verify_dataset(d)
    assert main(["verify", str(d)]) == 2
    assert shard in capsys.readouterr().err


def test_verify_catches_truncated_and_missing_shard(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "t")
    shard = read_manifest(d)["shards"][0]["file"]
    p = d / shard
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"shard {shard} has .* bytes"):
        verify_dataset(d)
    p.unlink()
    with pytest.raises(ValueError, match=f"shard {shard} is missing"):
        verify_dataset(d)
    with pytest.raises(FileNotFoundError, match="missing"):
        ClipDataset(d, phase="A1", split="train")[0]


def test_corrupt_manifest_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        ClipDataset(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt manifest"):
        ClipDataset(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "hope-kernels-clips", "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        read_manifest(tmp_path)


def test_simulation_is_deterministic(tmp_path):
    kw = dict(preset="tiny", seed=3, progress=False, train_a1=3, train_b=0, train_a2=0, stream=0, heldout=2)
    a = read_manifest(simulate_dataset(tmp_path / "a", **kw))
    b = read_manifest(simulate_dataset(tmp_path / "b", **kw))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    c = read_manifest(simulate_dataset(tmp_path / "c", **{**kw, "seed": 4}))
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]


def test_ensure_dataset_reuses_and_refuses_stale(tiny, tmp_path):
    mtime = os.path.getmtime(tiny / MANIFEST)
    assert ensure_dataset(tiny, preset="tiny", seed=0) == tiny
    assert os.path.getmtime(tiny / MANIFEST) == mtime
    with pytest.raises(ValueError, match="seed 0, not preset 'tiny' seed 1"):
        ensure_dataset(tiny, preset="tiny", seed=1)
    d = ensure_dataset(tmp_path / "new", preset="tiny", seed=0, train_a1=2, train_b=1, train_a2=1, stream=1, heldout=1)
    assert len(ClipDataset(d)) == 2 + 1 + 1 + 3 + 3


def test_writer_refuses_overwrite_and_cleans_up(tiny, tmp_path):
    with pytest.raises(ValueError, match="already holds a dataset"):
        DatasetWriter(tiny, grid=(8, 8, 8), enc_dim=64, action_dim=2)
    d = tmp_path / "w"
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(d, grid=(2, 2, 2), enc_dim=3, action_dim=2, latent_dtype="float32") as w:
            w.add_shard(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 2), "A1", "train")
            raise RuntimeError("boom")
    assert not d.exists()  # nothing half-written
    with DatasetWriter(d, grid=(2, 2, 2), enc_dim=3, action_dim=2, latent_dtype="bfloat16") as w:
        with pytest.raises(ValueError, match=r"latents must be \(n, 2, 4, 3\), got \(1, 2, 5, 3\)"):
            w.add_shard(torch.zeros(1, 2, 5, 3), torch.zeros(1, 2, 2), "A1", "train")
        w.add_shard(torch.randn(2, 2, 4, 3), torch.zeros(2, 2, 2), "A1", "train")
    assert ClipDataset(d)[1]["latents"].dtype == torch.bfloat16
    assert sorted(os.listdir(d)) == [VERIFIED, "A1-train-0000.safetensors", MANIFEST]  # VERIFIED: the read


def test_simulate_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "simulate",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
        "--seed",
        "2",
        "--set",
        "train_a1=2",
        "--set",
        "train_b=1",
        "--set",
        "train_a2=0",
        "--set",
        "stream=1",
        "--set",
        "heldout=1",
        "--set",
        "mu_b=0.05",
    ]
    assert main(argv) == 0
    assert "wrote 9 clips" in capsys.readouterr().out
    m = read_manifest(out)
    assert m["phases"]["B"]["physics"]["mu"] == 0.05 and m["generator"]["seed"] == 2
    assert main(argv) == 2  # the folder already holds a dataset
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "x"), "--set", "nope=1"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "x"), "--set", "mu_a=-1"]) == 2
    assert "mu > 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["clips"][0].update(row=10_000), "clip 0 refers to row 10000 of shard"),
        (lambda m: m["clips"][0].pop("row"), "clip entry 0 must have shard, row"),
        (lambda m: m["clips"][0].update(shard=99), "clip 0 refers to shard 99"),
        (lambda m: m["shards"][0].update(phase="C"), "has phase 'C'"),
        (lambda m: m["shards"][0].pop("bytes"), "shard entry 0 must have"),
        (lambda m: m.update(grid="8x8x8"), "grid must be"),
    ],
    ids=["row-oob", "no-row", "shard-oob", "phase-unknown", "no-bytes", "grid-str"],
)
def test_malformed_manifest_entries_are_named(tiny, tmp_path, capsys, edit, match):
    d = _copy(tiny, tmp_path / "m")
    m = json.loads((d / MANIFEST).read_text())
    edit(m)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"corrupt manifest {re.escape(str(d / MANIFEST))}: .*{match}"):
        read_manifest(d)
    assert main(["verify", str(d)]) == 2
    assert str(d / MANIFEST) in capsys.readouterr().err


def test_make_stream_rejects_negative_clips_per_phase(tiny):
    with pytest.raises(ValueError, match="clips_per_phase must be a non-negative int, got -1"):
        make_stream(tiny, clips_per_phase=-1)
