"""Shows the embedded encoder's API: regenerate its shipped weights (`models.encoder.build_embedded_weights`) and
the latent fingerprint of a fixed clip (`load_embedded_encoder().encode`, `latent_fingerprint`).

    python examples/make_embedded_encoder.py      # writes hope_kernels/assets/embedded_encoder.{safetensors,json}

The weights are a deterministic function of seed 0 (numpy PCG64), so rerunning reproduces the same bytes
(one metadata key only: safetensors writes metadata from a hash map, so several keys come out in random order).
tests/models/test_encoder.py checks the shipped file against both.
"""

import hashlib
import json

from safetensors.torch import save

from hope_kernels.io import atomic_write_bytes
from hope_kernels.models.encoder import (
    EMBEDDED_FINGERPRINT,
    EMBEDDED_WEIGHTS,
    build_embedded_weights,
    latent_fingerprint,
    load_embedded_encoder,
)


def fixed_clip_latents():
    """Latents of the fixed reference clip: simulator seed 1234, phase A physics, clip 0."""
    import numpy as np

    from hope_kernels.data.physics import Physics, simulate_clips

    clip = simulate_clips(1, Physics(0.5, 1.0), np.random.default_rng(1234))
    return load_embedded_encoder().encode(clip["frames"])


def main():
    # the script's former path, as the shipped bytes record it: renaming it would change the weights' sha256
    data = save(build_embedded_weights(seed=0), metadata={"generator": "python/make_embedded_encoder.py seed=0"})
    atomic_write_bytes(EMBEDDED_WEIGHTS, data)
    fp = {
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "seed": 0,
        "reference_clip": "simulate_clips(1, Physics(0.5, 1.0), np.random.default_rng(1234))",
        "latents": latent_fingerprint(fixed_clip_latents()),
    }
    atomic_write_bytes(EMBEDDED_FINGERPRINT, (json.dumps(fp, indent=1) + "\n").encode())
    print(f"wrote {EMBEDDED_WEIGHTS} ({len(data)} bytes) and {EMBEDDED_FINGERPRINT}")


if __name__ == "__main__":
    main()
