"""`hope-kernels import`: every input format round-trips, every bad input is refused with a message naming the
problem and the file, and a failed import leaves the previous dataset intact."""

import os

import numpy as np
import pytest
import torch

from hope_kernels.cli import main
from hope_kernels.data import ClipDataset, verify_dataset
from hope_kernels.data.format import DatasetWriter

n, T, H, W, D, A = 6, 4, 2, 3, 5, 2


def _arrays(seed=0, n=n):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, T, H, W, D, generator=g)
    act = torch.zeros(n, T, A)
    act[torch.arange(n), torch.arange(n) % T] = torch.randn(n, A, generator=g)
    return lat, act


def _save(path, x, fmt, key):
    if fmt == "npy":
        np.save(path, x.numpy())
    elif fmt == "npz":
        np.savez(path, **{key: x.numpy()})
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({key: x.contiguous()}, str(path))
    else:
        torch.save({key: x}, path)
    return path


def _run(*argv):
    return main(["import", *map(str, argv)])


@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors", "pt"])
@pytest.mark.parametrize("rank", [4, 5])
def test_round_trip(tmp_path, fmt, rank):
    lat, act = _arrays()
    states = torch.randn(n, T, 3)
    given = lat if rank == 5 else lat.reshape(n, T, H * W, D)
    lp = _save(tmp_path / f"lat.{fmt}", given, fmt, "latents")
    ap = _save(tmp_path / f"act.{fmt}", act, fmt, "actions")
    sp = _save(tmp_path / f"st.{fmt}", states, fmt, "states")
    out = tmp_path / "ds"
    grid = ["--grid", H, W] if rank == 4 else []
    assert _run("--latents", lp, "--actions", ap, "--states", sp, "--phase", "A1", "--out", out, *grid) == 0
    lat2, act2 = _arrays(seed=1)
    lp2 = _save(tmp_path / f"lat2.{fmt}", lat2, fmt, "latents")
    ap2 = _save(tmp_path / f"act2.{fmt}", act2, fmt, "actions")
    assert (
        _run(
            "--latents",
            lp2,
            "--actions",
            ap2,
            "--states",
            sp,
            "--phase",
            "B",
            "--out",
            out,
            "--append",
            "--split",
            "stream",
        )
        == 0
    )
    verify_dataset(out)
    ds = ClipDataset(out)
    assert ds.grid == (T, H, W) and ds.enc_dim == D and ds.state_dim == 3 and ds.latent_dtype == torch.float32
    a1 = ClipDataset(out, phase="A1")
    assert [a1[i]["split"] for i in range(n)] == ["train"] * 4 + ["stream", "heldout"]  # auto split, order kept
    for i in range(n):
        assert torch.equal(a1[i]["latents"], lat[i].reshape(T, H * W, D))
        assert torch.equal(a1[i]["actions"], act[i])
        assert torch.equal(a1[i]["states"], states[i])
    b = ClipDataset(out, phase="B", split="stream")
    assert len(b) == n and torch.equal(b[2]["latents"], lat2[2].reshape(T, H * W, D))


def test_half_precision_kept(tmp_path):
    lat, act = _arrays()
    lp = _save(tmp_path / "l.safetensors", lat.to(torch.bfloat16), "safetensors", "latents")
    ap = _save(tmp_path / "a.npy", act, "npy", "actions")
    assert _run("--latents", lp, "--actions", ap, "--phase", "A1", "--out", tmp_path / "ds") == 0
    assert ClipDataset(tmp_path / "ds")[0]["latents"].dtype == torch.bfloat16


def _bad(tmp_path, capsys, lat, act, *extra, out=None, fmt="npy"):
    lp = tmp_path / f"bad_lat.{fmt}"
    ap = tmp_path / f"bad_act.{fmt}"
    if not lp.exists():
        _save(lp, lat, fmt, "latents")
    if not ap.exists():
        _save(ap, act, fmt, "actions")
    rc = _run("--latents", lp, "--actions", ap, "--out", out or tmp_path / "ds", *(extra or ("--phase", "A1")))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    return err


def test_bad_inputs(tmp_path, capsys):
    lat, act = _arrays()
    e = _bad(tmp_path, capsys, lat[0, 0], act)
    assert "must be (n, T, N, D) or (n, T, H, W, D), got shape (2, 3, 5)" in e and "bad_lat.npy" in e
    (tmp_path / "bad_lat.npy").unlink()
    e = _bad(tmp_path, capsys, lat[:5], act)
    assert "clip counts differ" in e and "5 clips" in e and "bad_act.npy" in e
    (tmp_path / "bad_lat.npy").unlink()
    x = lat.clone()
    x[3, 1, 0, 0, 2] = float("nan")
    e = _bad(tmp_path, capsys, x, act)
    assert "NaN or Inf (first in clip 3" in e and "bad_lat.npy" in e
    (tmp_path / "bad_lat.npy").unlink()
    x = lat.clone()
    x[4, 0, 0, 0, 0] = float("inf")
    assert "first in clip 4" in _bad(tmp_path, capsys, x, act)
    (tmp_path / "bad_lat.npy").unlink()
    e = _bad(tmp_path, capsys, (lat * 10).to(torch.int32), act)
    assert "must be floating point" in e and "int32" in e
    (tmp_path / "bad_lat.npy").unlink()
    e = _bad(tmp_path, capsys, lat, act, "--phase", "C")
    assert "unknown phase 'C'" in e
    multi = act.clone()
    multi[2] = 1.0
    (tmp_path / "bad_act.npy").unlink()
    e = _bad(tmp_path, capsys, lat, multi)
    assert "clip 2 has 4 non-zero timesteps" in e
    assert not (tmp_path / "ds").exists()  # nothing half-written


def test_disagreeing_with_dataset(tmp_path, capsys):
    lat, act = _arrays()
    out = tmp_path / "ds"
    lp, ap = _save(tmp_path / "l.npy", lat, "npy", ""), _save(tmp_path / "a.npy", act, "npy", "")
    assert _run("--latents", lp, "--actions", ap, "--phase", "A1", "--out", out) == 0
    capsys.readouterr()
    e = _bad(tmp_path, capsys, lat[:, :3], act[:, :3], "--phase", "B", "--append", out=out)
    assert "grid of the new clips ([3, 2, 3]) disagrees with the dataset" in e
    (tmp_path / "bad_lat.npy").unlink(), (tmp_path / "bad_act.npy").unlink()
    e = _bad(tmp_path, capsys, lat.reshape(n, T, 3, 2, D), act, "--phase", "B", "--append", out=out)
    assert "grid of the new clips ([4, 3, 2])" in e
    (tmp_path / "bad_lat.npy").unlink()
    e = _bad(tmp_path, capsys, lat, act, "--phase", "B", out=out)
    assert "already holds a dataset" in e
    e = _bad(tmp_path, capsys, lat, act[:, :2], "--phase", "B", "--append", out=out, fmt="npz")
    assert "actions" in e and "T=2 timesteps, latents have T=4" in e


def test_pt_needing_pickle_is_refused(tmp_path, capsys):
    lat, act = _arrays()
    torch.save({"latents": lat, "note": np.arange(3)}, tmp_path / "bad_lat.pt")  # numpy array needs pickle
    e = _bad(tmp_path, capsys, None, act, fmt="pt")
    assert "needs pickle" in e and "bad_lat.pt" in e


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_object_arrays_named_not_corrupt(tmp_path, capsys, fmt):
    """An intact object array is refused for needing pickle (it was called truncated or corrupt)."""
    _, act = _arrays()
    obj = np.empty(2, dtype=object)
    obj[:] = [np.zeros(3), np.zeros(4)]
    p = tmp_path / f"bad_lat.{fmt}"
    np.save(p, obj) if fmt == "npy" else np.savez(p, latents=obj)
    e = _bad(tmp_path, capsys, None, act, fmt=fmt)
    assert f"bad_lat.{fmt}" in e and "holds Python objects, which only pickle can load" in e


@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors", "pt"])
def test_truncated_file(tmp_path, capsys, fmt):
    lat, act = _arrays()
    p = _save(tmp_path / f"bad_lat.{fmt}", lat, fmt, "latents")
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3])
    e = _bad(tmp_path, capsys, None, act, fmt=fmt)
    assert "latents file" in e and f"bad_lat.{fmt}" in e and "truncated or corrupt" in e


def test_missing_file_and_bad_extension(tmp_path, capsys):
    lat, act = _arrays()
    ap = _save(tmp_path / "a.npy", act, "npy", "")
    assert _run("--latents", tmp_path / "nope.npy", "--actions", ap, "--phase", "A1", "--out", tmp_path / "d") == 2
    assert "nope.npy does not exist" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("1,2")
    assert _run("--latents", tmp_path / "x.csv", "--actions", ap, "--phase", "A1", "--out", tmp_path / "d") == 2
    assert "unsupported extension '.csv'" in capsys.readouterr().err


def test_interrupted_import_leaves_dataset_intact(tmp_path, monkeypatch):
    lat, act = _arrays(n=20)
    out = tmp_path / "ds"
    lp, ap = _save(tmp_path / "l.npy", lat, "npy", ""), _save(tmp_path / "a.npy", act, "npy", "")
    assert _run("--latents", lp, "--actions", ap, "--phase", "A1", "--out", out) == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    real = DatasetWriter.add_shard
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second shard of the import fails mid-way
            raise RuntimeError("disk full (simulated)")
        return real(self, *a, **k)

    monkeypatch.setattr(DatasetWriter, "add_shard", flaky)
    assert _run("--latents", lp, "--actions", ap, "--phase", "B", "--append", "--out", out) == 2
    assert len(calls) == 2
    after = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert after == before  # no stray shard or temp file, manifest untouched
    verify_dataset(out)
    assert len(ClipDataset(out)) == 20
