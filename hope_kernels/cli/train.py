"""`hope-kernels train`: train a predictor from a YAML/JSON config, CLI flags override it. --config takes a file
path or the name of a config shipped in hope_kernels/configs (train_ac_tiny, train_hope_tiny, train_ac_vjepa2,
train_hope_vjepa2), so the command works from any folder after any install.

    hope-kernels train --model hope --config train_hope_tiny --data data/quick --out runs/hope
    hope-kernels train --config my_config.yaml --data data/quick --out runs/hope
    torchrun --nproc_per_node=2 $(which hope-kernels) train ...      # data parallel (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import os


def add_arguments(p):
    p.add_argument("--model", choices=["ac", "hope"], help="predictor kind (overrides the config)")
    p.add_argument(
        "--config",
        help="YAML or JSON training config file (keys of hope_kernels.config.TrainConfig), "
        "or a shipped one by name: train_ac_tiny | train_hope_tiny | train_ac_vjepa2 | "
        "train_hope_vjepa2 (hope_kernels/configs/)",
    )
    p.add_argument("--data", help="dataset folder")
    p.add_argument("--out", help="output folder (checkpoint.safetensors, train_log.jsonl)")
    p.add_argument("--preset", help="predictor preset: tiny | small | vjepa2-ac")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--overwrite", action="store_true", help="start over although OUT holds a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from hope_kernels.config import TrainConfig, read_config_or_shipped
    from hope_kernels.io import check_output_dir
    from hope_kernels.train import train

    cfg = read_config_or_shipped(args.config, "train_", "training config", full_names=True) if args.config else {}
    for key in ("model", "data", "out", "preset", "steps", "batch_size", "lr", "seed", "device"):
        val = getattr(args, key)
        if val is not None:
            cfg[key] = val
    if args.resume:
        cfg["resume"] = True
    if args.overwrite:
        cfg["overwrite"] = True
    if args.no_progress:
        cfg["progress"] = False
    # keys and values first; then --out: the Python API may train in memory, from the shell the model would be lost
    if not TrainConfig.from_dict(dict(cfg)).out:
        raise ValueError("train needs --out DIR (or `out` in the config): where the checkpoint and log go")
    check_output_dir(cfg["out"], "out")
    res = train(cfg)
    if res.history and int(os.environ.get("RANK", "0")) == 0:
        last = res.history[-1]
        print(
            f"step {last['step']}: loss {last['loss']:.5f} (tf {last['tf']:.5f}, rollout {last['rollout']:.5f}); "
            f"checkpoint {res.checkpoint}"
        )
    return 0
