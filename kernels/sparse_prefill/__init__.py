"""Block-sparse prefill attention over the paged KV cache: reference (``naive``) and Triton."""

from vllm_seer.kernels.sparse_prefill.naive import (
    gather_paged,
    masks_to_block_lists,
    sparse_prefill_paged_ref,
)

__all__ = [
    "gather_paged", "masks_to_block_lists", "sparse_prefill_paged", "sparse_prefill_paged_ref",
]


def __getattr__(name: str):
    # the Triton kernel is imported lazily: triton is an optional dependency (extra ``triton``)
    if name == "sparse_prefill_paged":
        from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged

        return sparse_prefill_paged
    raise AttributeError(name)
