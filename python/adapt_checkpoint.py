"""Adapt a pre-trained checkpoint online over the A1 -> B -> A2 stream with one strategy and print the
per-phase prequential errors.

    python python/adapt_checkpoint.py --checkpoint runs/train_hope/model/<ckpt> --data runs/train_hope/data \
        --strategy hope
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from hope_kernels.adapt import STRATEGIES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--strategy", default="layernorm", choices=STRATEGIES)
    p.add_argument("--clips-per-phase", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="write the StreamLog as JSON here")
    args = p.parse_args(argv)

    from hope_kernels.adapt import adapt_stream
    from hope_kernels.data import make_stream
    from hope_kernels.metrics import phase_means
    from hope_kernels.report import atomic_write_json
    from hope_kernels.train import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint)
    stream = make_stream(args.data, clips_per_phase=args.clips_per_phase, seed=args.seed)
    log = adapt_stream(model, stream, args.strategy, lr=args.lr, steps=args.steps, seed=args.seed, progress=True)
    for metric in ("tf", "rollout", "copy_tf"):
        print(metric, json.dumps({k: round(v, 4) for k, v in phase_means(log.errors(metric), log.phases).items()}))
    print(f"rollbacks: {log.rollbacks}, held-out matrix: {json.dumps(log.heldout)}")
    if args.log:
        atomic_write_json(args.log, log.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
