"""FP8 KV cache on the CPU reference path: dequantize only the pages a step's Seer requests read.

vLLM stores an FP8 cache as uint8 (``--kv-cache-dtype fp8`` / ``fp8_e4m3`` / ``fp8_e5m2``) holding
``x / scale`` in float8, with one K and one V scale per layer (``Attention._k_scale_float``). The gate
must pool, and the sparse attention read, ``float8 * scale``: this module gathers the pages referenced
by the step's block table once per layer, dequantizes them to fp32 and remaps the table onto them.
"""

from __future__ import annotations

import torch


def dequantize_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, fp8: torch.dtype, k_scale: float, v_scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pages the requests use, dequantized.

    Args:
        k_cache, v_cache: ``[num_pages, page, Hkv, D]`` uint8 views of vLLM's cache (strided).
        block_table: ``[R, max_pages]`` int32 page ids of the requests.
        seq_lens: ``[R]`` int32 tokens per request (pages past them are not read).
        fp8: the float8 dtype the bytes encode (:func:`vllm_seer.backend.compat.fp8_cache_dtype`).
        k_scale, v_scale: vLLM's per-layer scales.
    Returns:
        (``[P, page, Hkv, D]`` fp32 K, same V, ``[R, max_pages]`` int32 table into them; entries past
        a request's pages point at page 0).
    """
    if k_cache.dtype != torch.uint8 or v_cache.dtype != torch.uint8:
        raise TypeError(f"FP8 KV cache views must be uint8, got {k_cache.dtype} / {v_cache.dtype}")
    page = k_cache.shape[1]
    dev = block_table.device
    n_pages = (seq_lens.to(torch.int64) + page - 1) // page  # [R]
    used = torch.arange(block_table.shape[1], device=dev)[None, :] < n_pages[:, None]
    ids = block_table.to(torch.int64)[used]
    uniq, local = torch.unique(ids, return_inverse=True)
    k = k_cache.index_select(0, uniq).contiguous().view(fp8).to(torch.float32) * k_scale
    v = v_cache.index_select(0, uniq).contiguous().view(fp8).to(torch.float32) * v_scale
    table = torch.zeros_like(block_table)
    table[used] = local.to(block_table.dtype)
    return k, v, table
