"""`hope-kernels encode`: frames -> latents with the embedded or a local Hugging Face V-JEPA 2 encoder, written
into a dataset folder like `import` (same validation, --append to add phases)."""

from __future__ import annotations

from hope_kernels.cli._common import LATENT_DTYPES, add_phase_and_out


def add_arguments(parser) -> None:
    parser.add_argument(
        "--frames", required=True, help="(n, F, H, W, 3) uint8 or float in [0, 1]: .npy .npz .safetensors .pt"
    )
    parser.add_argument("--encoder", default="embedded", help="'embedded' or 'hf:DIR' (local V-JEPA 2 folder)")
    parser.add_argument("--actions", required=True, help="(n, F / tubelet, A)")
    parser.add_argument("--states", default=None)
    add_phase_and_out(parser)
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--split", default="auto")
    parser.add_argument("--latent-dtype", default="float16", choices=LATENT_DTYPES)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allow-multi-step-actions", action="store_true")


def run(args) -> int:
    import torch

    from hope_kernels.data.format import verify_dataset
    from hope_kernels.data.importers import import_arrays, load_array
    from hope_kernels.io import check_output_dir
    from hope_kernels.models.encoder import encode_frames, get_encoder

    check_output_dir(args.out, "--out")
    frames = load_array(args.frames, "frames")
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames in {args.frames} must be (n, F, H, W, 3), got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8 and not frames.is_floating_point():
        raise TypeError(f"frames in {args.frames} must be uint8 or float in [0, 1], got {frames.dtype}")
    enc = get_encoder(args.encoder, device=args.device)
    lat = encode_frames(enc, frames, batch_size=args.batch_size)
    if args.encoder == "embedded":
        H, W = frames.shape[2] // enc.patch, frames.shape[3] // enc.patch
    else:
        H = W = enc.crop // enc.patch
    lat = lat.reshape(lat.shape[0], lat.shape[1], H, W, lat.shape[-1])
    act = load_array(args.actions, "actions")
    st = load_array(args.states, "states") if args.states else None
    out = import_arrays(
        args.out,
        lat,
        act,
        args.phase,
        states=st,
        split=args.split,
        append=args.append,
        latent_dtype=args.latent_dtype,
        allow_multi_step_actions=args.allow_multi_step_actions,
        sources={"latents": f"{args.frames} (encoded)", "actions": args.actions, "states": str(args.states)},
    )
    info = verify_dataset(out)
    print(
        f"encoded {lat.shape[0]} clips with {args.encoder} -> latents {tuple(lat.shape)} into {out} "
        f"({info['clips']} clips in total)"
    )
    return 0
