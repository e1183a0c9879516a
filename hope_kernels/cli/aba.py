"""`hope-kernels aba`: the main job. Simulates the embedded data if absent (or uses `--data DIR`), pre-trains
the predictors (reusing checkpoints in OUT/checkpoints), runs every strategy over the A1 -> B -> A2 stream for
every seed (skipping finished ones) and writes OUT/results.json, results.md and aba.png."""

from __future__ import annotations

from hope_kernels.cli._common import comma_ints


def add_arguments(parser) -> None:
    parser.add_argument(
        "--preset",
        default="quick",
        help="a preset shipped with the package: quick | paper (hope_kernels/configs/aba_<name>.yaml)",
    )
    parser.add_argument("--config", default=None, help="a YAML/JSON config file instead of the preset")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--data", default=None, help="an imported dataset folder (default: simulate into OUT/data)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: the preset's)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the preset's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from hope_kernels.aba import load_config, run_aba
    from hope_kernels.config import shipped_dir
    from hope_kernels.io import check_output_dir

    check_output_dir(args.out, "--out")
    cfg = load_config(args.config or args.preset, device=args.device)
    if args.config:
        where = f"config {args.config}"
    else:
        stem = args.preset if args.preset.startswith("aba_") else f"aba_{args.preset}"
        where = f"preset {args.preset} ({shipped_dir().joinpath(stem + '.yaml')})"
    if args.seeds:
        cfg["seeds"] = comma_ints(args.seeds, "--seeds")
    if args.data:
        cfg["data"] = {**(cfg.get("data") or {}), "dir": args.data, "imported": True}
    # said by run_aba once the folder is locked: a refused folder gets its one error line only
    res = run_aba(cfg, out=args.out, progress=not args.no_progress, source=where)
    print(res.table())
    for path in res.paths.values():
        print(f"wrote {path}")
    return 0
