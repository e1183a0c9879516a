"""Shows the adaptation API: load a checkpoint (`pretrained.load_any`), build the A1 -> B -> A2 stream of a dataset
(`data.make_stream`), adapt online with one strategy (`adapt.adapt_stream`) and print the per-phase prequential
errors (`metrics.phase_means`); optionally save the StreamLog as JSON. `hope-kernels adapt` does the same.

    python examples/adapt_checkpoint.py --checkpoint runs/train_hope/model/checkpoint.safetensors \
        --data runs/train_hope/data --strategy hope
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from hope_kernels.adapt import STRATEGIES, adapt_stream
    from hope_kernels.data import make_stream
    from hope_kernels.io import atomic_write_json
    from hope_kernels.metrics import phase_means
    from hope_kernels.pretrained import load_any

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint.safetensors of `train` or shipped weights")
    p.add_argument("--data", required=True, help="dataset folder (simulated or imported)")
    p.add_argument("--strategy", default="layernorm", choices=STRATEGIES)
    p.add_argument("--clips-per-phase", type=int, default=None, help="stream clips per phase (default: all)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=1, help="adaptation steps after each test clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log", default=None, help="write the StreamLog as JSON here")
    args = p.parse_args(argv)

    model = load_any(args.checkpoint, device=args.device)
    stream = make_stream(args.data, clips_per_phase=args.clips_per_phase, seed=args.seed)
    log = adapt_stream(model, stream, args.strategy, lr=args.lr, steps=args.steps, seed=args.seed)
    for metric in ("tf", "rollout", "copy_tf"):  # copy_tf: the copy-last baseline on the same clips
        print(metric, json.dumps({k: round(v, 4) for k, v in phase_means(log.errors(metric), log.phases).items()}))
    if args.log:
        atomic_write_json(args.log, log.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
