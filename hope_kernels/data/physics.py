"""Embedded A1 / B / A2 physics: objects sliding on a plane under one impulse and Coulomb friction, top view.

Scene (all lengths in metres, the frame covers the square arena [0, ARENA]^2 at 64x64 px, 16 frames at FPS):
- 1-3 objects, each a disc or an axis-aligned box, distinct colours. Object 0 is the pushed object: always red,
  constant area (disc radius 0.08 m = 5.1 px, or the box of equal area). The others are static distractors
  (half-extent 0.06-0.09 m = 4-6 px; green/blue/cyan/teal, all with the background's red value), drawn under
  it. Objects do not collide with each other. (Constant area + a red channel that only the pushed object
  changes make its position a linear function of the pixels, which the linear-probe test relies on.)
- One impulse J (direction uniform, |J| uniform in [J_MIN, J_MAX] N*s) hits object 0 at a random frame f of the
  first half of the clip (f in 0..7). Before and at frame f nothing moves. Afterwards the speed is v0 = |J|/m
  and decays at mu*g until rest: path length s(tau) = v0*tau' - mu*g*tau'^2/2 with tau' = min(tau, v0/(mu*g)),
  tau = (frame - f)/FPS; stopping distance |J|^2 / (2 m^2 mu g).
- Elastic walls at the frame border (the object's edge reflects), so objects stay fully in view whatever the
  phase; reflections do not change the speed, so the travelled path length is exactly s(tau). Positions are
  the closed form folded into the arena (exact, no integration error).
- Phase A (A1 and A2): mu 0.5, m 1.0; phase B: mu 0.1, m 0.5 (configurable). With J in [1.5, 2.5] N*s an A
  object travels 0.23-0.64 m (15-41 px, 2-5 patches) and stops; a B object is 20x less braked per unit
  distance ((m_A^2 mu_A) / (m_B^2 mu_B) = 20) and crosses the arena, bouncing off the walls, within the clip.
- Actions (T=8, 2): J at timestep f // 2 (the tubelet holding frame f), zeros elsewhere.

`simulate_clips(n, physics, rng)` returns frames (n, 16, 64, 64, 3) uint8, actions (n, 8, 2) float32 and the
ground truth (positions of object 0 per frame, impulse frame, J, scene layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

G = 9.81
ARENA = 1.0  # metres, frame side
IMG = 64  # pixels
FRAMES = 16
FPS = 20.0
TUBELET = 2
J_MIN, J_MAX = 1.5, 2.5
SIZE_MIN, SIZE_MAX = 0.06, 0.09
MAX_OBJECTS = 3
BACKGROUND = np.array([0.16, 0.16, 0.18], dtype=np.float32)
AGENT_COLOUR = np.array([0.92, 0.12, 0.10], dtype=np.float32)
# distractors share the background's red value, so the red channel alone shows the pushed object
DISTRACTOR_COLOURS = np.array(
    [[0.16, 0.80, 0.25], [0.16, 0.35, 1.00], [0.16, 0.85, 0.85], [0.16, 0.55, 0.40]], dtype=np.float32
)
AGENT_RADIUS = 0.08  # disc radius; a box agent has the same area
AGENT_HALF_BOX = AGENT_RADIUS * np.sqrt(np.pi) / 2


@dataclass(frozen=True)
class Physics:
    """Coulomb friction coefficient mu and object mass m (kg)."""

    mu: float
    mass: float

    def __post_init__(self):
        if not (self.mu > 0 and self.mass > 0):
            raise ValueError(f"physics needs mu > 0 and mass > 0, got mu={self.mu}, mass={self.mass}")

    def as_dict(self) -> dict:
        return {"mu": float(self.mu), "mass": float(self.mass), "g": G}


def stopping_distance(J: float, physics: Physics) -> float:
    """Analytic distance travelled until rest after impulse J: J^2 / (2 m^2 mu g)."""
    return J * J / (2.0 * physics.mass**2 * physics.mu * G)


def sample_scenes(n: int, rng: np.random.Generator) -> dict:
    """Random layouts: n_obj (n,), shape (n, K) 0 disc / 1 box, size (n, K) half-extent m, colour (n, K, 3),
    pos0 (n, K, 2) m, impulse_frame (n,), J (n, 2) N*s. Absent objects (k >= n_obj) have size 0."""
    K = MAX_OBJECTS
    n_obj = rng.integers(1, K + 1, size=n)
    shape = rng.integers(0, 2, size=(n, K))
    size = rng.uniform(SIZE_MIN, SIZE_MAX, size=(n, K))
    size[:, 0] = np.where(shape[:, 0] == 1, AGENT_HALF_BOX, AGENT_RADIUS)
    size[np.arange(K)[None, :] >= n_obj[:, None]] = 0.0
    colour = np.zeros((n, K, 3), dtype=np.float32)
    colour[:, 0] = AGENT_COLOUR
    pos0 = np.zeros((n, K, 2))
    for i in range(n):
        picks = rng.choice(len(DISTRACTOR_COLOURS), size=K - 1, replace=False)
        colour[i, 1:] = DISTRACTOR_COLOURS[picks]
        for k in range(K):
            e = size[i, k] if size[i, k] > 0 else SIZE_MAX
            for _ in range(20):  # keep objects apart at the start when possible
                p = rng.uniform(e, ARENA - e, size=2)
                if all(np.abs(p - pos0[i, j]).max() > size[i, j] + e for j in range(k)):
                    break
            pos0[i, k] = p
    impulse_frame = rng.integers(0, FRAMES // 2, size=n)
    ang = rng.uniform(0, 2 * np.pi, size=n)
    mag = rng.uniform(J_MIN, J_MAX, size=n)
    J = np.stack([mag * np.cos(ang), mag * np.sin(ang)], axis=-1)
    return {
        "n_obj": n_obj,
        "shape": shape,
        "size": size,
        "colour": colour,
        "pos0": pos0,
        "impulse_frame": impulse_frame,
        "J": J,
    }


def _fold(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Position after elastic reflections between walls lo and hi of an unfolded coordinate x."""
    L = hi - lo
    y = np.mod(x - lo, 2 * L)
    return lo + np.where(y > L, 2 * L - y, y)


def path_length(tau: np.ndarray, v0: np.ndarray, physics: Physics) -> np.ndarray:
    """s(tau) = v0 t - mu g t^2 / 2 with t = clip(tau, 0, v0 / (mu g))."""
    a = physics.mu * G
    t = np.clip(tau, 0.0, v0 / a)
    return v0 * t - 0.5 * a * t * t


def trajectories(scenes: dict, physics: Physics, frames: int = FRAMES, fps: float = FPS) -> dict:
    """Positions (n, frames, K, 2) of every object (only object 0 moves) and the path length s (n, frames)."""
    J = scenes["J"]
    Jn = np.linalg.norm(J, axis=-1)
    u = J / np.maximum(Jn, 1e-12)[:, None]
    v0 = Jn / physics.mass
    tau = (np.arange(frames)[None, :] - scenes["impulse_frame"][:, None]) / fps  # (n, frames)
    s = path_length(tau, v0[:, None], physics)
    pos = np.repeat(scenes["pos0"][:, None], frames, axis=1).copy()  # (n, F, K, 2)
    e = scenes["size"][:, 0][:, None, None]
    unfolded = scenes["pos0"][:, None, 0, :] + u[:, None, :] * s[..., None]
    pos[:, :, 0] = _fold(unfolded, e, ARENA - e)
    return {"pos": pos, "s": s, "v0": v0}


def render(scenes: dict, pos: np.ndarray) -> np.ndarray:
    """Anti-aliased top view: (n, F, K, 2) positions -> uint8 frames (n, F, IMG, IMG, 3). Image row 0 is y = 0.

    Each object only touches a WIN x WIN window around its centre, so coverage is computed there and blended
    into a padded canvas through gathered indices (16x less work than full-frame coverage)."""
    n, F, K, _ = pos.shape
    WIN, pad = 16, 8
    scale = IMG / ARENA
    canvas = np.broadcast_to(BACKGROUND, (n, F, IMG + 2 * pad, IMG + 2 * pad, 3)).copy()
    ii = np.arange(n)[:, None, None, None]
    ff = np.arange(F)[None, :, None, None]
    for k in list(range(1, K)) + [0]:  # distractors first, pushed object on top
        r = (scenes["size"][:, k] * scale).astype(np.float32)[:, None, None, None]  # (n,1,1,1)
        if not (r > 0).any():
            continue
        px = (pos[:, :, k] * scale).astype(np.float32)  # (n, F, 2)
        o = np.floor(px).astype(np.int64) - WIN // 2  # window origin, px
        cx = o[..., 0, None] + np.arange(WIN)  # (n, F, WIN)
        cy = o[..., 1, None] + np.arange(WIN)
        dx = np.abs(cx + 0.5 - px[..., 0, None])[:, :, None, :]  # (n,F,1,WIN)
        dy = np.abs(cy + 0.5 - px[..., 1, None])[:, :, :, None]  # (n,F,WIN,1)
        disc = np.clip(r + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)
        box = np.clip(r + 0.5 - dx, 0.0, 1.0) * np.clip(r + 0.5 - dy, 0.0, 1.0)
        cov = np.where(scenes["shape"][:, k].astype(bool)[:, None, None, None], box, disc) * (r > 0)
        rows, cols = (cy + pad)[:, :, :, None], (cx + pad)[:, :, None, :]
        win = canvas[ii, ff, rows, cols]  # (n,F,WIN,WIN,3)
        col = scenes["colour"][:, k][:, None, None, None, :]
        canvas[ii, ff, rows, cols] = win + cov[..., None] * (col - win)
    img = canvas[:, :, pad : pad + IMG, pad : pad + IMG]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def actions_from(scenes: dict, T: int = FRAMES // TUBELET) -> np.ndarray:
    """(n, T, 2) float32: J at timestep impulse_frame // TUBELET, zero elsewhere."""
    n = scenes["J"].shape[0]
    a = np.zeros((n, T, 2), dtype=np.float32)
    a[np.arange(n), scenes["impulse_frame"] // TUBELET] = scenes["J"]
    return a


def simulate_clips(n: int, physics: Physics, rng: np.random.Generator) -> dict:
    """n clips: frames (n, 16, 64, 64, 3) uint8, actions (n, 8, 2) float32, pos (n, 16, K, 2) m, s (n, 16),
    scenes (layout dict)."""
    scenes = sample_scenes(n, rng)
    tr = trajectories(scenes, physics)
    frames = render(scenes, tr["pos"])
    return {"frames": frames, "actions": actions_from(scenes), "pos": tr["pos"], "s": tr["s"], "scenes": scenes}


def timestep_positions(pos: np.ndarray) -> np.ndarray:
    """Per-frame positions (n, F, K, 2) -> per-timestep (tubelet mean) positions of object 0, (n, T, 2)."""
    p = pos[:, :, 0]
    return p.reshape(p.shape[0], -1, TUBELET, 2).mean(axis=2)
