"""`hope-kernels` command line: `main` here, one module per subcommand in this package (`import` lives in
import_data.py, a keyword otherwise), argument helpers they share in _common.py. The modules keep their heavy
imports inside `run`, so a missing optional dependency only affects its own command.

Every subcommand module exposes `add_arguments(parser)` and `run(args) -> int` (exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "backends": ("hope_kernels.cli.backends", "list the available op backends"),
    "simulate": ("hope_kernels.cli.simulate", "simulate the embedded A1/B/A2 physics dataset"),
    "import": ("hope_kernels.cli.import_data", "import your own latents + actions as one phase of a dataset"),
    "verify": ("hope_kernels.cli.verify", "check a dataset's shards against its manifest"),
    "encode": ("hope_kernels.cli.encode", "encode frames with the embedded or a local V-JEPA 2 encoder"),
    "aba": ("hope_kernels.cli.aba", "the A-B-A job: data, pre-training, every TTA strategy, results.json/md/png"),
    "train": ("hope_kernels.cli.train", "train an AC or HOPE predictor"),
    "pretrain": ("hope_kernels.cli.pretrain", "regenerate the pre-trained predictors an A-B-A preset ships with"),
    "adapt": ("hope_kernels.cli.adapt", "adapt one checkpoint over a dataset's A1 -> B -> A2 stream with one strategy"),
    "bench": ("hope_kernels.cli.bench", "run the benchmark suites (eager, torch.compile, fast paths side by side)"),
}
DESCRIPTION = (
    "hope-kernels: training and test-time adaptation of world models in V-JEPA 2 latent space, on custom kernels"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hope-kernels", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # a warning is one line too (restored on exit)
            warnings.showwarning = lambda message, *_, **__: print(
                f"hope-kernels {args.command}: warning: {message}", file=sys.stderr
            )
            return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # OSError: FileNotFoundError, NotADirectoryError, ...
        # one line naming the problem, non-zero exit; tracebacks only with HOPE_KERNELS_DEBUG=1
        import os

        if os.environ.get("HOPE_KERNELS_DEBUG") == "1":
            raise
        from hope_kernels.io import DiskFullError, is_disk_full

        msg = str(e)
        if is_disk_full(e):
            if not isinstance(e, DiskFullError):  # a write outside atomic_write (a log line): name the file
                name = getattr(e, "filename", None)
                msg = "no space left on the device" + (f" while writing {name!r}" if name else "")
            hint = _resume_hint(args) if getattr(e, "kept", True) else "run the same command again"
            msg += f"; free some space, then: {hint}"
        print(f"hope-kernels {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hope-kernels {args.command}: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130


# what an interrupted command kept and how to go on (every file it writes is replaced atomically)
RESUME_HINTS = {
    "train": "the last checkpoint in --out is intact: run the same command with --resume to continue",
    "aba": "finished runs are kept: run the same command again to continue",
    "pretrain": "each model's checkpoints are kept in --work: run the same command again to continue",
    "simulate": "nothing was kept: run the same command again",
    "import": "the dataset is as it was before: run the same command again",
    "adapt": "no log was written: run the same command again",
}


def _resume_hint(args) -> str:
    """RESUME_HINTS for the command; a train stopped before its first checkpoint has nothing to resume."""
    if args.command == "train" and getattr(args, "out", None):
        from pathlib import Path

        if not (Path(args.out) / "checkpoint.safetensors").is_file():
            return "no checkpoint was written yet: run the same command again"
    return RESUME_HINTS.get(args.command, "run the same command again")
