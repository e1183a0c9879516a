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


def dgd_memory_chunked(q, k, v, alpha, eta, *, chunk_size, initial_state=None, output_final_state=False):
    """Same maths as `dgd_memory_reference`, one triangular solve per chunk instead of a token loop.

    Inside a chunk (tokens t = 0..C-1, M_0 = chunk-start state, c_t = sum_{j<=t} log alpha_j):
        M_t = alpha_t M_{t-1} + k_t r_t^T,   r_t = eta_t (v_t - M_0^T k_t - M_{t-1}^T k_t)
        M_{t-1} = e^{c_{t-1}} M_0 + sum_{i<t} e^{c_{t-1} - c_i} k_i r_i^T
    so (I + diag(eta) L) R = diag(eta) (V - K M_0 - e^{c_prev} K M_0), L[t, i] = e^{c_{t-1} - c_i} k_t.k_i (i < t).
    """
    B, H, Lq, dk = k.shape
    dv = v.shape[-1]
    M = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for s in range(0, Lq, chunk_size):
        sl = slice(s, min(s + chunk_size, Lq))
        Q, K, V, e = q[:, :, sl], k[:, :, sl], v[:, :, sl], eta[:, :, sl]
        la = torch.log(alpha[:, :, sl].to(q.dtype).clamp_min(1e-30))
        c = la.cumsum(-1)
        cprev = c - la
        C = K.shape[2]
        strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        D = torch.exp((cprev[..., :, None] - c[..., None, :]).masked_fill(~strict, float("-inf")))
        KM0 = K @ M
        A = torch.eye(C, dtype=q.dtype, device=q.device) + e[..., None] * D * (K @ K.transpose(-1, -2))
        rhs = e[..., None] * (V - KM0 - cprev.exp()[..., None] * KM0)
        R = torch.linalg.solve_triangular(A, rhs, upper=False)
        outs.append(cprev.exp()[..., None] * (Q @ M) + (D * (Q @ K.transpose(-1, -2))) @ R)
        M = c[..., -1:, None].exp() * M + (torch.exp(c[..., -1:] - c)[..., None] * K).transpose(-1, -2) @ R
    return torch.cat(outs, dim=2), (M if output_final_state else None)
