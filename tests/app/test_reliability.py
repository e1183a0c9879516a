"""Issue 21: values that overflow the stored dtype are refused (nothing written), output paths that can never be
written are refused before any work, `adapt` refuses a checkpoint built for other data, corrupt shards are
refused on every read path, non-finite clip scores are named and left out of the means, and a full disk or
weights that do not fit their config give one line. Real files, the real
CLI (`hope_kernels.cli.main`, one subprocess); every error is one line on stderr with exit code 2."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from hope_kernels.cli import main
from hope_kernels.data.format import DatasetWriter, read_manifest
from hope_kernels.data.importers import import_arrays

pytestmark = pytest.mark.usefixtures("one_thread")

n, T, H, W, D, A = 4, 4, 2, 2, 8, 2


def _arrays(seed=0, scale=1.0, big_clip=None):
    """(latents (n, T, H, W, D), actions (n, T, A)) float32, one impulse per clip; clip `big_clip` x 1e6."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, T, H, W, D, generator=g) * scale
    if big_clip is not None:
        lat[big_clip] *= 1e6
    act = torch.zeros(n, T, A)
    act[:, 0] = torch.randn(n, A, generator=g)
    return lat, act


def _files(tmp_path, lat, act, tag="x"):
    lp, ap = tmp_path / f"lat_{tag}.npy", tmp_path / f"act_{tag}.npy"
    np.save(lp, lat.numpy())
    np.save(ap, act.numpy())
    return lp, ap


def _import(*argv):
    return main(["import", *map(str, argv)])


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return err


def q(path) -> str:
    """A path as the errors quote it."""
    return repr(str(path))


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _dataset(path, latent_dtype="float32"):
    """A1, B, A2 with n clips each (auto splits: 2 train, 1 stream, 1 heldout), grid (T, H, W), D, A."""
    for k, phase in enumerate(("A1", "B", "A2")):
        lat, act = _arrays(seed=k)
        import_arrays(path, lat, act, phase, append=k > 0, latent_dtype=latent_dtype)
    return path


def _checkpoint(path, grid=(T, H, W), enc_dim=D, action_dim=A):
    """An untrained tiny AC predictor saved as shipped weights (what `adapt --checkpoint` loads)."""
    from hope_kernels.models import build_predictor
    from hope_kernels.pretrained import save_weights

    model = build_predictor("ac", "tiny", enc_dim=enc_dim, grid=grid, action_dim=action_dim)
    return save_weights(path, model, {}, torch.float32)


# ------------------------------------------------------------------------------------ 1. overflow at the cast
def test_import_refuses_latents_that_overflow_float16(tmp_path, capsys):
    lp, ap = _files(tmp_path, *_arrays(big_clip=2))
    out = tmp_path / "ds"
    assert _import("--latents", lp, "--actions", ap, "--phase", "A1", "--out", out, "--latent-dtype", "float16") == 2
    err = _err(capsys)
    assert "overflow the stored dtype float16 (first in clip 2 of 4, phase A1)" in err
    assert "largest finite float16 is 65504" in err and str(lp) in err and "--latent-dtype float32" in err
    assert not out.exists()  # nothing written
    # as float32 the same values fit
    assert _import("--latents", lp, "--actions", ap, "--phase", "A1", "--out", out, "--latent-dtype", "float32") == 0


def test_refused_append_leaves_the_dataset_byte_identical(tmp_path, capsys):
    out = tmp_path / "ds"
    lp, ap = _files(tmp_path, *_arrays(), tag="ok")
    assert _import("--latents", lp, "--actions", ap, "--phase", "A1", "--out", out, "--latent-dtype", "float16") == 0
    capsys.readouterr()
    before = _snapshot(out)
    lp2, ap2 = _files(tmp_path, *_arrays(seed=1, big_clip=3), tag="big")  # float32 x 1e6 into float16
    assert _import("--latents", lp2, "--actions", ap2, "--phase", "B", "--out", out, "--append") == 2
    err = _err(capsys)
    assert "overflow the stored dtype float16 (first in clip 3 of 4, phase B)" in err and "65504" in err
    assert f"{out} stores float16" in err
    assert _snapshot(out) == before  # shards and manifest untouched, no new file


@pytest.mark.parametrize("role", ["actions", "states"])
def test_float64_actions_or_states_that_overflow_float32(tmp_path, capsys, role):
    lat, act = _arrays()
    st = torch.zeros(n, T, 3, dtype=torch.float64)
    big = act.double() if role == "actions" else st
    big[1, 0, 0] = 1e300  # finite in float64, inf in float32
    lp, ap = _files(tmp_path, lat, act.double() if role == "states" else big)
    sp = tmp_path / "st.npy"
    np.save(sp, st.numpy())
    out = tmp_path / "ds"
    assert _import("--latents", lp, "--actions", ap, "--states", sp, "--phase", "A2", "--out", out) == 2
    err = _err(capsys)
    assert f"{role} in" in err and "overflow the stored dtype float32 (first in clip 1 of 4, phase A2)" in err
    assert "3.40282e+38" in err and not out.exists()


def test_dataset_writer_refuses_a_shard_that_overflows_its_dtype(tmp_path):
    lat, act = _arrays(big_clip=1)
    with pytest.raises(
        ValueError,
        match=r"latents of row 1 of a A1/train shard are NaN or Inf as stored in "
        r"float16 \(largest finite float16: 65504\)",
    ):
        with DatasetWriter(tmp_path / "ds", grid=(T, H, W), enc_dim=D, action_dim=A, latent_dtype="float16") as w:
            w.add_shard(lat.reshape(n, T, H * W, D), act, "A1", "train")
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------------ 2. output paths up front
@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a folder\n")
    return f


def _never_called(*a, **k):
    raise AssertionError("the work started before the output path was checked")


@pytest.mark.parametrize("parent_is_file", [False, True])
def test_import_out_that_is_a_file(tmp_path, capsys, monkeypatch, a_file, parent_is_file):
    lp, ap = _files(tmp_path, *_arrays())
    out = a_file / "ds" if parent_is_file else a_file
    monkeypatch.setattr("hope_kernels.data.importers.import_files", _never_called)
    assert _import("--latents", lp, "--actions", ap, "--phase", "A1", "--out", out) == 2
    err = _err(capsys)
    assert "Errno" not in err
    if parent_is_file:
        assert f"--out {q(out)} cannot be created: {q(a_file)} is a file, not a folder" in err
    else:
        assert f"--out {q(out)} is a file, not a folder" in err
    assert a_file.read_text() == "not a folder\n"


def test_import_out_that_is_a_file_in_a_real_process(tmp_path, a_file):
    lp, ap = _files(tmp_path, *_arrays())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hope_kernels.cli",
            "import",
            "--latents",
            str(lp),
            "--actions",
            str(ap),
            "--phase",
            "A1",
            "--out",
            str(a_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"hope-kernels import: error: --out {q(a_file)} is a file, not a folder\n"


@pytest.mark.parametrize("parent_is_file", [False, True])
def test_simulate_out_that_is_a_file(capsys, monkeypatch, a_file, parent_is_file):
    out = a_file / "data" if parent_is_file else a_file
    monkeypatch.setattr("hope_kernels.data.simulate.simulate_dataset", _never_called)
    assert main(["simulate", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 2
    err = _err(capsys)
    assert "Errno" not in err and str(out) in err
    assert ("cannot be created" if parent_is_file else "is a file, not a folder") in err


def test_train_out_under_a_file(tmp_path, capsys, monkeypatch, a_file):
    data = _dataset(tmp_path / "data")
    monkeypatch.setattr("hope_kernels.train.train", _never_called)
    assert main(["train", "--model", "ac", "--data", str(data), "--out", str(a_file / "run"), "--steps", "1"]) == 2
    assert f"out {q(a_file / 'run')} cannot be created: {q(a_file)} is a file, not a folder" in _err(capsys)


def test_aba_out_under_a_file(capsys, monkeypatch, a_file):
    monkeypatch.setattr("hope_kernels.aba.run_aba", _never_called)
    assert main(["aba", "--out", str(a_file / "aba"), "--no-progress"]) == 2
    assert f"--out {q(a_file / 'aba')} cannot be created: {q(a_file)} is a file, not a folder" in _err(capsys)


@pytest.mark.parametrize("bad", ["folder", "parent_is_file"])
def test_adapt_log_path_is_checked_before_the_stream(tmp_path, capsys, monkeypatch, a_file, bad):
    data = _dataset(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "m.safetensors")
    log = tmp_path if bad == "folder" else a_file / "log.json"
    monkeypatch.setattr("hope_kernels.adapt.adapt_stream", _never_called)
    assert main(["adapt", "--checkpoint", str(ckpt), "--data", str(data), "--no-progress", "--log", str(log)]) == 2
    err = _err(capsys)
    assert "Errno" not in err and "Is a directory" not in err
    if bad == "folder":
        assert f"--log {q(log)} is a folder, expected a file path" in err
    else:
        assert f"--log {q(log)} cannot be created: {q(a_file)} is a file, not a folder" in err


# ------------------------------------------------------------------------------------ 3. model vs data
@pytest.mark.parametrize(
    "model,expect",
    [
        (dict(grid=(T, 1, H * W)), f"its grid (T, H, W) is ({T}, 1, {H * W}), the data's ({T}, {H}, {W})"),  # same N
        (dict(enc_dim=2 * D), f"its enc_dim (latent D) is {2 * D}, the data's {D}"),
        (dict(action_dim=A + 1), f"its action_dim is {A + 1}, the data's {A}"),
    ],
)
def test_adapt_refuses_a_checkpoint_built_for_other_data(tmp_path, capsys, model, expect):
    data = _dataset(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "m.safetensors", **model)
    assert main(["adapt", "--checkpoint", str(ckpt), "--data", str(data), "--no-progress"]) == 2
    err = _err(capsys)
    assert f"hope-kernels adapt: error: checkpoint {ckpt} does not fit dataset {data}: {expect}" in err


def test_adapt_runs_a_checkpoint_that_fits(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "m.safetensors")
    log = tmp_path / "logs" / "log.json"
    assert (
        main(
            [
                "adapt",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(data),
                "--strategy",
                "none",
                "--no-progress",
                "--log",
                str(log),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("tf {") and log.is_file()


def test_check_model_matches_data_names_every_difference(tmp_path):
    from hope_kernels.config import predictor_config
    from hope_kernels.data.compat import check_model_matches_data

    manifest = read_manifest(_dataset(tmp_path / "data"))
    cfg = predictor_config("ac", "tiny", enc_dim=D, grid=(T, H, W), action_dim=A)
    check_model_matches_data(cfg, manifest)  # fits: no error
    check_model_matches_data(cfg.to_dict(), manifest)
    bad = predictor_config("ac", "tiny", enc_dim=D + 1, grid=(T + 1, H, W), action_dim=A, state_dim=3)
    with pytest.raises(ValueError) as e:
        check_model_matches_data(bad, manifest, "model m", "data d")
    assert str(e.value) == (
        f"model m does not fit data d: its grid (T, H, W) is ({T + 1}, {H}, {W}), the data's "
        f"({T}, {H}, {W}); its enc_dim (latent D) is {D + 1}, the data's {D}; its state_dim is "
        f"3, the data's 0"
    )


def test_check_model_matches_data_a_stateless_model_ignores_states():
    from hope_kernels.config import predictor_config
    from hope_kernels.data.compat import check_model_matches_data

    data = {"grid": [T, H, W], "enc_dim": D, "action_dim": A, "state_dim": 4}
    check_model_matches_data(predictor_config("ac", "tiny", enc_dim=D, grid=(T, H, W), action_dim=A), data)
    with pytest.raises(ValueError, match="its state_dim is 2, the data's 4"):
        check_model_matches_data(
            predictor_config("ac", "tiny", enc_dim=D, grid=(T, H, W), action_dim=A, state_dim=2), data
        )


# ------------------------------------------------------------------------------------ 4. corrupt shards on read
def _flip_low_bits(shard):
    """Flip the lowest mantissa bit of every float32 latent in place: same size, a valid header, finite values."""
    import json

    b = bytearray(shard.read_bytes())
    head = int.from_bytes(b[:8], "little")
    lo, hi = json.loads(b[8 : 8 + head])["latents"]["data_offsets"]
    for i in range(8 + head + lo, 8 + head + hi, 4):
        b[i] ^= 1
    shard.write_bytes(bytes(b))


def _corrupt_a1_train(data):
    shard = data / next(
        s["file"] for s in read_manifest(data)["shards"] if s["phase"] == "A1" and s["split"] == "train"
    )
    _flip_low_bits(shard)
    return shard


def test_a_corrupt_shard_is_refused_by_train_adapt_and_the_api(tmp_path, capsys):
    from hope_kernels.data import ClipDataset, make_stream
    from hope_kernels.data import format as fmt

    data = _dataset(tmp_path / "data")
    assert float(ClipDataset(data, phase="A1")[0]["latents"].abs().sum()) > 0  # read once intact: cached
    assert (data / fmt.VERIFIED).is_file()
    shard = _corrupt_a1_train(data)
    fmt._MATCHED.clear()  # a new process
    line = (
        f"corrupt shard {shard}: its sha256 differs from the one its manifest records "
        f"(run `hope-kernels verify {data}`)"
    )
    for read in (lambda: ClipDataset(data, phase="A1", split="train"), lambda: make_stream(data)):
        with pytest.raises(ValueError) as e:
            read()
        assert str(e.value) == line
    assert len(ClipDataset(data, phase="B")) == n  # the other shards still read
    assert (
        main(
            [
                "train",
                "--model",
                "ac",
                "--preset",
                "tiny",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "t"),
                "--steps",
                "1",
                "--batch-size",
                "2",
            ]
        )
        == 2
    )
    assert f"hope-kernels train: error: {line}\n" == _err(capsys)
    ckpt = _checkpoint(tmp_path / "m.safetensors")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hope_kernels.cli",
            "adapt",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(data),
            "--no-progress",
            "--strategy",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"hope-kernels adapt: error: {line}\n")


def test_a_shard_is_hashed_once_per_version(tmp_path, monkeypatch):
    from hope_kernels.data import ClipDataset
    from hope_kernels.data import format as fmt

    data = _dataset(tmp_path / "data")
    hashed = []
    real = fmt.sha256_file
    monkeypatch.setattr(fmt, "sha256_file", lambda f: hashed.append(f.name) or real(f))
    list(ClipDataset(data))
    first = sorted(hashed)
    assert first == sorted(s["file"] for s in read_manifest(data)["shards"])
    fmt._MATCHED.clear()
    list(ClipDataset(data))  # another process: the cache beside the manifest answers
    assert sorted(hashed) == first
    shard = data / first[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # touched: checked again
    fmt._MATCHED.clear()
    list(ClipDataset(data))
    assert sorted(hashed) == sorted(first + [first[0]])
    (data / fmt.VERIFIED).write_text("{not json")  # a broken cache is rebuilt, not an error
    fmt._MATCHED.clear()
    assert len(list(ClipDataset(data))) == 3 * n


def test_values_read_are_checked_even_when_the_manifest_agrees(tmp_path):
    """A shard rewritten with NaN and its manifest entry updated to match: the read names the row."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from hope_kernels.data import ClipDataset
    from hope_kernels.data.format import MANIFEST

    data = _dataset(tmp_path / "data")
    m = read_manifest(data)
    k = next(i for i, s in enumerate(m["shards"]) if s["phase"] == "B")
    shard = data / m["shards"][k]["file"]
    t = load_file(str(shard))
    t["latents"][0, 1, 0, 0] = float("nan")
    save_file(t, str(shard))
    m["shards"][k].update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (data / MANIFEST).write_text(json.dumps(m))
    row0 = next(g for g, c in enumerate(m["clips"]) if c["shard"] == k and c["row"] == 0)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"corrupt shard {shard}: latents of row 0 (clip {row0}) hold NaN or Inf (run `hope-kernels verify {data}`)"
        ),
    ):
        list(ClipDataset(data, phase="B"))


# ------------------------------------------------------------------------------------ 5. non-finite clip scores
def test_a_clip_that_scores_nan_is_named_and_left_out_of_the_means(tmp_path, capsys):
    """A finite B clip x 1e20 overflows inside the model (its LayerNorm variance): the clip is named, the
    phase means stay finite and count it out."""
    import json

    from hope_kernels.adapt import StreamLog

    data = tmp_path / "data"
    for k, phase in enumerate(("A1", "B", "A2")):
        lat, act = _arrays(seed=k, big_clip=1 if phase == "B" else None)
        if phase == "B":
            lat[1] *= 1e14  # with _arrays' 1e6: 1e20, finite in float32
        import_arrays(data, lat[:2], act[:2], phase, split="stream", append=k > 0)
        import_arrays(data, lat[2:], act[2:], phase, split="heldout", append=True)
    big = next(
        g
        for g, c in enumerate(read_manifest(data)["clips"])
        if c["phase"] == "B" and c["split"] == "stream" and c["row"] == 1
    )
    ckpt = _checkpoint(tmp_path / "m.safetensors")
    log = tmp_path / "log.json"
    assert (
        main(
            [
                "adapt",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(data),
                "--strategy",
                "layernorm",
                "--no-progress",
                "--log",
                str(log),
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert re.fullmatch(
        rf"hope-kernels adapt: warning: clip {big} \(phase B, stream position \d\) scored "
        rf"teacher-forcing .*: left out of the phase means\n",
        err,
    ), err
    means = json.loads(out.splitlines()[0].removeprefix("tf "))
    assert set(means) == {"A1", "B", "A2"} and all(v == v and abs(v) < 1e3 for v in means.values()), out
    assert f"left out of the means (score NaN or Inf): B clips [{big}] (1 of 2)" in out
    saved = StreamLog.from_dict(json.loads(log.read_text()))  # strict JSON (null), read back as NaN
    assert [b["clip"] for b in saved.nonfinite] == [big]
    from hope_kernels.metrics import run_metrics

    m = run_metrics(saved)
    assert m["nonfinite"] == 1.0 and all(m[p] == m[p] for p in ("A1", "B", "A2", "forgetting"))


def test_metrics_leave_non_finite_scores_out():
    from hope_kernels.metrics import mean_ci, nonfinite_counts, phase_means, stability_gap

    errors, phases = [1.0, 3.0, float("nan"), 2.0, float("inf")], ["A1", "A1", "B", "B", "B"]
    assert phase_means(errors, phases) == {"A1": 2.0, "B": 2.0}
    assert nonfinite_counts(errors, phases) == {"A1": 0, "B": 2}
    assert stability_gap(errors, phases, window=2)["A1->B"] == {"peak": 2.0, "gap": 0.0}
    assert mean_ci([1.0, float("inf"), 3.0])["mean"] == 2.0
    with pytest.raises(ValueError, match="none of the 2 clip scores of phase 'B' is finite"):
        phase_means([1.0, float("nan"), float("nan")], ["A1", "B", "B"])


def test_results_md_counts_the_left_out_clips():
    from hope_kernels.report import _left_out

    per_seed = {"hope": {0: {"nonfinite": 0.0}, 1: {"nonfinite": 2.0}}, "ac+none": {0: {"nonfinite": 0.0}}}
    assert _left_out({"per_seed": {"tf": per_seed}}) == "hope (2 clips; seeds 1)"
    assert _left_out({"per_seed": {"tf": {"hope": {0: {"nonfinite": 0.0}}}}}) == ""


# ------------------------------------------------------------------------------------ 6. one-line errors
def test_a_checkpoint_whose_metadata_does_not_fit_its_weights(tmp_path, capsys):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    data = _dataset(tmp_path / "data")
    assert (
        main(
            [
                "train",
                "--model",
                "ac",
                "--preset",
                "tiny",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "t"),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    ckpt = tmp_path / "t" / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    pc = json.loads(meta["predictor_config"])
    pc["width"] *= 2
    save_file(tensors, str(ckpt), metadata={**meta, "predictor_config": json.dumps(pc)})
    capsys.readouterr()
    assert main(["adapt", "--checkpoint", str(ckpt), "--data", str(data), "--no-progress"]) == 2
    err = _err(capsys)
    shape = r"\(\d+(, \d+)*\)"
    assert re.fullmatch(
        rf"hope-kernels adapt: error: checkpoint {re.escape(repr(str(ckpt)))}: its weights do not "
        rf"fit its own predictor config: tensors \d+ of another shape \(first '[\w.]+': {shape} "
        rf"stored, {shape} for the config\)\n",
        err,
    ), err


@pytest.fixture
def small_fs(tmp_path):
    """A real, nearly full filesystem: a tmpfs of `size` bytes mounted for the test (root only: skip otherwise)."""
    mounted = []

    def mount(size: int):
        mnt = tmp_path / f"small{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip() or r.returncode}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, small_fs, capsys):
    """The second checkpoint does not fit beside the first: one line naming the file and --resume, the first
    checkpoint intact, no temp file left."""
    from hope_kernels.train import load_checkpoint

    data = _dataset(tmp_path / "data")
    (tmp_path / "every_step.json").write_text('{"ckpt_every": 1}')
    train = [
        "train",
        "--model",
        "ac",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--config",
        str(tmp_path / "every_step.json"),
        "--no-progress",
    ]
    assert main([*train, "--out", str(tmp_path / "probe")]) == 0
    size = (tmp_path / "probe" / "checkpoint.safetensors").stat().st_size
    out = small_fs(int(size * 1.5) + 64 * 1024) / "run"  # room for one checkpoint and the logs, not two
    capsys.readouterr()
    assert main([*train, "--out", str(out)]) == 2
    ckpt = out / "checkpoint.safetensors"
    assert _err(capsys) == (
        f"hope-kernels train: error: no space left on the device while writing {str(ckpt)!r} "
        f"(its previous version is intact); free some space, then: the last checkpoint in --out "
        f"is intact: run the same command with --resume to continue\n"
    )
    assert load_checkpoint(ckpt)[1]["step"] == 1
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    tiny = small_fs(size // 2) / "run"  # not even the first checkpoint fits: nothing to resume
    assert main([*train, "--out", str(tiny)]) == 2
    assert _err(capsys) == (
        f"hope-kernels train: error: no space left on the device while writing "
        f"{str(tiny / 'checkpoint.safetensors')!r} (nothing was written); free some space, then: "
        f"run the same command again\n"
    )
    assert not [p for p in os.listdir(tiny) if p.endswith(".tmp")]
