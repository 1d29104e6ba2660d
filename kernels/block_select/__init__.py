"""Gate scores and block selection: reference (``naive``) and Triton (``triton``)."""

from vllm_seer.kernels.block_select.naive import block_select_ref

__all__ = ["block_select", "block_select_ref"]


def __getattr__(name: str):
    # the Triton kernels load lazily: triton is an optional dependency (extra ``triton``)
    if name == "block_select":
        from vllm_seer.kernels.block_select.triton import block_select

        return block_select
    raise AttributeError(name)
