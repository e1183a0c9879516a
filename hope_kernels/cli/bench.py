"""`hope-kernels bench`: the pytest-benchmark suites of a source checkout (benchmarks/test_bench_<suite>.py),
eager, torch.compile and each fast path side by side, with the summary table of ratios and then the open
issues' speed targets this run measured (benchmarks/targets.py) at the end."""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"  # hope_kernels/cli/bench.py -> the checkout


def suites() -> list[str]:
    return sorted(p.stem[len("test_bench_") :] for p in BENCH_DIR.glob("test_bench_*.py"))


def add_arguments(p) -> None:
    p.add_argument("suites", nargs="*", help=f"suites to run (default: all of {', '.join(suites()) or 'none'})")
    p.add_argument(
        "--json", default=None, help="also write the table's rows as JSON here (a file of an earlier run is extended)"
    )


def run(args) -> int:
    import os
    import subprocess
    import sys
    import tempfile

    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(
            f"bench runs the suites of a source checkout; {BENCH_DIR} does not exist "
            "(install with `pip install --no-build-isolation -e .` from a clone)"
        )
    known = suites()
    unknown = sorted(set(args.suites) - set(known))
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; known: {known}")
    files = [str(BENCH_DIR / f"test_bench_{s}.py") for s in (args.suites or known)]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        rows = os.path.abspath(args.json) if args.json else os.path.join(tmp, "rows.json")
        env["HOPE_BENCH_JSON"] = rows
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *files,
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            "--benchmark-columns=median,rounds",
        ]
        rc = subprocess.call(cmd, cwd=BENCH_DIR.parent, env=env)
        if os.path.exists(rows):
            print(_targets_table(rows))
    return rc


def _targets_table(rows_path: str) -> str:
    """benchmarks/targets.py's table for these rows (that file belongs to the checkout, not the package)."""
    import runpy

    targets = runpy.run_path(str(BENCH_DIR / "targets.py"))
    lines = targets["markdown"](targets["load_rows"](rows_path))
    return "\n".join(lines) if lines else "(no row of this run belongs to an open issue's target)"
