"""Eager references of HOPE's delta-gradient-descent memory (docs/design.md#dgd-memory). Ground truth and benchmark
baselines.

Per batch b and head h, a matrix memory M (dk, dv) is read and then updated at every token t:

    o_t = q_t^T M_{t-1}                                                   (read before the token's own update)
    M_t = (alpha_t I - eta_t k_t k_t^T) M_{t-1} - eta_t k_t (k_t^T M_ref - v_t^T)

with M_ref = the state at the start of the token's chunk (chunks of `chunk_size` tokens from t = 0);
chunk_size = 1 is the exact sequential rule. Shapes: q, k (B, H, L, dk); v (B, H, L, dv); alpha, eta (B, H, L);
M (B, H, dk, dv), zeros when initial_state is None; o (B, H, L, dv). Math runs in float32 (float64 for float64
inputs); o comes back in q's dtype, the final state in the accumulation dtype.

`dgd_memory_token_loop` is the plain recurrence. `dgd_memory_chunked_reference` is the chunk-parallel form
(docs/dgd.md derives it). Inside one chunk of C tokens, with gamma = running product of alpha from the chunk
start (exclusive: c_t = gamma_{t-1}, inclusive: gamma_t) and D[t, i] = gamma_{t-1} / gamma_i for i < t:

    A = strict_tril(D * K K^T) diag(eta)          P = strict_tril(D * Q K^T) diag(eta)        (C, C)
    X = (I + A)^{-1} (diag(1 + c) K M_0 - V)      (the UT transform: one unit-lower-triangular solve)
    O = diag(c) Q M_0 - P X
    M_C = gamma_C M_0 - K^T diag(eta * gamma_C / gamma) X

so the product of the C rank-1-perturbed identities never appears explicitly. Both functions are plain
PyTorch and differentiable by autograd.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from hope_kernels.ops.checks import accum_dtype


def _prep(q, k, v, alpha, eta, initial_state):
    acc = accum_dtype(q.dtype)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        M = torch.zeros(B, H, dk, dv, device=q.device, dtype=acc)
    else:
        M = initial_state.to(acc)
    return acc, [x.to(acc) for x in (q, k, v, alpha, eta)], M


def dgd_memory_token_loop(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
):
    """Token-by-token recurrence. q, k (B, H, L, dk); v (B, H, L, dv); alpha, eta (B, H, L);
    initial_state (B, H, dk, dv) or None. Returns (o (B, H, L, dv), final state (B, H, dk, dv))."""
    out_dtype = q.dtype
    acc, (q, k, v, alpha, eta), M = _prep(q, k, v, alpha, eta, initial_state)
    L = q.shape[2]
    outs = []
    M_ref = M
    for t in range(L):
        if t % chunk_size == 0:
            M_ref = M
        q_t, k_t, v_t = q[:, :, t], k[:, :, t], v[:, :, t]
        a_t, e_t = alpha[:, :, t, None, None], eta[:, :, t, None, None]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t, M))
        x_t = torch.einsum("bhk,bhkv->bhv", k_t, M + M_ref) - v_t  # k^T M_{t-1} + k^T M_ref - v^T
        M = a_t * M - e_t * k_t[..., :, None] * x_t[..., None, :]
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(q.shape[:3] + (v.shape[-1],))
    return o.to(out_dtype), M


def chunk_gates(alpha: torch.Tensor, eta: torch.Tensor, C: int):
    """Per-chunk decay factors from (B, H, N, C) gates: (c, g, gC, D) with c_t = gamma_{t-1}, g_i = gamma_C /
    gamma_i, gC = gamma_C and D[t, i] = gamma_{t-1} / gamma_i (i < t, else 0). Products are taken in log space."""
    la = alpha.log()
    lg = la.cumsum(-1)
    lgp = lg - la
    strict = torch.ones(C, C, dtype=torch.bool, device=alpha.device).tril(-1)
    diff = (lgp[..., :, None] - lg[..., None, :]).masked_fill(~strict, float("-inf"))
    return lgp.exp(), (lg[..., -1:] - lg).exp(), lg[..., -1].exp(), diff.exp()


def dgd_chunk_step(U, TV, Qc, P, gC, Wt, M):
    """One chunk of the chunked form: the chunk's outputs (B, H, C, dv) and the next state M (B, H, dk, dv).
    U, Qc (B, H, C, dk), TV (B, H, C, dv), P (B, H, C, C), gC (B, H), Wt (B, H, dk, C)."""
    X = U @ M - TV
    return Qc @ M - P @ X, gC[:, :, None, None] * M - Wt @ X


def dgd_memory_chunked_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    chunk_step=dgd_chunk_step,
):
    """Chunk-parallel WY / UT-transform form (same arguments and results as `dgd_memory_token_loop`).

    Everything that does not depend on the state is computed for all chunks at once; the loop over chunks
    only carries M: X_n = U_n M_n - (I + A)^{-1} V_n, M_{n+1} = gamma_C M_n - W_n^T X_n.
    chunk_step: `dgd_chunk_step` or a stand-in with its signature (the benchmarks pass it through
    torch.compile: compiling the whole unrolled loop took minutes)."""
    out_dtype = q.dtype
    acc, (q, k, v, alpha, eta), M = _prep(q, k, v, alpha, eta, initial_state)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    q, k, v, alpha, eta = _pad_chunks(q, k, v, alpha, eta, chunk_size)
    N = q.shape[2]
    t = _chunk_terms(q, k, v, alpha, eta, chunk_size, acc)
    Wt = t.W.transpose(-1, -2)  # (B, H, N, dk, C)
    outs = []
    for n in range(N):
        o_n, M = chunk_step(t.U[:, :, n], t.TV[:, :, n], t.Qc[:, :, n], t.P[:, :, n], t.gC[:, :, n], Wt[:, :, n], M)
        outs.append(o_n)
    o = torch.stack(outs, dim=2).reshape(B, H, N * chunk_size, dv)[:, :, :L]
    return o.to(out_dtype), M


def _chunk_terms(q, k, v, alpha, eta, C: int, acc: torch.dtype) -> SimpleNamespace:
    """The state-independent terms of every chunk at once (inputs already (B, H, N, C, .)):
    gates c, g, gC, D; KK = k k^T, QK = q k^T; A, P (masked, eta-scaled); I + A; U = (I + A)^{-1} (1 + c) k,
    TV = (I + A)^{-1} v; W = eta g k; Qc = c q."""
    c, g, gC, D = chunk_gates(alpha, eta, C)
    KK, QK = k @ k.transpose(-1, -2), q @ k.transpose(-1, -2)
    A, P = D * KK * eta[..., None, :], D * QK * eta[..., None, :]
    I_A = A + torch.eye(C, device=A.device, dtype=acc)
    U = torch.linalg.solve_triangular(I_A, (1 + c)[..., None] * k, upper=False, unitriangular=True)
    TV = torch.linalg.solve_triangular(I_A, v, upper=False, unitriangular=True)
    return SimpleNamespace(
        c=c,
        g=g,
        gC=gC,
        D=D,
        KK=KK,
        QK=QK,
        A=A,
        P=P,
        I_A=I_A,
        U=U,
        TV=TV,
        W=k * (eta * g)[..., None],
        Qc=q * c[..., None],
    )


def _pad_chunks(q, k, v, alpha, eta, C):
    """(B, H, L, .) -> (B, H, N, C, .), padding with tokens that leave the state untouched (eta 0, alpha 1)."""
    B, H, L, dk = q.shape
    N = -(-L // C)
    pad = N * C - L
    F = torch.nn.functional
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        alpha, eta = F.pad(alpha, (0, pad), value=1.0), F.pad(eta, (0, pad))
    return (
        q.reshape(B, H, N, C, dk),
        k.reshape(B, H, N, C, dk),
        v.reshape(B, H, N, C, v.shape[-1]),
        alpha.reshape(B, H, N, C),
        eta.reshape(B, H, N, C),
    )


@torch.no_grad()
def dgd_memory_chunked_backward(q, k, v, alpha, eta, initial_state, do, dM, chunk_size):
    """Hand-derived backward of docs/dgd.md in eager PyTorch (the algorithm of the C++ and Triton kernels).

    do (B, H, L, dv), dM (B, H, dk, dv): gradients of o and of the final state. Returns (dq, dk, dv, dalpha,
    deta, dM0) in the accumulation dtype. Forward quantities are recomputed; the chunk-start states come from
    one forward pass over the chunks, and one reverse pass carries dM."""
    acc, (q, k, v, alpha, eta), M = _prep(q, k, v, alpha, eta, initial_state)
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    C = chunk_size
    q, k, v, alpha, eta = _pad_chunks(q, k, v, alpha, eta, C)
    N = q.shape[2]
    do = torch.nn.functional.pad(do.to(acc), (0, 0, 0, N * C - L)).reshape(B, H, N, C, dv)
    t = _chunk_terms(q, k, v, alpha, eta, C, acc)
    c, g, gC, D, KK, QK, A, P, I_A, U, TV, W, Qc = (
        t.c,
        t.g,
        t.gC,
        t.D,
        t.KK,
        t.QK,
        t.A,
        t.P,
        t.I_A,
        t.U,
        t.TV,
        t.W,
        t.Qc,
    )
    # forward over chunks: chunk-start states M_n and X_n
    Ms, Xs = [], []
    for n in range(N):
        Ms.append(M)
        X = U[:, :, n] @ M - TV[:, :, n]
        Xs.append(X)
        M = gC[:, :, n, None, None] * M - W[:, :, n].transpose(-1, -2) @ X
    Ms, X = torch.stack(Ms, 2), torch.stack(Xs, 2)
    # reverse over chunks: dM_end[n] = gradient of chunk n's end state, dX_n
    dM_end, dXs = [None] * N, [None] * N
    dMC = dM.to(acc)
    for n in reversed(range(N)):
        dM_end[n] = dMC
        dX = -W[:, :, n] @ dMC - P[:, :, n].transpose(-1, -2) @ do[:, :, n]
        dXs[n] = dX
        dMC = (
            gC[:, :, n, None, None] * dMC
            + Qc[:, :, n].transpose(-1, -2) @ do[:, :, n]
            + U[:, :, n].transpose(-1, -2) @ dX
        )
    dM0 = dMC
    dM_end, dX = torch.stack(dM_end, 2), torch.stack(dXs, 2)
    # everything else is chunk-local
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    dR = torch.linalg.solve_triangular(I_A.transpose(-1, -2), dX, upper=True, unitriangular=True)
    dA = -(dR @ X.transpose(-1, -2)) * strict
    dP = -(do @ X.transpose(-1, -2)) * strict
    dv_ = -dR
    dW = -X @ dM_end.transpose(-1, -2)
    GA, GP = dA * D * eta[..., None, :], dP * D * eta[..., None, :]
    dk_ = (
        (1 + c)[..., None] * (dR @ Ms.transpose(-1, -2))
        + (eta * g)[..., None] * dW
        + GA @ k
        + GA.transpose(-1, -2) @ k
        + GP.transpose(-1, -2) @ q
    )
    dq = c[..., None] * (do @ Ms.transpose(-1, -2)) + GP @ k
    dc = ((q @ Ms) * do).sum(-1) + ((k @ Ms) * dR).sum(-1)
    wdot = (dW * k).sum(-1)
    deta = g * wdot + (dA * D * KK).sum(-2) + (dP * D * QK).sum(-2)
    dg = eta * wdot
    dgC = (Ms * dM_end).sum((-1, -2))
    dDD = dA * A + dP * P  # dD * D, since A and P carry one factor D
    dlgp = dDD.sum(-1) + dc * c
    dlg = -dDD.sum(-2) - dg * g
    dlg[..., -1] += (dg * g).sum(-1) + dgC * gC
    rev = lambda x: x.flip(-1).cumsum(-1).flip(-1)
    dla = rev(dlg) + rev(dlgp) - dlgp
    dalpha = dla / alpha
    unpad = lambda x: x.reshape(B, H, N * C, *x.shape[4:])[:, :, :L]
    return unpad(dq), unpad(dk_), unpad(dv_), unpad(dalpha), unpad(deta), dM0
