"""Small physics-like latent clips for the training tests (no dependency on hope_kernels.data).

An object on a plane gets one impulse J at a random timestep and slides with Coulomb friction (v0 = J/m,
deceleration mu*g until rest). Each timestep is rendered as a Gaussian blob on the (H, W) patch grid and
encoded by a fixed random map: latent = tanh(blob * u + blob_x * ux + blob_y * uy + background), where the
background is a per-clip constant. Copy-last is exact while the object rests and wrong while it moves.
"""

import torch

from hope_kernels.train import TensorClips


def physics_clips(
    n: int, seed: int = 0, T: int = 8, H: int = 8, W: int = 8, D: int = 64, mu: float = 0.5, mass: float = 1.0
) -> TensorClips:
    g = torch.Generator().manual_seed(seed)
    enc = torch.Generator().manual_seed(1234)  # the "encoder" is fixed across datasets
    u, ux, uy = (torch.randn(D, generator=enc) for _ in range(3))
    pos = torch.rand(n, 2, generator=g) * torch.tensor([H - 1.0, W - 1.0])
    t0 = torch.randint(0, T // 2, (n,), generator=g)
    J = (torch.rand(n, 2, generator=g) - 0.5) * 6.0
    actions = torch.zeros(n, T, 2)
    actions[torch.arange(n), t0] = J
    vel = torch.zeros(n, 2)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    bg = 0.5 * torch.randn(n, 1, H * W, D, generator=g)
    frames = []
    for t in range(T):
        d2 = (yy - pos[:, 0, None, None]) ** 2 + (xx - pos[:, 1, None, None]) ** 2
        blob = torch.exp(-d2 / 1.5).reshape(n, H * W, 1)
        dy = (yy - pos[:, 0, None, None]).reshape(n, H * W, 1)
        dx = (xx - pos[:, 1, None, None]).reshape(n, H * W, 1)
        frames.append(blob * u + blob * dx * ux + blob * dy * uy)
        # physics: the impulse at step t acts on the motion from t to t+1
        vel = vel + actions[:, t] / mass
        speed = vel.norm(dim=-1, keepdim=True)
        vel = vel * (speed - mu * 9.81 * 0.1).clamp_min(0) / speed.clamp_min(1e-9)
        pos = pos + vel
        for i, lim in enumerate((H - 1.0, W - 1.0)):  # bounce off the borders (objects stay in frame)
            over = (pos[:, i] < 0) | (pos[:, i] > lim)
            vel[over, i] = -vel[over, i]
            pos[:, i] = pos[:, i].clamp(0, lim)
    latents = torch.tanh(torch.stack(frames, 1) + bg)
    return TensorClips(latents, actions, grid=(T, H, W))
