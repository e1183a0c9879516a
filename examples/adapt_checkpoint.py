"""Adapt a pre-trained checkpoint online over the A1 -> B -> A2 stream with one strategy and print the
per-phase prequential errors (the same as `hope-kernels adapt`, whose arguments it takes).

    python python/adapt_checkpoint.py --checkpoint runs/train_hope/model/<ckpt> --data runs/train_hope/data \
        --strategy hope
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from hope_kernels import cli_adapt
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli_adapt.add_arguments(p)
    return cli_adapt.run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
