"""`hope-kernels simulate`: write the embedded A1 / B / A2 physics dataset (see hope_kernels/data/simulate.py)."""

from __future__ import annotations

from hope_kernels.cli._common import phase_counts


def add_arguments(parser) -> None:
    # choices kept literal so `hope-kernels --help` does not import torch; hope_kernels.data.simulate.PRESETS is
    # the source
    parser.add_argument(
        "--preset", default="quick", choices=["tiny", "quick", "full"], help="dataset size (default quick)"
    )
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a SimConfig field, e.g. --set mu_b=0.05 --set train_a1=64 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true")


def _parse_overrides(items) -> dict:
    import dataclasses

    from hope_kernels.data.simulate import SimConfig

    types = {f.name: type(f.default) for f in dataclasses.fields(SimConfig)}
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set expects KEY=VALUE with KEY one of {sorted(types)}, got {it!r}")
        try:
            out[key] = types[key](val)
        except ValueError:
            raise ValueError(f"--set {key}: expected a {types[key].__name__}, got {val!r}") from None
    return out


def run(args) -> int:
    from hope_kernels.data.format import verify_dataset
    from hope_kernels.data.simulate import simulate_dataset
    from hope_kernels.io import check_output_dir

    check_output_dir(args.out, "--out")
    path = simulate_dataset(
        args.out, preset=args.preset, seed=args.seed, progress=not args.no_progress, **_parse_overrides(args.set)
    )
    info = verify_dataset(path)
    print(
        f"wrote {info['clips']} clips ({info['bytes'] / 1e6:.1f} MB, {info['shards']} shards) to {path}: "
        f"{phase_counts(info)}"
    )
    return 0
