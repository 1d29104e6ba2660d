"""Block-sparse prefill attention over the paged KV cache: reference (``naive``) and Triton kernel."""

from vllm_seer.kernels.sparse_prefill.naive import (
    gather_paged,
    masks_to_block_lists,
    sparse_prefill_paged_ref,
)

__all__ = ["gather_paged", "masks_to_block_lists", "sparse_prefill_paged_ref"]
