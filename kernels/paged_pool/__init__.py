"""Gate pooling: K ``[max | min | avg]`` from the paged cache and Q ``avg``, RoPE undone."""

from vllm_seer.kernels.paged_pool.naive import pool_k_paged_ref, pool_q_varlen_ref, pool_qk_ref

__all__ = ["pool_k_paged", "pool_k_paged_ref", "pool_q_varlen", "pool_q_varlen_ref", "pool_qk",
           "pool_qk_ref"]


def __getattr__(name: str):
    # Triton kernels load lazily: triton is an optional dependency (extra ``triton``)
    if name in ("pool_k_paged", "pool_q_varlen", "pool_qk"):
        from vllm_seer.kernels.paged_pool import triton as _triton

        return getattr(_triton, name)
    raise AttributeError(name)
