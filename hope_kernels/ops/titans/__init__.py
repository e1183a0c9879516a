"""Titans chunked momentum memory (DESIGN 4.3). Stand-in public function over the eager reference."""
from __future__ import annotations

from hope_kernels.ops.titans.reference import titans_memory_reference

__all__ = ["titans_memory", "titans_memory_reference"]


def titans_memory(q, k, v, alpha, eta, theta, *, chunk_size, memory="linear", initial_state=None,
                  output_final_state=False, backend="auto"):
    """q, k (B, H, L, dk), v (B, H, L, dv), alpha, eta, theta (B, H, L) -> (o (B, H, L, dv), (W, S) | None)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return titans_memory_reference(q, k, v, alpha, eta, theta, chunk_size=chunk_size, memory=memory,
                                   initial_state=initial_state, output_final_state=output_final_state)
