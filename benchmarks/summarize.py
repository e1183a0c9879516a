"""Turn the benchmark rows (JSON written by benchmarks/conftest.py) into a dated Markdown table.

    python benchmarks/summarize.py rows.json out.md --title "..."
"""
from __future__ import annotations

import argparse
import json
import os


def fmt(v, spec):
    return spec % v if v is not None else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows")
    ap.add_argument("out")
    ap.add_argument("--title", default="hope-kernels benchmarks")
    ap.add_argument("--preamble", default="")
    a = ap.parse_args()
    with open(a.rows) as f:
        rows = json.load(f)
    lines = [f"# {a.title}", "", a.preamble, "",
             "Speed-up = eager ms / ms, in the same run on the same device. GB/s counts each input read once "
             "and each output written once; the copy row is the device's measured ceiling.", "",
             "| group | backend | ms | speed-up | GB/s | TFLOP/s | peak MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['backend']} | {r['ms']:.4f} | {fmt(r.get('speedup_vs_eager'), '%.2fx')} | "
                     f"{fmt(r.get('gbps'), '%.1f')} | {fmt(r.get('tflops'), '%.2f')} | {fmt(r.get('peak_mib'), '%.1f')} |")
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
