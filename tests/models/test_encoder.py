"""Embedded encoder: shipped weights = generator output, recorded latent fingerprint of a fixed clip, no leak
from later frames, linear probe of object positions (R^2 >= 0.9 on held-out clips); `hope-kernels encode`
with the embedded and the Hugging Face V-JEPA 2 encoder (skipped without transformers)."""

import hashlib
import json
import sys

import numpy as np
import pytest
import torch

from hope_kernels.cli import main
from hope_kernels.data import ClipDataset, verify_dataset
from hope_kernels.data.physics import Physics, simulate_clips, timestep_positions
from hope_kernels.models.encoder import (
    EMBEDDED_FINGERPRINT,
    EMBEDDED_WEIGHTS,
    build_embedded_weights,
    encode_frames,
    get_encoder,
    latent_fingerprint,
    load_embedded_encoder,
)

REC = json.loads(EMBEDDED_FINGERPRINT.read_text())


@pytest.fixture(scope="module")
def enc():
    return load_embedded_encoder()


def test_weights_file_is_the_generator_output():
    assert hashlib.sha256(EMBEDDED_WEIGHTS.read_bytes()).hexdigest() == REC["weights_sha256"]
    assert EMBEDDED_WEIGHTS.stat().st_size < 400_000
    sd = load_embedded_encoder().state_dict()
    for k, v in build_embedded_weights(seed=0).items():
        assert torch.equal(sd[k], v), k


def test_fixed_clip_fingerprint(enc):
    clip = simulate_clips(1, Physics(0.5, 1.0), np.random.default_rng(1234))
    z = enc.encode(torch.from_numpy(clip["frames"]))
    assert z.shape == (1, 8, 64, 64) and z.dtype == torch.float32
    fp, want = latent_fingerprint(z), REC["latents"]
    assert fp["shape"] == want["shape"]
    scale = want["abs_sum"]
    for k in ("sum", "abs_sum", "sq_sum", "weighted_sum"):
        assert abs(fp[k] - want[k]) <= 1e-5 * max(scale, abs(want[k])), (k, fp[k], want[k])
    np.testing.assert_allclose(fp["first"], want["first"], atol=1e-4)
    # float frames in [0, 1] give the same latents as uint8 frames
    z2 = enc.encode(torch.from_numpy(clip["frames"]).float() / 255)
    torch.testing.assert_close(z2, z)


def test_no_leak_from_later_frames(enc):
    frames = torch.from_numpy(simulate_clips(2, Physics(0.1, 0.5), np.random.default_rng(0))["frames"])
    z = enc.encode(frames)
    frames2 = frames.clone()
    frames2[:, 12:] = 255 - frames2[:, 12:]
    z2 = enc.encode(frames2)
    assert torch.equal(z[:, :6], z2[:, :6]) and not torch.allclose(z[:, 6:], z2[:, 6:])


def test_bad_frames(enc):
    with pytest.raises(ValueError, match=r"frames must be \(B, F, H, W, 3\), got shape \(2, 16, 64, 64\)"):
        enc.encode(torch.zeros(2, 16, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="F divisible by 2"):
        enc.encode(torch.zeros(1, 3, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        enc.encode(torch.zeros(1, 2, 64, 64, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        enc.encode(torch.full((1, 2, 8, 8, 3), float("nan")))
    with pytest.raises(ValueError, match=r"float frames must lie in \[0, 1\]"):
        enc.encode(torch.full((1, 2, 8, 8, 3), 255.0))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        encode_frames(enc, torch.zeros(1, 2, 8, 8, 3), batch_size=0)
    with pytest.raises(ValueError, match="encoder must be 'embedded' or 'hf:DIR'"):
        get_encoder("vjepa")


def test_linear_probe_recovers_positions(enc):
    """Ridge least squares from the flattened latents of a timestep (N*D) to the pushed object's (x, y),
    fitted on clips of both phases and scored on held-out clips of each phase."""

    def data(n, seed, ph):
        c = simulate_clips(n, ph, np.random.default_rng(seed))
        z = enc.encode(torch.from_numpy(c["frames"])).double()
        return z.reshape(n * 8, -1), torch.from_numpy(timestep_positions(c["pos"])).reshape(n * 8, 2)

    xa, ya = data(48, 10, Physics(0.5, 1.0))
    xb, yb = data(48, 11, Physics(0.1, 0.5))
    X, y = torch.cat([xa, xb]), torch.cat([ya, yb])
    mu, ym = X.mean(0), y.mean(0)
    Xc = X - mu
    # dual form of ridge (samples < features): W = Xc^T (Xc Xc^T + lam I)^-1 (y - ym)
    Wt = Xc.T @ torch.linalg.solve(Xc @ Xc.T + 1.0 * torch.eye(X.shape[0], dtype=X.dtype), y - ym)
    for seed, ph in ((20, Physics(0.5, 1.0)), (21, Physics(0.1, 0.5))):
        xt, yt = data(24, seed, ph)
        pred = (xt - mu) @ Wt + ym
        r2 = 1 - ((pred - yt) ** 2).sum(0) / ((yt - yt.mean(0)) ** 2).sum(0)
        print(f"probe R2 ({'A' if ph.mu == 0.5 else 'B'} held-out): x {r2[0]:.4f}, y {r2[1]:.4f}")
        assert (r2 >= 0.9).all(), r2


def test_encode_cli_embedded(tmp_path, capsys):
    c = simulate_clips(4, Physics(0.5, 1.0), np.random.default_rng(0))
    np.save(tmp_path / "frames.npy", c["frames"])
    np.save(tmp_path / "actions.npy", c["actions"])
    out = tmp_path / "ds"
    assert (
        main(
            [
                "encode",
                "--frames",
                str(tmp_path / "frames.npy"),
                "--actions",
                str(tmp_path / "actions.npy"),
                "--encoder",
                "embedded",
                "--phase",
                "A1",
                "--split",
                "train",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    verify_dataset(out)
    ds = ClipDataset(out)
    assert ds.grid == (8, 8, 8) and ds.enc_dim == 64 and len(ds) == 4
    z = load_embedded_encoder().encode(torch.from_numpy(c["frames"]))
    torch.testing.assert_close(ds[3]["latents"].float(), z[3], atol=2e-3, rtol=2e-3)  # stored as float16


def test_hf_missing_transformers_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RuntimeError, match=r"needs Hugging Face transformers"):
        get_encoder(f"hf:{tmp_path}")


def test_encode_cli_hf_vjepa2(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "VJEPA2Model"):
        pytest.skip("this transformers has no VJEPA2Model")
    torch.manual_seed(0)
    cfg = transformers.VJEPA2Config(
        crop_size=32,
        frames_per_clip=4,
        tubelet_size=2,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2.0,
        pred_hidden_size=32,
        pred_num_hidden_layers=1,
        pred_num_attention_heads=2,
    )
    model = transformers.VJEPA2Model(cfg).eval()
    model.save_pretrained(tmp_path / "vjepa2")
    frames = torch.randint(0, 256, (3, 4, 40, 40, 3), dtype=torch.uint8)
    actions = torch.zeros(3, 2, 2)
    torch.save(frames, tmp_path / "frames.pt")
    torch.save(actions, tmp_path / "actions.pt")
    out = tmp_path / "ds"
    assert (
        main(
            [
                "encode",
                "--frames",
                str(tmp_path / "frames.pt"),
                "--actions",
                str(tmp_path / "actions.pt"),
                "--encoder",
                f"hf:{tmp_path / 'vjepa2'}",
                "--phase",
                "B",
                "--split",
                "train",
                "--latent-dtype",
                "float32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ds = ClipDataset(out)
    assert ds.grid == (2, 4, 4) and ds.enc_dim == 32 and len(ds) == 3
    # same latents as calling the model directly on the resized, normalised frames
    x = frames.float().div(255).permute(0, 1, 4, 2, 3).reshape(12, 3, 40, 40)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((x - mean) / std).reshape(3, 4, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values_videos=x, skip_predictor=True).last_hidden_state.reshape(3, 2, 16, 32)
    torch.testing.assert_close(ds[1]["latents"], ref[1], atol=1e-5, rtol=1e-5)
