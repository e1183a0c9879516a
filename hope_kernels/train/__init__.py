"""Training (docs/design.md#training, docs/training.md), split by job:

    losses       teacher-forcing and rollout L1, the copy-last baseline, rollout weight and learning-rate schedules
    data         in-memory clips, the dataset folder, the batch of each step
    checkpoint   atomic safetensors checkpoints with exact-resume state, the JSONL log
    distributed  devices, the process group under torchrun, the gradient all-reduce
    loop         train(config): the training loop
    evaluation   held-out teacher-forcing L1 against the copy-last baseline

The public names are re-exported here:

    from hope_kernels.train import train
    result = train({"model": "hope", "data": "data/quick", "steps": 300, "out": "runs/hope"})
"""

from hope_kernels.train.checkpoint import CKPT_NAME, LOG_NAME, load_checkpoint, save_checkpoint
from hope_kernels.train.data import TensorClips
from hope_kernels.train.distributed import resolve_device
from hope_kernels.train.evaluation import evaluate
from hope_kernels.train.loop import TrainResult, train
from hope_kernels.train.losses import copy_last_loss, lr_at, prediction_losses, rollout_weight

__all__ = [
    "CKPT_NAME",
    "LOG_NAME",
    "TensorClips",
    "TrainResult",
    "copy_last_loss",
    "evaluate",
    "load_checkpoint",
    "lr_at",
    "prediction_losses",
    "resolve_device",
    "rollout_weight",
    "save_checkpoint",
    "train",
]
