"""`hope-kernels verify DIR`: check every shard of a dataset against its manifest (sha256, sizes, shapes)."""

from __future__ import annotations

from hope_kernels.cli._common import phase_counts


def add_arguments(parser) -> None:
    parser.add_argument("path", help="dataset folder")


def run(args) -> int:
    from hope_kernels.data.format import verify_dataset

    info = verify_dataset(args.path)
    print(f"ok: {info['clips']} clips in {info['shards']} shards ({info['bytes'] / 1e6:.1f} MB): {phase_counts(info)}")
    return 0
