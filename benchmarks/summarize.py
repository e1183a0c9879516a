"""Turn the benchmark rows (JSON written by benchmarks/conftest.py) into a dated Markdown table.

python benchmarks/summarize.py rows.json out.md --title "..."
"""

from __future__ import annotations

import argparse
import json
import os

from targets import load_rows
from targets import markdown as targets_markdown

from hope_kernels.io import atomic_write_bytes


def fmt(v, spec):
    return spec % v if v is not None else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows")
    ap.add_argument("out")
    ap.add_argument("--title", default="hope-kernels benchmarks")
    ap.add_argument("--preamble", default="")
    ap.add_argument("--extra", nargs="*", default=[], help="pytest-benchmark JSON files (one table each)")
    a = ap.parse_args()
    rows = load_rows(a.rows) if os.path.exists(a.rows) else []  # none yet: the first suite was cut short
    lines = [
        f"# {a.title}",
        "",
        a.preamble,
        "",
        "Speed-up = eager ms / ms (the eager chunked form for the memory ops), in the same run on the same "
        "device. GB/s counts each input read once and each output written once; the copy row is the device's "
        "measured ceiling.",
        "",
        "| group | backend | ms | speed-up | GB/s | TFLOP/s | peak MiB | % copy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['backend']} | {r['ms']:.4f} | {fmt(r.get('speedup_vs_eager'), '%.2fx')} | "
            f"{fmt(r.get('gbps'), '%.1f')} | {fmt(r.get('tflops'), '%.2f')} | {fmt(r.get('peak_mib'), '%.1f')} | "
            f"{fmt(r.get('pct_copy'), '%.1f%%')} |"
        )
    if rows:
        lines += [""] + targets_markdown(rows)
    for path in a.extra:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        benches = data.get("benchmarks", [])
        if not benches:
            continue
        lines += [
            "",
            f"## {os.path.basename(path)} (pytest-benchmark; extra_info as recorded by the suite)",
            "",
            "| test | median ms | rounds | extra |",
            "|---|---:|---:|---|",
        ]
        for b in benches:
            extra = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.get("extra_info", {}).items()
            )
            lines.append(f"| {b['name']} | {b['stats']['median'] * 1e3:.4f} | {b['stats']['rounds']} | {extra} |")
    atomic_write_bytes(a.out, ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
