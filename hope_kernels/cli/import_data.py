"""`hope-kernels import`: add one phase of the researcher's own latents + actions to a dataset folder."""

from __future__ import annotations

from hope_kernels.cli._common import LATENT_DTYPES, add_phase_and_out, phase_counts


def add_arguments(parser) -> None:
    parser.add_argument("--latents", required=True, help="(n, T, N, D) or (n, T, H, W, D): .npy .npz .safetensors .pt")
    parser.add_argument("--actions", required=True, help="(n, T, A)")
    parser.add_argument("--states", default=None, help="optional (n, T, S)")
    add_phase_and_out(parser)
    parser.add_argument("--append", action="store_true", help="add to an existing dataset folder")
    parser.add_argument(
        "--split", default="auto", help="auto (80/10/10 train/stream/heldout in clip order), train, stream or heldout"
    )
    parser.add_argument(
        "--grid",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="patch grid for 4-D latents when N is not a perfect square",
    )
    parser.add_argument(
        "--latent-dtype",
        default=None,
        choices=LATENT_DTYPES,
        help="stored latent dtype (default: as given; float64 becomes float32)",
    )
    parser.add_argument(
        "--allow-multi-step-actions",
        action="store_true",
        help="accept clips whose actions are non-zero at more than one timestep",
    )


def run(args) -> int:
    from hope_kernels.data.format import verify_dataset
    from hope_kernels.data.importers import import_files
    from hope_kernels.io import check_output_dir

    check_output_dir(args.out, "--out")
    out = import_files(
        args.out,
        args.latents,
        args.actions,
        args.phase,
        states_path=args.states,
        split=args.split,
        append=args.append,
        grid=tuple(args.grid) if args.grid else None,
        latent_dtype=args.latent_dtype,
        allow_multi_step_actions=args.allow_multi_step_actions,
    )
    info = verify_dataset(out)
    print(f"imported phase {args.phase} into {out}: now {info['clips']} clips ({phase_counts(info)})")
    return 0
