"""Public ops. Each op family lives in its own folder: reference.py (eager ground truth), triton.py (Triton
kernels), __init__.py (custom op registration + dispatcher). Compiled C++/CUDA kernels are in csrc/."""
from hope_kernels.ops.l1_loss import l1_rollout_loss

__all__ = ["l1_rollout_loss"]
from hope_kernels.ops.rope_attention import rope3d, rope_attention

__all__ += ["rope_attention", "rope3d"]
