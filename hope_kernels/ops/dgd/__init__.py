"""HOPE delta-gradient-descent memory (DESIGN 4.4). Stand-in public function over the eager reference."""
from __future__ import annotations

from hope_kernels.ops.dgd.reference import dgd_memory_chunked, dgd_memory_reference

__all__ = ["dgd_memory", "dgd_memory_reference"]


def dgd_memory(q, k, v, alpha, eta, *, chunk_size, initial_state=None, output_final_state=False,
               backend="auto"):
    """q, k (B, H, L, dk), v (B, H, L, dv), alpha, eta (B, H, L) -> (o (B, H, L, dv), final_M (B, H, dk, dv) | None)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or alpha.shape != q.shape[:3] \
            or eta.shape != q.shape[:3]:
        raise ValueError(f"dgd_memory expects q, k (B, H, L, dk), v (B, H, L, dv), alpha, eta (B, H, L); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(alpha.shape)}, {tuple(eta.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return dgd_memory_chunked(q, k, v, alpha, eta, chunk_size=chunk_size, initial_state=initial_state,
                              output_final_state=output_final_state)
