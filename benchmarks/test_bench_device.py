"""The device's copy bandwidth (bytes read + bytes written per second): the ceiling for memory-bound ops."""

import pytest
import torch

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_copy_bandwidth(bench, device):
    n = (1 << 30) // 4 if device == "cuda" else (1 << 26) // 4  # 1 GiB on GPU, 64 MiB on CPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    bench(
        lambda: dst.copy_(src),
        group=f"device copy {n * 4 >> 20} MiB {device}",
        backend="copy",
        device=device,
        nbytes=2 * n * 4,
    )
