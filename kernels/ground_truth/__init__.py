"""Gate-distillation ground truth: block max-pooled attention probabilities.

``naive`` is the plain-PyTorch reference; ``triton`` the FlashAttention-style kernel
(imported lazily so CPU-only installs without Triton can still use the reference).
"""

from vllm_seer.kernels.ground_truth.naive import (
    block_attn_ground_truth as block_attn_ground_truth_ref,
)

__all__ = ["block_attn_ground_truth_ref"]
