"""Eager references of the chunk-parallel Titans memory (docs/design.md#titans-memory). Ground truth and baselines.

Per batch and head, a memory M_W with weights W and momentum S (same shapes). Per token t, with the loss
l_t(W) = 1/2 ||M_W(k_t) - v_t||^2 and W_ref = the weights at the start of t's chunk (chunk size C):

    U_t = -theta_t * grad_W l_t(W_ref)
    S_t = eta_t * S_{t-1} + U_t
    W_t = (1 - alpha_t) * W_{t-1} + S_t
    o_t = M_{W_t}(q_t)                      (read after the token's own update)

C = 1 is exact sequential Titans. Memories (row-vector convention, x (dk,)):
    linear:  M_W(x) = x W,                             W (dk, dv)
    mlp:     M_W(x) = x + silu(x W1) W2,               W1 (dk, dh), W2 (dh, dv), dk == dv

Shapes: q, k (B, H, L, dk); v (B, H, L, dv); alpha, eta, theta (B, H, L); o (B, H, L, dv).
State: linear (W, S) each (B, H, dk, dv); mlp (W1, W2, S1, S2). Everything runs in the accumulation dtype
(float32, float64 for float64 inputs); o comes back in the input dtype, the state in the accumulation dtype.

Two implementations with identical semantics:
  * `titans_token_loop`: the plain loop over tokens (the definition);
  * `titans_chunked`: the closed form, a few masked matrix products per chunk (loop over chunks only):
        W_t = beta_t W_0 + f_t S_0 + sum_{i<=t} c_{t,i} U_i,      S_t = m_t S_0 + sum_{i<=t} (m_t/m_i) U_i
    with beta_t = prod_{j<=t} (1 - alpha_j), m_t = prod_{j<=t} eta_j inside the chunk,
    f_t = sum_{j<=t} (beta_t/beta_j) m_j and c_{t,i} = sum_{j=i..t} (beta_t/beta_j)(m_j/m_i).
Both are differentiable by autograd (the gradient of the inner loss is written out analytically).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from hope_kernels.ops.checks import accum_dtype


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _mlp_inner_grad(x, v, W1, W2):
    """Analytic gradient of 1/2 ||x + silu(x W1) W2 - v||^2 for rows x (..., n, dk).

    Returns (h, g_z, e): hidden activations (..., n, dh), d/dz (..., n, dh) and the error (..., n, dv), so that
    grad_W1 = x^T g_z and grad_W2 = h^T e.
    """
    z = x @ W1
    h = F.silu(z)
    e = x + h @ W2 - v
    g_z = (e @ W2.transpose(-1, -2)) * silu_grad(z)
    return h, g_z, e


def _prepare(q, k, v, alpha, eta, theta, state, memory):
    acc = accum_dtype(q.dtype)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    q, k, v, alpha, eta, theta = (x.to(acc) for x in (q, k, v, alpha, eta, theta))
    if state is None:
        if memory != "linear":
            raise ValueError("memory='mlp' needs initial_state=(W1, W2, S1, S2)")
        z = q.new_zeros(B, H, dk, dv)
        state = (z, z)
    return acc, q, k, v, alpha, eta, theta, tuple(s.to(acc) for s in state)


def titans_token_loop(
    q,
    k,
    v,
    alpha,
    eta,
    theta,
    *,
    chunk_size: int = 1,
    memory: str = "linear",
    initial_state: Sequence[torch.Tensor] | None = None,
):
    """The definition: a loop over tokens. Returns (o (B, H, L, dv) in q's dtype, final state tuple)."""
    in_dtype = q.dtype
    acc, q, k, v, alpha, eta, theta, state = _prepare(q, k, v, alpha, eta, theta, initial_state, memory)
    L = q.shape[2]
    outs = []
    if memory == "linear":
        W, S = state
        for t in range(L):
            if t % chunk_size == 0:
                W_ref = W
            kt, vt, qt = k[:, :, t, None, :], v[:, :, t, None, :], q[:, :, t, None, :]  # (B, H, 1, d)
            e = kt @ W_ref - vt  # (B, H, 1, dv)
            U = -theta[:, :, t, None, None] * (kt.transpose(-1, -2) @ e)
            S = eta[:, :, t, None, None] * S + U
            W = (1 - alpha[:, :, t, None, None]) * W + S
            outs.append((qt @ W)[:, :, 0])
        final = (W, S)
    elif memory == "mlp":
        W1, W2, S1, S2 = state
        for t in range(L):
            if t % chunk_size == 0:
                R1, R2 = W1, W2
            kt, vt, qt = k[:, :, t, None, :], v[:, :, t, None, :], q[:, :, t, None, :]
            h, g_z, e = _mlp_inner_grad(kt, vt, R1, R2)
            th = theta[:, :, t, None, None]
            S1 = eta[:, :, t, None, None] * S1 - th * (kt.transpose(-1, -2) @ g_z)
            S2 = eta[:, :, t, None, None] * S2 - th * (h.transpose(-1, -2) @ e)
            a = 1 - alpha[:, :, t, None, None]
            W1, W2 = a * W1 + S1, a * W2 + S2
            outs.append((qt + F.silu(qt @ W1) @ W2)[:, :, 0])
        final = (W1, W2, S1, S2)
    else:
        raise ValueError(f"memory must be 'linear' or 'mlp', got {memory!r}")
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    return o.to(in_dtype), final


def _segment_products(a: torch.Tensor) -> torch.Tensor:
    """D[..., t, j] = prod_{l=j+1..t} a_l for j <= t, else 0; a (..., n) -> (..., n, n).

    A masked cumulative product (no division, no logs): exact when a gate is 0.
    """
    n = a.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)  # [t, j]: t > j
    A = torch.where(lower, a.unsqueeze(-1).expand(*a.shape, n), torch.ones_like(a).unsqueeze(-1))
    return torch.cumprod(A, dim=-2).tril()


def chunk_gates(alpha: torch.Tensor, eta: torch.Tensor):
    """Gate coefficients of one chunk; alpha, eta (..., n).

    Returns b (..., n) = beta_t, f (..., n), Cm (..., n, n) = c_{t,i}, m (..., n) = m_t, Dm (..., n, n) = m_t/m_i.
    """
    a = 1 - alpha
    Db = _segment_products(a)
    Dm = _segment_products(eta)
    b = torch.cumprod(a, dim=-1)
    m = torch.cumprod(eta, dim=-1)
    f = (Db @ m.unsqueeze(-1)).squeeze(-1)
    Cm = Db @ Dm
    return b, f, Cm, m, Dm


def _dual(P0, Pf, b, f, Cm, A, Bt, G):
    """b * P0 + f * Pf - (Cm o (A B^T)) G: the read of a chunk through the closed form."""
    return b.unsqueeze(-1) * P0 + f.unsqueeze(-1) * Pf - (Cm * (A @ Bt.transpose(-1, -2))) @ G


def _end_state(W0, S0, X, G, b, f, Cm, m, Dm):
    """End-of-chunk (W, S) for updates U_i = -x_i^T g_i (G already scaled by theta)."""
    Xt = X.transpose(-1, -2)
    W = b[..., -1, None, None] * W0 + f[..., -1, None, None] * S0 - Xt @ (Cm[..., -1, :, None] * G)
    S = m[..., -1, None, None] * S0 - Xt @ (Dm[..., -1, :, None] * G)
    return W, S


def titans_linear_chunk_step(Q, K, V, th, a, e, W0, S0):
    """One chunk of the linear memory: Q, K (B, H, n, dk), V (B, H, n, dv), th (B, H, n, 1), gates a, e
    (B, H, n), state W0, S0 (B, H, dk, dv) -> the chunk's outputs (B, H, n, dv) and (W, S) at its end."""
    b, f, Cm, m, Dm = chunk_gates(a, e)
    G = th * (K @ W0 - V)  # theta_i e_i  (n, dv)
    return _dual(Q @ W0, Q @ S0, b, f, Cm, Q, K, G), _end_state(W0, S0, K, G, b, f, Cm, m, Dm)


def titans_mlp_chunk_step(Q, K, V, th, a, e, W1, W2, S1, S2):
    """One chunk of the MLP memory (dk = dv): the chunk's outputs and (W1, W2, S1, S2) at its end."""
    b, f, Cm, m, Dm = chunk_gates(a, e)
    h, g_z, err = _mlp_inner_grad(K, V, W1, W2)
    G1, G2 = th * g_z, th * err
    hq = F.silu(_dual(Q @ W1, Q @ S1, b, f, Cm, Q, K, G1))
    o = Q + _dual(hq @ W2, hq @ S2, b, f, Cm, hq, h, G2)
    W1n, S1n = _end_state(W1, S1, K, G1, b, f, Cm, m, Dm)
    W2n, S2n = _end_state(W2, S2, h, G2, b, f, Cm, m, Dm)
    return o, (W1n, W2n, S1n, S2n)


def titans_chunked(
    q,
    k,
    v,
    alpha,
    eta,
    theta,
    *,
    chunk_size: int = 16,
    memory: str = "linear",
    initial_state: Sequence[torch.Tensor] | None = None,
    chunk_step=None,
):
    """The chunk-parallel closed form in eager PyTorch (loop over chunks, matrix products inside).

    Same arguments, semantics and returns as `titans_token_loop`. chunk_step: a stand-in for
    `titans_linear_chunk_step` / `titans_mlp_chunk_step` with the same signature (the benchmarks pass it
    through torch.compile: compiling the whole unrolled loop took minutes).
    """
    in_dtype = q.dtype
    acc, q, k, v, alpha, eta, theta, state = _prepare(q, k, v, alpha, eta, theta, initial_state, memory)
    L = q.shape[2]
    if memory not in ("linear", "mlp"):
        raise ValueError(f"memory must be 'linear' or 'mlp', got {memory!r}")
    step = chunk_step or (titans_linear_chunk_step if memory == "linear" else titans_mlp_chunk_step)
    outs = []
    for s in range(0, L, chunk_size):
        sl = slice(s, min(s + chunk_size, L))
        o, state = step(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl].unsqueeze(-1), alpha[:, :, sl], eta[:, :, sl], *state
        )
        outs.append(o)
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    return o.to(in_dtype), tuple(state)


# ---------------------------------------------------------------------------------------------------------
# Explicit chunked forward / backward of the linear memory: the derivation of docs/titans.md written in
# PyTorch, no autograd. The compiled CPU kernels (csrc/titans_*_cpu.cpp) run this algorithm; the test
# `test_explicit_backward_matches_autograd` checks it against autograd through the token loop.
# ---------------------------------------------------------------------------------------------------------


def titans_linear_chunked_fwd(q, k, v, alpha, eta, theta, W0, S0, chunk_size: int):
    """Returns o (B, H, L, dv) and the chunk-boundary states Ws, Ss (B, H, N+1, dk, dv), N = ceil(L / C);
    Ws[:, :, n] is the state at the start of chunk n, Ws[:, :, N] the final one. All in the accumulation dtype."""
    L = q.shape[2]
    o = q.new_empty(*q.shape[:3], v.shape[-1])
    Ws, Ss = [W0], [S0]
    for s in range(0, L, chunk_size):
        sl = slice(s, min(s + chunk_size, L))
        Q, K, V = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        b, f, Cm, m, Dm = chunk_gates(alpha[:, :, sl], eta[:, :, sl])
        G = theta[:, :, sl].unsqueeze(-1) * (K @ Ws[-1] - V)
        o[:, :, sl] = _dual(Q @ Ws[-1], Q @ Ss[-1], b, f, Cm, Q, K, G)
        W, S = _end_state(Ws[-1], Ss[-1], K, G, b, f, Cm, m, Dm)
        Ws.append(W)
        Ss.append(S)
    return o, torch.stack(Ws, dim=2), torch.stack(Ss, dim=2)


def _log_grad(dD: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """For D[t, j] = exp(g_t - g_j): the gradient to g, sum_j dD D over rows minus sum_t dD D over columns."""
    X = dD * D
    return X.sum(-1) - X.sum(-2)


def titans_linear_chunked_bwd(q, k, v, alpha, eta, theta, Ws, Ss, do, dWT, dST, chunk_size: int):
    """Gradients (dq, dk, dv, dalpha, deta, dtheta, dW0, dS0) given do (B, H, L, dv) and the gradients
    dWT, dST (B, H, dk, dv) of the final state; Ws, Ss from the forward. Walks the chunks backwards,
    recomputing each chunk's inside from its boundary state."""
    L = q.shape[2]
    N = Ws.shape[2] - 1
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dalpha, deta, dtheta = torch.zeros_like(alpha), torch.zeros_like(eta), torch.zeros_like(theta)
    dW, dS = dWT.clone(), dST.clone()
    for n in reversed(range(N)):
        sl = slice(n * chunk_size, min((n + 1) * chunk_size, L))
        Q, K, V, dO = q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl]
        a, et, th = 1 - alpha[:, :, sl], eta[:, :, sl], theta[:, :, sl].unsqueeze(-1)
        W0, S0 = Ws[:, :, n], Ss[:, :, n]
        Db, Dm = _segment_products(a), _segment_products(et)
        b, m = torch.cumprod(a, -1), torch.cumprod(et, -1)
        f = (Db @ m.unsqueeze(-1)).squeeze(-1)
        Cm = Db @ Dm
        cC, r = Cm[..., -1, :], Dm[..., -1, :]
        E = K @ W0 - V
        G = th * E
        QK = Q @ K.transpose(-1, -2)
        P = Cm * QK
        QW, QS = Q @ W0, Q @ S0
        KdW, KdS = K @ dW, K @ dS
        # values
        dG = -P.transpose(-1, -2) @ dO - cC.unsqueeze(-1) * KdW - r.unsqueeze(-1) * KdS
        dP = -(dO @ G.transpose(-1, -2)).tril()
        dQK = dP * Cm
        dE = th * dG
        dtheta[:, :, sl] = (E * dG).sum(-1)
        dv[:, :, sl] = -dE
        dq[:, :, sl] = (
            dQK @ K + b.unsqueeze(-1) * (dO @ W0.transpose(-1, -2)) + f.unsqueeze(-1) * (dO @ S0.transpose(-1, -2))
        )
        dk[:, :, sl] = (
            dQK.transpose(-1, -2) @ Q
            - cC.unsqueeze(-1) * (G @ dW.transpose(-1, -2))
            - r.unsqueeze(-1) * (G @ dS.transpose(-1, -2))
            + dE @ W0.transpose(-1, -2)
        )
        # gate coefficients
        db = (dO * QW).sum(-1)
        df = (dO * QS).sum(-1)
        db[..., -1] += (dW * W0).sum((-1, -2))
        df[..., -1] += (dW * S0).sum((-1, -2))
        dCm = dP * QK
        dCm[..., -1, :] -= (KdW * G).sum(-1)
        dalpha[:, :, sl], deta[:, :, sl] = _gate_bwd(a, et, db, df, (dS * S0).sum((-1, -2)), dCm, -(KdS * G).sum(-1))
        # to the chunk-start state
        dW, dS = (
            Q.transpose(-1, -2) @ (b.unsqueeze(-1) * dO) + b[..., -1, None, None] * dW + K.transpose(-1, -2) @ dE,
            Q.transpose(-1, -2) @ (f.unsqueeze(-1) * dO) + f[..., -1, None, None] * dW + m[..., -1, None, None] * dS,
        )
    return dq, dk, dv, dalpha, deta, dtheta, dW, dS


# ---------------------------------------------------------------------------------------------------------
# Explicit chunked forward / backward of the MLP memory (docs/titans.md, "MLP memory: backward"), no
# autograd. The Triton MLP kernels are this algorithm; `test_mlp_explicit_backward_matches_autograd` checks
# it against autograd through the token loop. Each layer is a "dual block": for rows X (reads), A (writes),
# G (theta-scaled inner gradients) and the chunk-start pair (P0, Pf) = (W, S) of the layer,
#     R  = b o (X P0) + f o (X Pf) - (Cm o X A^T) G
#     Wn = b_n P0 + f_n Pf - A^T (c o G),   Sn = m_n Pf - A^T (r o G)
# ---------------------------------------------------------------------------------------------------------


def _mlp_chunk_forward(Q, K, V, th, W1, W2, S1, S2, b, f, Cm):
    """The inside of one MLP chunk: (Z, Hk, E, GZ, G1, G2, Zq, Hq, O); th (..., n, 1)."""
    Z = K @ W1
    Hk = F.silu(Z)
    E = K + Hk @ W2 - V
    GZ = (E @ W2.transpose(-1, -2)) * silu_grad(Z)
    G1, G2 = th * GZ, th * E
    Zq = _dual(Q @ W1, Q @ S1, b, f, Cm, Q, K, G1)
    Hq = F.silu(Zq)
    O = Q + _dual(Hq @ W2, Hq @ S2, b, f, Cm, Hq, Hk, G2)
    return Z, Hk, E, GZ, G1, G2, Zq, Hq, O


def titans_mlp_chunked_fwd(q, k, v, alpha, eta, theta, W1, W2, S1, S2, chunk_size: int):
    """Returns o (B, H, L, dv) and the chunk-boundary states W1s, W2s, S1s, S2s (B, H, N+1, ., .),
    N = ceil(L / C); index n is the state at the start of chunk n, index N the final one."""
    L = q.shape[2]
    o = q.new_empty(*q.shape[:3], v.shape[-1])
    st = [[W1], [W2], [S1], [S2]]
    for s in range(0, L, chunk_size):
        sl = slice(s, min(s + chunk_size, L))
        b, f, Cm, m, Dm = chunk_gates(alpha[:, :, sl], eta[:, :, sl])
        w1, w2, s1, s2 = (x[-1] for x in st)
        K = k[:, :, sl]
        _, Hk, _, _, G1, G2, _, _, O = _mlp_chunk_forward(
            q[:, :, sl], K, v[:, :, sl], theta[:, :, sl].unsqueeze(-1), w1, w2, s1, s2, b, f, Cm
        )
        o[:, :, sl] = O
        w1, s1 = _end_state(w1, s1, K, G1, b, f, Cm, m, Dm)
        w2, s2 = _end_state(w2, s2, Hk, G2, b, f, Cm, m, Dm)
        for x, y in zip(st, (w1, w2, s1, s2)):
            x.append(y)
    return (o,) + tuple(torch.stack(x, dim=2) for x in st)


def silu_grad2(z: torch.Tensor) -> torch.Tensor:
    """Second derivative of silu: s (1 - s) (2 + z (1 - 2 s))."""
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _dual_bwd(X, A, G, P0, Pf, dR, dWn, dSn, b, f, Cm, c, r, QK):
    """Backward of one dual block given dR and the gradients dWn, dSn of its end state.

    Returns dX, dA, dG, dP0, dPf and the gate pieces (db, df, dm_n, dCm, dr) where dr is the gradient to the
    last row r of Dm."""
    AdW, AdS = A @ dWn, A @ dSn
    P = Cm * QK
    dG = -P.transpose(-1, -2) @ dR - c.unsqueeze(-1) * AdW - r.unsqueeze(-1) * AdS
    dP = -(dR @ G.transpose(-1, -2)).tril()
    dQK = dP * Cm
    dCm = dP * QK
    dCm[..., -1, :] -= (AdW * G).sum(-1)
    dr = -(AdS * G).sum(-1)
    dX = dQK @ A + b.unsqueeze(-1) * (dR @ P0.transpose(-1, -2)) + f.unsqueeze(-1) * (dR @ Pf.transpose(-1, -2))
    dA = (
        dQK.transpose(-1, -2) @ X
        - c.unsqueeze(-1) * (G @ dWn.transpose(-1, -2))
        - r.unsqueeze(-1) * (G @ dSn.transpose(-1, -2))
    )
    Xt = X.transpose(-1, -2)
    dP0 = Xt @ (b.unsqueeze(-1) * dR) + b[..., -1, None, None] * dWn
    dPf = Xt @ (f.unsqueeze(-1) * dR) + f[..., -1, None, None] * dWn
    db = (dR * (X @ P0)).sum(-1)
    df = (dR * (X @ Pf)).sum(-1)
    db[..., -1] += (dWn * P0).sum((-1, -2))
    df[..., -1] += (dWn * Pf).sum((-1, -2))
    dm_n = (dSn * Pf).sum((-1, -2))
    return dX, dA, dG, dP0, dPf, (db, df, dm_n, dCm, dr)


def _gate_bwd(a, et, db, df, dm_n, dCm, dr):
    """Gradients to alpha, eta of one chunk from the gradients of its gate coefficients b, f, m_n, Cm and the
    last row r of Dm (log-derivative form, as the linear backward)."""
    Db, Dm = _segment_products(a), _segment_products(et)
    b, m = torch.cumprod(a, -1), torch.cumprod(et, -1)
    dm = torch.zeros_like(m)
    dm[..., -1] = dm_n
    dDb = (dCm @ Dm.transpose(-1, -2) + df.unsqueeze(-1) * m.unsqueeze(-2)).tril()
    dDm = (Db.transpose(-1, -2) @ dCm).tril()
    dDm[..., -1, :] += dr
    dm = dm + (Db.transpose(-1, -2) @ df.unsqueeze(-1)).squeeze(-1)
    # to log gates g = cumsum(log a): dg_t, then d log a_l = sum_{t >= l} dg_t
    dgb = _log_grad(dDb, Db) + db * b
    dgm = _log_grad(dDm, Dm) + dm * m
    dla = dgb.flip(-1).cumsum(-1).flip(-1)
    dle = dgm.flip(-1).cumsum(-1).flip(-1)
    tiny = torch.finfo(a.dtype).tiny
    return -dla / a.clamp_min(tiny), dle / et.clamp_min(tiny)


def titans_mlp_chunked_bwd(q, k, v, alpha, eta, theta, W1s, W2s, S1s, S2s, do, dW1T, dW2T, dS1T, dS2T, chunk_size: int):
    """Gradients (dq, dk, dv, dalpha, deta, dtheta, dW1, dW2, dS1, dS2) given do (B, H, L, dv) and the gradients
    of the final state; W1s.. from `titans_mlp_chunked_fwd`. Walks the chunks backwards, recomputing each
    chunk's inside from its boundary state."""
    L = q.shape[2]
    N = W1s.shape[2] - 1
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dalpha, deta, dtheta = torch.zeros_like(alpha), torch.zeros_like(eta), torch.zeros_like(theta)
    dW1, dW2, dS1, dS2 = dW1T.clone(), dW2T.clone(), dS1T.clone(), dS2T.clone()
    for n in reversed(range(N)):
        sl = slice(n * chunk_size, min((n + 1) * chunk_size, L))
        Q, K, V, dO = q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl]
        th = theta[:, :, sl].unsqueeze(-1)
        W1, W2, S1, S2 = W1s[:, :, n], W2s[:, :, n], S1s[:, :, n], S2s[:, :, n]
        b, f, Cm, m, Dm = chunk_gates(alpha[:, :, sl], eta[:, :, sl])
        c, r = Cm[..., -1, :], Dm[..., -1, :]
        Z, Hk, E, GZ, G1, G2, Zq, Hq, _ = _mlp_chunk_forward(Q, K, V, th, W1, W2, S1, S2, b, f, Cm)
        # layer 2 (reads Hq, writes Hk), then layer 1 (reads Q, writes K)
        dHq, dHk, dG2, dW2p, dS2p, gp2 = _dual_bwd(
            Hq, Hk, G2, W2, S2, dO, dW2, dS2, b, f, Cm, c, r, Hq @ Hk.transpose(-1, -2)
        )
        dZq = dHq * silu_grad(Zq)
        dQ, dK, dG1, dW1p, dS1p, gp1 = _dual_bwd(
            Q, K, G1, W1, S1, dZq, dW1, dS1, b, f, Cm, c, r, Q @ K.transpose(-1, -2)
        )
        dQ = dQ + dO
        # G1 = theta GZ, G2 = theta E, GZ = (E W2^T) o silu'(Z), E = K + Hk W2 - V, Hk = silu(Z), Z = K W1
        dtheta[:, :, sl] = (dG1 * GZ).sum(-1) + (dG2 * E).sum(-1)
        dGZ = th * dG1
        sp = silu_grad(Z)
        Y = E @ W2.transpose(-1, -2)
        dY = dGZ * sp
        dZ = dGZ * Y * silu_grad2(Z)
        dE = th * dG2 + dY @ W2
        dW2p = dW2p + dY.transpose(-1, -2) @ E + Hk.transpose(-1, -2) @ dE
        dHk = dHk + dE @ W2.transpose(-1, -2)
        dZ = dZ + dHk * sp
        dK = dK + dE + dZ @ W1.transpose(-1, -2)
        dW1p = dW1p + K.transpose(-1, -2) @ dZ
        dq[:, :, sl], dk[:, :, sl], dv[:, :, sl] = dQ, dK, -dE
        db, df, dm_n, dCm, dr = (x + y for x, y in zip(gp1, gp2))
        dalpha[:, :, sl], deta[:, :, sl] = _gate_bwd(1 - alpha[:, :, sl], eta[:, :, sl], db, df, dm_n, dCm, dr)
        # the chunk-start momenta also reach the end momenta directly (S_n = m_n S0 + ...)
        mn = m[..., -1, None, None]
        dW1, dW2, dS1, dS2 = dW1p, dW2p, dS1p + mn * dS1, dS2p + mn * dS2
    return dq, dk, dv, dalpha, deta, dtheta, dW1, dW2, dS1, dS2
