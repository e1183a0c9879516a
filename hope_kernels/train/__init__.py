"""Training (docs/design.md#training), split by job: losses and schedules, data, checkpoints, distributed
set-up, the loop and evaluation. The public names are re-exported here:

    from hope_kernels.train import train
    result = train({"model": "hope", "data": "data/quick", "steps": 300, "out": "runs/hope"})
"""
from hope_kernels.train.loop import (CKPT_NAME, LOG_NAME, TensorClips, TrainResult, copy_last_loss, evaluate,
                                     load_checkpoint, lr_at, prediction_losses, resolve_device, rollout_weight,
                                     save_checkpoint, train)

__all__ = ["CKPT_NAME", "LOG_NAME", "TensorClips", "TrainResult", "copy_last_loss", "evaluate", "load_checkpoint",
           "lr_at", "prediction_losses", "resolve_device", "rollout_weight", "save_checkpoint", "train"]
