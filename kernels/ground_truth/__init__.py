"""Gate-distillation ground truth: block max-pooled attention probabilities.

``naive`` is the plain-PyTorch reference (``block_attn_ground_truth_ref``); ``triton`` the
FlashAttention-style kernel (``block_attn_ground_truth``, same signature), imported lazily so
installs without a usable Triton can still use the reference.
"""

from typing import Any

from vllm_seer.kernels.ground_truth.naive import (
    block_attn_ground_truth as block_attn_ground_truth_ref,
)

__all__ = ["block_attn_ground_truth", "block_attn_ground_truth_ref"]


def __getattr__(name: str) -> Any:
    if name == "block_attn_ground_truth":
        from vllm_seer.kernels.ground_truth.triton import block_attn_ground_truth

        return block_attn_ground_truth
    raise AttributeError(name)
