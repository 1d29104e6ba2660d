"""The pooled-key cache (setting ``pooled_key_cache``) in the CUDA backend.

:mod:`vllm_seer.kernels.paged_pool.key_cache` holds one entry per gate block of KV-cache slots,
so its size follows the KV cache, which vLLM sizes only after its profiling run from what that
run left free. To have vLLM count the cache, its memory is reserved *in* the profiling run
(:func:`reserve`, from the start-up warm-up): the share of vLLM's memory budget that a KV cache
filling the rest would need, computed from the budget still free at that point (which is at least
what the KV cache gets: the rest of the profiling run only adds to vLLM's non-KV memory), so the
reserve is never short; its surplus is the cache's share of the profiling run's activation peak.
Once the KV cache exists, :func:`ensure` lays the entries out in the reserve.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_seer.config import SeerConfigError
from vllm_seer.kernels.paged_pool.key_cache import (
    PooledKeyCache,
    bytes_per_slot,
    entry_bytes,
    entry_tokens,
    reserve_bytes,
)

logger = logging.getLogger(__name__)


def check_pages(page_sizes: list[int], block_size: int) -> None:
    """At start-up: every page size vLLM may pick must divide the gate block size or be a
    multiple of it. Raises :class:`SeerConfigError` naming the setting."""
    for page in page_sizes:
        try:
            entry_tokens(page, block_size)
        except ValueError as e:
            raise SeerConfigError(f"seer setting 'pooled_key_cache': {e}") from e


def reserve(rt: Any, cache_config: Any, page_sizes: list[int], kv_element_bytes: int,
            device: torch.device) -> None:
    """In vLLM's profiling run: hold the cache's memory (``rt.key_cache_reserve``, flat uint8) so
    that vLLM's KV-cache sizing counts it; nothing when the setting is off or already done."""
    if not rt.config.pooled_key_cache or rt.key_cache_reserve is not None:
        return
    layers = len(rt.sparse_layers)
    kv_per_slot = len(rt.stage.layers) * 2 * rt.num_kv_heads * rt.head_dim * kv_element_bytes
    cache_per_slot = max(bytes_per_slot(layers, page, rt.block_size, rt.num_kv_heads, rt.head_dim)
                         for page in page_sizes)  # smallest page: the most entries
    row = layers * entry_bytes(rt.num_kv_heads, rt.head_dim)  # one entry, every layer
    fixed = getattr(cache_config, "kv_cache_memory_bytes", None)
    if fixed:  # --kv-cache-memory-bytes: the KV cache's size is given, vLLM's budget unused
        size = reserve_bytes(fixed + int(fixed * cache_per_slot / kv_per_slot), kv_per_slot,
                             cache_per_slot, row)
    else:
        total = torch.cuda.mem_get_info(device)[1]
        budget = int(float(cache_config.gpu_memory_utilization) * total)
        budget -= torch.cuda.memory_allocated(device)
        if budget <= 0:
            raise RuntimeError(f"Seer backend: no memory left for the pooled-key cache "
                               f"('pooled_key_cache') within --gpu-memory-utilization "
                               f"{cache_config.gpu_memory_utilization} after the model weights")
        size = reserve_bytes(budget, kv_per_slot, cache_per_slot, row)
    rt.key_cache_reserve = torch.empty(size, dtype=torch.uint8, device=device)
    logger.info("Seer pooled-key cache: %.1f MiB reserved in the profiling run (%.2f%% of the KV "
                "cache's bytes per token, %d sparse layers)", size / 2**20,
                100 * cache_per_slot / kv_per_slot, layers)


def ensure(rt: Any, k_cache: torch.Tensor) -> None:
    """Lay the cache out in the reserve for ``k_cache`` ``[P, page, Hkv, D]`` (the first forward
    after vLLM allocated its KV cache); a no-op once done or without a reserve."""
    if rt.key_cache is not None or rt.key_cache_reserve is None:
        return
    pages, page = int(k_cache.shape[0]), int(k_cache.shape[1])
    rt.key_cache = PooledKeyCache.from_storage(rt.key_cache_reserve, len(rt.sparse_layers),
                                               pages * page, page, rt.block_size,
                                               rt.num_kv_heads, rt.head_dim)
    # a step under way (its builder ran before the cache existed): nothing is valid yet, so its
    # writes need no invalidation, only a stamp for what it stores
    rt.key_cache.begin_step(k_cache.new_zeros(0, dtype=torch.int64))
    logger.info("Seer pooled-key cache: %d entries of %d slots, %.1f of %.1f MiB reserved",
                rt.key_cache.data.shape[1], rt.key_cache.entry_tokens,
                rt.key_cache.nbytes / 2**20, rt.key_cache_reserve.numel() / 2**20)
