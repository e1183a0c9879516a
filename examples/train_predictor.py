"""Shows the training API: pre-train a predictor on the A1 training clips with `train.train(config)` (a dict of
hope_kernels.config.TrainConfig keys), on the embedded simulated data (`data.ensure_dataset`) unless --data.
`hope-kernels train` does the same from a config file.

    python examples/train_predictor.py --model hope --steps 200 --out runs/train_hope
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ac", choices=["ac", "hope"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=None, help="dataset folder (default: simulate into OUT/data)")
    p.add_argument("--data-preset", default="quick")
    p.add_argument("--phases", default="A1", help="comma-separated training phases")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="start over although OUT/model holds a checkpoint")
    args = p.parse_args(argv)

    from pathlib import Path

    from hope_kernels.data import ensure_dataset
    from hope_kernels.train import train

    data = args.data or ensure_dataset(Path(args.out) / "data", preset=args.data_preset)
    res = train(
        {
            "model": args.model,
            "preset": args.preset,
            "overrides": {},
            "data": str(data),
            "phases": args.phases.split(","),
            "split": "train",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": 0,
            "device": args.device,
            "out": str(Path(args.out) / "model"),
            "overwrite": args.overwrite,
            "progress": True,
        }
    )
    print(f"checkpoint: {res.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
