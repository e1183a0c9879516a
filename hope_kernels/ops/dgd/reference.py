"""Eager reference of HOPE's delta-gradient-descent memory (DESIGN 4.4). Stand-in until the kernel branch lands.

    M_t = (alpha_t I - eta_t k_t k_t^T) M_{t-1} - eta_t k_t (k_t^T M_ref - v_t^T)
    o_t = q_t^T M_{t-1}                      (read before the token's own update)

q, k (B, H, L, dk), v (B, H, L, dv), alpha, eta (B, H, L), M (B, H, dk, dv); M_ref = state at the chunk start.
"""
from __future__ import annotations

import torch


def dgd_memory_reference(q, k, v, alpha, eta, *, chunk_size, initial_state=None, output_final_state=False):
    B, H, L, dk = k.shape
    dv = v.shape[-1]
    M = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for t in range(L):
        if t % chunk_size == 0:
            M_ref = M
        kt, vt = k[:, :, t], v[:, :, t]                                         # (B, H, dk), (B, H, dv)
        a, e = alpha[:, :, t, None, None], eta[:, :, t, None, None]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], M))
        kM = torch.einsum("bhk,bhkv->bhv", kt, M)
        err = torch.einsum("bhk,bhkv->bhv", kt, M_ref) - vt
        M = a * M - e * kt[..., None] * kM[..., None, :] - e * kt[..., None] * err[..., None, :]
    o = torch.stack(outs, dim=2)
    return o, (M if output_final_state else None)
