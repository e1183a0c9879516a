"""The `hope-kernels` command line: the subcommands of docs/design.md#interfaces, `adapt` end to end on tiny data,
`bench`'s suite selection, one-line errors."""

import json

import pytest

from hope_kernels import cli
from hope_kernels.cli import bench as cli_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_design_subcommand_is_there(capsys):
    for name in ("simulate", "import", "encode", "train", "adapt", "aba", "bench"):
        assert name in cli.SUBCOMMANDS
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert cli.DESCRIPTION in " ".join(capsys.readouterr().out.split())


def test_adapt_end_to_end(tmp_path, capsys):
    from hope_kernels.data import ensure_dataset
    from hope_kernels.train import train

    data = ensure_dataset(tmp_path / "data", preset="tiny", seed=0)
    ckpt = train(
        {
            "model": "ac",
            "preset": "tiny",
            "data": str(data),
            "phases": ["A1"],
            "split": "train",
            "steps": 2,
            "batch_size": 2,
            "out": str(tmp_path / "model"),
            "progress": False,
        }
    ).checkpoint
    log = tmp_path / "log.json"
    assert (
        cli.main(
            [
                "adapt",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(data),
                "--clips-per-phase",
                "1",
                "--strategy",
                "layernorm",
                "--no-progress",
                "--log",
                str(log),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("tf {") and set(json.loads(out.splitlines()[0][3:])) == {"A1", "B", "A2"}
    assert json.loads(log.read_text())["strategy"] == "layernorm"
    assert cli.main(["adapt", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # shipped weights (hope_kernels/assets/pretrained) adapt the same way
    import torch

    from hope_kernels.pretrained import save_weights
    from hope_kernels.train import load_checkpoint

    save_weights(tmp_path / "shipped.safetensors", load_checkpoint(ckpt)[0], {}, torch.float16)
    assert (
        cli.main(
            [
                "adapt",
                "--checkpoint",
                str(tmp_path / "shipped.safetensors"),
                "--data",
                str(data),
                "--clips-per-phase",
                "1",
                "--strategy",
                "none",
                "--no-progress",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("tf {")


def test_bench_runs_the_chosen_suites(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd, cwd, env: calls.append((cmd, env)) or 0)
    assert cli.main(["bench", "l1_loss", "dgd", "--json", str(tmp_path / "rows.json")]) == 0
    cmd, env = calls[0]
    assert [c.rsplit("/", 1)[-1] for c in cmd if c.endswith(".py")] == ["test_bench_l1_loss.py", "test_bench_dgd.py"]
    assert "--benchmark-only" in cmd and env["HOPE_BENCH_JSON"] == str(tmp_path / "rows.json")
    assert cli.main(["bench"]) == 0 and len([c for c in calls[1][0] if c.endswith(".py")]) == len(cli_bench.suites())
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark suite(s) ['nope']" in capsys.readouterr().err


def test_bench_ends_with_the_targets_its_rows_measured(monkeypatch, capsys):
    """Without --json the rows go to a temporary file, and the targets table (benchmarks/targets.py) follows."""
    g = "l1 fwd+bwd (4, 8, 256, 1024) float32"
    rows = [dict(group=g, backend="eager", device="cpu", ms=3.1), dict(group=g, backend="cpu", device="cpu", ms=1.0)]

    def fake_run(cmd, cwd, env):
        with open(env["HOPE_BENCH_JSON"], "w") as f:
            json.dump(rows, f)
        return 0

    monkeypatch.setattr("subprocess.call", fake_run)
    assert cli.main(["bench", "l1_loss"]) == 0
    assert "| 3 | L1 fwd+bwd float32, CPU | cpu | eager | 3.10x | >= 2.00x | met |" in capsys.readouterr().out
