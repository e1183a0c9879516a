"""Eager reference of the Titans momentum memory (DESIGN 4.3), linear memory. Stand-in until the kernel lands.

    U_t = -theta_t k_t (k_t^T W_ref - v_t^T);  S_t = eta_t S_{t-1} + U_t;  W_t = (1 - alpha_t) W_{t-1} + S_t
    o_t = q_t^T W_t                              (read after the token's own update)

q, k (B, H, L, dk) (L2-normalised here), v (B, H, L, dv), alpha, eta, theta (B, H, L); W, S (B, H, dk, dv);
W_ref = weights at the chunk start.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def titans_memory_reference(q, k, v, alpha, eta, theta, *, chunk_size, memory="linear", initial_state=None,
                            output_final_state=False):
    if memory != "linear":
        raise NotImplementedError("the stand-in titans reference implements memory='linear' only")
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    B, H, L, dk = k.shape
    dv = v.shape[-1]
    if initial_state is None:
        W, S = q.new_zeros(B, H, dk, dv), q.new_zeros(B, H, dk, dv)
    else:
        W, S = initial_state
    outs = []
    for t in range(L):
        if t % chunk_size == 0:
            W_ref = W
        kt = k[:, :, t]
        err = torch.einsum("bhk,bhkv->bhv", kt, W_ref) - v[:, :, t]
        U = -theta[:, :, t, None, None] * kt[..., None] * err[..., None, :]
        S = eta[:, :, t, None, None] * S + U
        W = (1 - alpha[:, :, t, None, None]) * W + S
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], W))
    return torch.stack(outs, dim=2), ((W, S) if output_final_state else None)
