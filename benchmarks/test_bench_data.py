"""Data benchmarks (CPU): embedded simulate + render + encode throughput (clips/s), and dataset iteration
throughput (MB/s) at the real V-JEPA 2 ViT-L size (8 x 256 x 1024 fp16 = 4 MiB per clip) from a multi-shard
dataset, lazy ClipDataset row reads vs loading whole shards with safetensors.load_file (the eager baseline).
Files are freshly written, so reads come from the page cache (memory bandwidth, not disk).

    pytest benchmarks/test_bench_data.py --benchmark-only -s
"""

import numpy as np
import pytest
import torch

from hope_kernels.data import ClipDataset
from hope_kernels.data.format import DatasetWriter
from hope_kernels.data.physics import Physics, render, sample_scenes, simulate_clips, trajectories
from hope_kernels.models.encoder import load_embedded_encoder

N_SIM = 64
RESULTS = {}


def _report(key):
    print(f"\n  {RESULTS[key]}")


@pytest.mark.parametrize("stage", ["simulate+render+encode", "render", "encode"])
def test_bench_simulate(benchmark, stage):
    enc = load_embedded_encoder()
    rng = np.random.default_rng(0)
    ph = Physics(0.1, 0.5)
    if stage == "simulate+render+encode":
        fn = lambda: enc.encode(torch.from_numpy(simulate_clips(N_SIM, ph, rng)["frames"]))  # noqa: E731
    elif stage == "render":
        sc = sample_scenes(N_SIM, rng)
        pos = trajectories(sc, ph)["pos"]
        fn = lambda: render(sc, pos)  # noqa: E731
    else:
        frames = torch.from_numpy(simulate_clips(N_SIM, ph, rng)["frames"])
        fn = lambda: enc.encode(frames)  # noqa: E731
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    rate = N_SIM / benchmark.stats.stats.mean
    benchmark.extra_info["clips_per_s"] = rate
    RESULTS[{"simulate+render+encode": "sim", "render": "render", "encode": "encode"}[stage]] = (
        f"{stage}: {rate:8.1f} clips/s ({N_SIM} clips, {torch.get_num_threads()} threads)"
    )
    _report({"simulate+render+encode": "sim", "render": "render", "encode": "encode"}[stage])


@pytest.fixture(scope="module")
def vitl_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "vitl"
    g = torch.Generator().manual_seed(0)
    with DatasetWriter(path, grid=(8, 16, 16), enc_dim=1024, action_dim=2, latent_dtype="float16") as w:
        for _ in range(4):  # 4 shards x 6 clips x 4 MiB
            w.add_shard(
                torch.randn(6, 8, 256, 1024, generator=g, dtype=torch.float32).half(),
                torch.zeros(6, 8, 2),
                "A1",
                "train",
            )
    return path


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_bench_iterate(benchmark, vitl_dataset, mode):
    from safetensors.torch import load_file

    ds = ClipDataset(vitl_dataset)
    nbytes = sum(ds[i]["latents"].numel() * 2 + 8 * 2 * 4 for i in range(len(ds)))

    def lazy():
        d = ClipDataset(vitl_dataset)
        return sum(c["latents"].clone().numel() for c in d)  # clone(): same forced copy as eager

    def eager():
        # whole shards at once; clone() forces the copy (load_file may hand back lazily mapped pages)
        return sum(load_file(str(vitl_dataset / s["file"]))["latents"].clone().numel() for s in ds.manifest["shards"])

    benchmark.pedantic(lazy if mode == "lazy" else eager, rounds=5, warmup_rounds=1)
    mbs = nbytes / 1e6 / benchmark.stats.stats.mean
    benchmark.extra_info["MB_per_s"] = mbs
    RESULTS[mode] = f"{mode} iteration: {mbs:8.0f} MB/s ({len(ds)} clips of 8x256x1024 fp16, 4 shards)"
    if {"lazy", "eager"} <= set(RESULTS):
        RESULTS["ratio"] = (
            "lazy / eager: " + f"{float(RESULTS['lazy'].split()[2]) / float(RESULTS['eager'].split()[2]):.2f}x"
        )
        _report("ratio")
    _report(mode)
