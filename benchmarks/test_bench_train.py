"""Training-step throughput (clips/s) of the tiny AC and HOPE predictors: eager reference ops versus the
fastest available ops (`auto`), side by side per model (pytest-benchmark group = model).

    pytest benchmarks/test_bench_train.py --benchmark-only --benchmark-group-by=group
"""

import os
import sys

import pytest
import torch

import hope_kernels.train as tr
from hope_kernels.models import build_predictor
from hope_kernels.train.data import _collate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers.synthetic_clips import physics_clips  # noqa: E402

B = 4


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kind", ["ac", "hope"])
def test_train_step_throughput(benchmark, monkeypatch, kind, backend):
    monkeypatch.setenv("HOPE_KERNELS_BACKEND", backend)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ds = physics_clips(B, seed=0)
    m = build_predictor(kind, "tiny", enc_dim=ds.enc_dim, grid=ds.grid).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    z, a, _ = _collate(ds, range(B), dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            losses = tr.prediction_losses(m, z, a, rollout_steps=2)
            loss = losses["tf"] + losses["rollout"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"train-step {kind} tiny B={B} {dev}"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    benchmark.extra_info["clips_per_s"] = B / benchmark.stats.stats.mean
    print(f"{kind} {backend}: {B / benchmark.stats.stats.mean:.2f} clips/s")
