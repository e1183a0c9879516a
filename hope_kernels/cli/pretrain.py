"""`hope-kernels pretrain`: regenerate the pre-trained predictors an A-B-A preset ships with.

    hope-kernels pretrain --preset quick                       # every model, into hope_kernels/assets/pretrained/quick
    hope-kernels pretrain --preset quick --only ac-A1 --workers 1
    hope-kernels pretrain --preset quick --steps 3 --assets /tmp/a --work /tmp/w    # a short trial run

The dataset is simulated into WORK/data if absent; training checkpoints go to WORK/checkpoints/<name>, so an
interrupted regeneration resumes where it stopped.
"""

from __future__ import annotations

from hope_kernels.cli._common import comma_list


def add_arguments(p) -> None:
    p.add_argument(
        "--preset",
        default="quick",
        help="A-B-A preset whose models to pre-train (hope_kernels/configs/aba_<preset>.yaml)",
    )
    p.add_argument("--config", default=None, help="an A-B-A YAML/JSON config file instead of the preset")
    p.add_argument("--work", default=None, help="data + training checkpoints (default runs/pretrain_<preset>)")
    p.add_argument(
        "--assets",
        default=None,
        help="where to write the weights and index.json (default: the package's assets folder)",
    )
    p.add_argument("--only", default=None, help="comma-separated model names (e.g. ac-A1,hope-A1)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's training steps (trial runs)")
    p.add_argument("--workers", type=int, default=2, help="models trained at once, one process each (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")


def run(args) -> int:
    import time

    from hope_kernels.aba import load_config
    from hope_kernels.pretrained import regenerate, with_steps

    if args.workers < 1 or args.threads < 1:
        raise ValueError(f"--workers and --threads must be >= 1, got {args.workers} and {args.threads}")
    cfg = load_config(args.config or args.preset)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if not args.assets:  # a trial run must not replace the weights the package ships
            raise ValueError("--steps writes weights of another recipe: name their folder with --assets")
        cfg = with_steps(cfg, args.steps)
    only = comma_list(args.only) if args.only else None
    t0 = time.perf_counter()
    index = regenerate(
        cfg,
        args.work or f"runs/pretrain_{cfg.get('preset') or 'custom'}",
        assets=args.assets,
        workers=args.workers,
        only=only,
        device=args.device,
        threads=args.threads,
    )
    print(f"wrote {len(index['models'])} model(s) to the index in {time.perf_counter() - t0:.0f} s")
    return 0
