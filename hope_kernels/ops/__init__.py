"""Public ops. Each op family lives in its own folder: reference.py (eager ground truth), triton.py (Triton
kernels), __init__.py (custom op registration + dispatcher). Compiled C++/CUDA kernels are in csrc/."""

from hope_kernels.ops.dgd import dgd_memory
from hope_kernels.ops.l1_loss import l1_rollout_loss
from hope_kernels.ops.rope_attention import rope3d, rope_attention
from hope_kernels.ops.titans import titans_memory

__all__ = ["dgd_memory", "l1_rollout_loss", "rope3d", "rope_attention", "titans_memory"]
