"""Devices and processes: device names, the process group under torchrun (gloo on CPU, nccl on GPU) and the
gradient all-reduce."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device. CUDA without CUDA raises here, before any work;
    'cuda' without an index means this process's LOCAL_RANK."""
    cuda_index = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        return torch.device(f"cuda:{cuda_index}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r}: CUDA requested but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", cuda_index)
    return device


def _dist_setup(device_cfg: str):
    device = resolve_device(device_cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _allreduce_grads(model, world: int):
    """Average gradients over processes (one flat all-reduce). Plain all-reduce instead of the DDP wrapper
    because a step runs several forwards (rollout steps + teacher forcing) before one backward."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off : off + g.numel()].view_as(g))
        off += g.numel()
