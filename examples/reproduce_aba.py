"""Shows the A-B-A API: reproduce the comparison table (what `hope-kernels aba` runs) from Python, a shipped preset
(`aba.load_config`) edited as a dict, cut to some runs (`aba.select_runs`) and run (`aba.run_aba`).

    python examples/reproduce_aba.py --preset quick --out runs/quick
    python examples/reproduce_aba.py --out /tmp/smoke --seeds 0 --steps 5 --clips 2 --runs hope,ac+layernorm
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default=None, help="e.g. 0,1,2")
    p.add_argument("--steps", type=int, default=None, help="override the pre-training steps")
    p.add_argument("--clips", type=int, default=None, help="override clips per phase")
    p.add_argument("--runs", default=None, help="comma-separated run names to keep")
    args = p.parse_args(argv)

    from hope_kernels.aba import load_config, run_aba, select_runs

    cfg = load_config(args.preset)
    if args.seeds:
        cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.steps:
        cfg["pretrain"]["steps"] = args.steps
    if args.clips:
        cfg["stream"]["clips_per_phase"] = args.clips
    if args.runs:
        cfg = select_runs(cfg, [n.strip() for n in args.runs.split(",") if n.strip()])
    res = run_aba(cfg, out=args.out)
    print(res.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
