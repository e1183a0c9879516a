"""`hope-kernels adapt`: adapt one pre-trained checkpoint online over a dataset's A1 -> B -> A2 stream with one
TTA strategy, print the per-phase prequential errors and optionally write the StreamLog as JSON."""

from __future__ import annotations


def add_arguments(p) -> None:
    from hope_kernels.adapt import STRATEGIES

    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint.safetensors written by `train`, or shipped weights (hope_kernels/assets/pretrained)",
    )
    p.add_argument("--data", required=True, help="dataset folder (simulated or imported)")
    p.add_argument("--strategy", default="layernorm", choices=STRATEGIES)
    p.add_argument("--clips-per-phase", type=int, default=None, help="stream clips per phase (default: all)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=1, help="adaptation steps after each test clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--log", default=None, help="write the StreamLog as JSON here (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import json

    from hope_kernels.adapt import adapt_stream
    from hope_kernels.data import make_stream
    from hope_kernels.data.compat import check_model_matches_data
    from hope_kernels.io import atomic_write_json, check_output_file
    from hope_kernels.metrics import phase_means
    from hope_kernels.pretrained import load_any
    from hope_kernels.train import resolve_device

    if args.log:  # before the stream runs, not after it
        check_output_file(args.log, "--log")
    device = resolve_device(args.device)
    model = load_any(args.checkpoint, device=device)
    stream = make_stream(args.data, clips_per_phase=args.clips_per_phase, seed=args.seed)
    check_model_matches_data(model.config, stream, f"checkpoint {args.checkpoint}", f"dataset {args.data}")
    log = adapt_stream(
        model, stream, args.strategy, lr=args.lr, steps=args.steps, seed=args.seed, progress=not args.no_progress
    )  # on the model's device
    for metric in ("tf", "rollout", "copy_tf"):
        print(metric, json.dumps({k: round(v, 4) for k, v in phase_means(log.errors(metric), log.phases).items()}))
    if log.nonfinite:  # each clip was also named as it was scored
        left = {p: [b["clip"] for b in log.nonfinite if b["phase"] == p] for p in dict.fromkeys(log.phases)}
        print(
            "left out of the means (score NaN or Inf): "
            + ", ".join(f"{p} clips {c} ({len(c)} of {log.phases.count(p)})" for p, c in left.items() if c)
        )
    print(f"rollbacks: {log.rollbacks}, held-out matrix: {json.dumps(log.heldout)}")
    if args.log:
        atomic_write_json(args.log, log.to_dict())
    return 0
