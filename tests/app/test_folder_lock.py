"""Issue 21, items 3, 4 and 8: one writer per output folder (a real second process holds the lock; a SIGKILLed
holder's lock is taken over), what a killed writer left is removed by the next run, and a copied A-B-A folder
uses its own checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from hope_kernels.cli import main
from hope_kernels.data.format import MANIFEST, ClipDataset, DatasetWriter
from hope_kernels.io import LOCK_FILE, FolderInUseError, FolderLock

pytestmark = pytest.mark.usefixtures("one_thread")

_HOLD = (
    "import sys, time\n"
    "from hope_kernels.io import FolderLock\n"
    "FolderLock(sys.argv[1], 'test').acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def holder(tmp_path):
    """A real second process that holds the lock of tmp_path / "out" until the test ends (SIGKILL)."""
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_second_process_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, holder):
    out = tmp_path / "out"
    with pytest.raises(FolderInUseError, match=rf"aba --out '{out}' is in use by process {holder.pid} "):
        FolderLock(out, "aba --out").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)  # the dead holder's file is still there
    with FolderLock(out, "aba --out"):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with FolderLock(out, "aba --out"):  # re-entrant within a process
            pass
        assert (out / LOCK_FILE).is_file()
    assert not (out / LOCK_FILE).exists()  # released: nothing left behind


@pytest.mark.parametrize("entry", ["train", "aba", "simulate", "import"])
def test_every_writer_refuses_a_folder_another_process_holds(tmp_path, holder, entry, capsys):
    out = tmp_path / "out"
    if entry == "train":
        from hope_kernels.data import simulate_dataset

        data = simulate_dataset(
            tmp_path / "d", "tiny", 0, train_a1=2, train_b=1, train_a2=1, stream=1, heldout=1, progress=False
        )
        argv = ["train", "--model", "ac", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "1"]
    elif entry == "aba":
        argv = ["aba", "--preset", "quick", "--out", str(out), "--no-progress"]
    elif entry == "simulate":
        argv = ["simulate", "--preset", "tiny", "--out", str(out)]
    else:
        import numpy as np

        np.save(tmp_path / "lat.npy", np.zeros((2, 2, 2, 2, 4), np.float32))
        np.save(tmp_path / "act.npy", np.zeros((2, 2, 2), np.float32))
        argv = [
            "import",
            "--latents",
            str(tmp_path / "lat.npy"),
            "--actions",
            str(tmp_path / "act.npy"),
            "--phase",
            "A1",
            "--out",
            str(out),
        ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is in use by process {holder.pid}" in err[0], err
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written by the refused process


_KILLED_WRITER = (
    "import os, signal, sys, tempfile, torch\n"
    "from hope_kernels.data.format import DatasetWriter\n"
    "w = DatasetWriter(sys.argv[1], grid=(2, 2, 2), enc_dim=3, action_dim=2, latent_dtype='float32')\n"
    "w.add_shard(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 2), 'A1', 'train')\n"
    "tempfile.mkstemp(prefix='.A1-train-0001.safetensors.', suffix='.tmp', dir=sys.argv[1])\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)


def test_a_killed_writers_leftovers_are_removed_by_the_next_writer(tmp_path):
    d = tmp_path / "data"
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(d)])
    assert p.returncode == -signal.SIGKILL
    left = sorted(os.listdir(d))  # the temp file, the dead writer's lock and its unlisted shard
    assert left[0].startswith(".A1-train-0001.safetensors.") and left[0].endswith(".tmp")
    assert left[1:] == [LOCK_FILE, "A1-train-0000.safetensors"]
    (d / "notes.safetensors").write_bytes(b"not a shard name: kept")
    with DatasetWriter(d, grid=(2, 2, 2), enc_dim=3, action_dim=2, latent_dtype="float32") as w:
        w.add_shard(torch.ones(2, 2, 4, 3), torch.zeros(2, 2, 2), "A1", "train")
    assert sorted(os.listdir(d)) == ["A1-train-0000.safetensors", MANIFEST, "notes.safetensors"]
    assert len(ClipDataset(d)) == 2 and float(ClipDataset(d)[0]["latents"].sum()) == 24.0


def test_train_removes_the_temp_checkpoint_a_kill_left(tmp_path):
    from hope_kernels.data import simulate_dataset
    from hope_kernels.train import train

    data = simulate_dataset(
        tmp_path / "d", "tiny", 0, train_a1=4, train_b=1, train_a2=1, stream=1, heldout=1, progress=False
    )
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 1024)
    train(
        {
            "model": "ac",
            "preset": "tiny",
            "data": str(data),
            "out": str(out),
            "steps": 1,
            "batch_size": 2,
            "progress": False,
            "phases": ["A1"],
        }
    )
    assert not stale.exists() and (out / "checkpoint.safetensors").is_file() and not (out / LOCK_FILE).exists()


def test_a_copied_aba_folder_uses_its_own_checkpoints(tmp_path):
    from test_aba import tiny_config

    from helpers.aba_standins import StandInHooks
    from hope_kernels.aba import run_aba

    class Recording(StandInHooks):
        def load_checkpoint(self, path):
            self.loaded = getattr(self, "loaded", []) + [str(path)]
            return super().load_checkpoint(path)

    cfg = tiny_config()
    cfg["runs"], cfg["seeds"] = cfg["runs"][1:3], [0]
    run_aba(cfg, hooks=StandInHooks(), out=tmp_path / "a", progress=False)
    (marker,) = (tmp_path / "a" / "checkpoints").glob("*.json")
    ckpt = json.loads(marker.read_text())["checkpoint"]
    assert not os.path.isabs(ckpt) and (marker.parent / ckpt).is_file()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")  # the original is gone
    shutil.rmtree(tmp_path / "b" / "runs")  # the copy has to load its model again
    hooks = Recording()
    run_aba(cfg, hooks=hooks, out=tmp_path / "b", progress=False)
    assert hooks.calls["train"] == 0 and hooks.loaded == [str(tmp_path / "b" / "checkpoints" / ckpt)]


def test_ctrl_c_gives_one_line_with_the_way_out(monkeypatch, capsys):
    from hope_kernels.cli import train as cli_train

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "run", interrupted)
    assert main(["train", "--model", "ac"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "hope-kernels train: interrupted; the last checkpoint in --out is intact: run the same command "
        "with --resume to continue"
    ]


def test_ctrl_c_of_a_real_train_before_its_first_checkpoint(tmp_path):
    """SIGINT to a real `train` once it holds its folder: one line, exit 130, and no --resume advice, since
    there is no checkpoint yet."""
    import time

    from hope_kernels.data import simulate_dataset

    data = simulate_dataset(
        tmp_path / "d", "tiny", 0, train_a1=2, train_b=1, train_a2=1, stream=1, heldout=1, progress=False
    )
    out = tmp_path / "out"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hope_kernels.cli",
            "train",
            "--model",
            "ac",
            "--preset",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "100000",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / LOCK_FILE).exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert err == "hope-kernels train: interrupted; no checkpoint was written yet: run the same command again\n"
    assert not (out / LOCK_FILE).exists()
