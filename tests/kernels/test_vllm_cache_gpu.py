"""The kernels over a KV cache that vLLM itself allocated and wrote (GPU test host, vLLM bundle).

vLLM's FlashAttention backend gives the cache shape (and physical stride order), its
``reshape_and_cache_flash`` op writes K/V through a slot mapping derived from the block table, and
the Seer kernels then read it through :func:`vllm_seer.backend.compat.cuda_kv_views`. References run
on the same K/V written by the tests' own builder (``_paged.make_batch``); unwritten cache slots
are NaN, so a read outside a request's tokens shows up. With ``--kv-cache-dtype fp8`` vLLM writes
``x / scale`` as e4m3 into a uint8 cache; the kernels read it through the backend's own view and
scale functions, against the reference on the same cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from _paged import make_batch, random_block_masks, to_fp8

pytestmark = pytest.mark.gpu


def _vllm_cache(batch, hkv: int, d: int, page: int, dtype: torch.dtype, cache_dtype: str = "auto",
                k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """The cache vLLM allocates (``dtype``: uint8 for FP8, filled with e4m3 NaN) and writes."""
    from vllm import _custom_ops as ops
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    n_pages = batch.k_cache.shape[0]
    with set_current_vllm_config(VllmConfig()):  # the backend reads the cache layout setting
        shape = FlashAttentionBackend.get_kv_cache_shape(n_pages, page, hkv, d)
        try:
            order = tuple(FlashAttentionBackend.get_kv_cache_stride_order())
        except (AttributeError, NotImplementedError):
            order = tuple(range(len(shape)))
    nan = 0x7F if dtype == torch.uint8 else float("nan")  # 0x7f: NaN in float8_e4m3fn
    physical = torch.full([shape[i] for i in order], nan, dtype=dtype, device="cuda")
    kv = physical.permute(*[order.index(i) for i in range(len(shape))])  # logical view
    # the views FlashAttentionImpl.forward hands to the cache writer, as that impl makes them
    if kv.dim() == 4:  # vLLM 0.26: K and V packed in the last dim, logical [blocks, Hkv, page, 2D]
        key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)
    elif kv.dim() == 5:  # the older layout [2, blocks, page, Hkv, D]
        key_cache, value_cache = kv.unbind(0)
    else:
        raise AssertionError(f"this vLLM's FlashAttention cache is {tuple(shape)}: a layout "
                             "vllm_seer.backend.compat.cuda_kv_views does not know")
    for b, L in enumerate(batch.seq_lens.tolist()):
        t = torch.arange(L, device="cuda")
        slots = batch.block_table[b, t // page].long() * page + t % page
        k = batch.k_cache.reshape(-1, hkv, d)[slots]
        v = batch.v_cache.reshape(-1, hkv, d)[slots]
        ks = torch.tensor(k_scale, dtype=torch.float32, device="cuda")
        vs = torch.tensor(v_scale, dtype=torch.float32, device="cuda")
        ops.reshape_and_cache_flash(k, v, key_cache, value_cache, slots, cache_dtype, ks, vs)
    return kv


@pytest.mark.parametrize("page", [16, 64])
def test_kernels_read_the_cache_vllm_wrote(page: int) -> None:
    from vllm_seer.kernels.paged_pool import pool_k_paged, pool_k_paged_ref
    from vllm_seer.kernels.sparse_prefill import (
        masks_to_block_lists,
        sparse_prefill_paged,
        sparse_prefill_paged_ref,
    )

    from vllm_seer.backend.compat import cuda_kv_views
    from vllm_seer.rope import RopeSpec

    lens, n_new, hq, hkv, d, bs = [5000, 1300], [1200, 1300], 32, 8, 128, 64
    dtype = torch.bfloat16
    batch = make_batch(lens, n_new, hq, hkv, d, page, dtype, "token", "cuda")
    kv = _vllm_cache(batch, hkv, d, page, dtype)
    k_cache, v_cache = cuda_kv_views(kv, d)
    assert k_cache.shape == batch.k_cache.shape

    inv = RopeSpec(d, 500000.0).inv_freq().cuda()
    mkb = max(-(-L // bs) for L in lens)
    k_ref = torch.full((len(lens), mkb, hkv, 3 * d), float("nan"), device="cuda")
    k_out = k_ref.clone()
    pool_k_paged_ref(batch.k_cache, batch.block_table, batch.seq_lens, inv, k_ref, bs)
    pool_k_paged(k_cache, batch.block_table, batch.seq_lens, inv, k_out, bs)
    for b, L in enumerate(lens):  # each request's blocks; past them both stay NaN (untouched)
        nkb = -(-L // bs)
        torch.testing.assert_close(k_out[b, :nkb], k_ref[b, :nkb], rtol=1e-4, atol=1e-4)
        assert k_out[b, nkb:].isnan().all()

    index, count = masks_to_block_lists(random_block_masks(lens, n_new, hq, bs, 0.3, "cuda"), mkb)
    args = (batch.block_table, batch.cu_seqlens_q, batch.seq_lens, index, count)
    scale = 1.0 / math.sqrt(d)
    ref = sparse_prefill_paged_ref(batch.q, batch.k_cache, batch.v_cache, *args,
                                   torch.full_like(batch.q, float("nan")), scale, bs)
    out = sparse_prefill_paged(batch.q, k_cache, v_cache, *args,
                               torch.full_like(batch.q, float("nan")), scale, bs)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("q_fp8", [False, True], ids=["bf16-q", "fp8-q"])
@pytest.mark.parametrize("page", [16, 64])
def test_kernels_read_the_fp8_cache_vllm_wrote(page: int, q_fp8: bool) -> None:
    """``--kv-cache-dtype fp8``: the backend's views (``compat.cuda_kv_views(..., fp8)``) and scale
    tensors (``cuda.fp8_scales`` on the layer's ``_q/_k/_v_scale``) feed the kernels, which match
    the reference on the same cache; the dequantized cache is what was written, to e4m3 rounding."""
    from types import SimpleNamespace

    from vllm_seer.kernels.paged_pool import pool_k_paged, pool_k_paged_ref
    from vllm_seer.kernels.sparse_prefill import (
        gather_paged,
        masks_to_block_lists,
        sparse_prefill_paged,
        sparse_prefill_paged_ref,
    )

    from vllm_seer.backend.compat import cuda_kv_views, fp8_cache_dtype
    from vllm_seer.backend.cuda import fp8_scales
    from vllm_seer.rope import RopeSpec

    lens, n_new, hq, hkv, d, bs = [5000, 1300], [1200, 1300], 32, 8, 128, 64
    k_scale, v_scale, q_scale = 0.02, 0.015, 0.03  # x / scale below e4m3 max 448
    batch = make_batch(lens, n_new, hq, hkv, d, page, torch.bfloat16, "token", "cuda")
    kv = _vllm_cache(batch, hkv, d, page, torch.uint8, "fp8", k_scale, v_scale)
    k_cache, v_cache = cuda_kv_views(kv, d, fp8_cache_dtype("fp8"))
    assert k_cache.dtype == torch.float8_e4m3fn and k_cache.shape == batch.k_cache.shape
    for b, L in enumerate(lens):  # vLLM stored x / scale in e4m3 (3 mantissa bits)
        for cache, ref, s in ((k_cache, batch.k_cache, k_scale), (v_cache, batch.v_cache,
                                                                     v_scale)):
            got = gather_paged(cache, batch.block_table[b], L).float() * s
            want = gather_paged(ref, batch.block_table[b], L).float()
            torch.testing.assert_close(got, want, rtol=2 ** -3, atol=2 * s * 2 ** -9)
    layer = SimpleNamespace(**{f"_{n}_scale": torch.tensor(x, device="cuda")
                               for n, x in (("q", q_scale), ("k", k_scale), ("v", v_scale))})
    q = to_fp8(batch.q, q_scale) if q_fp8 else batch.q
    scales = fp8_scales(layer, q, fp8_cache_dtype("fp8"))
    assert (scales["q_scale"] is not None) == q_fp8

    inv = RopeSpec(d, 500000.0).inv_freq().cuda()
    mkb = max(-(-L // bs) for L in lens)
    k_ref = torch.full((len(lens), mkb, hkv, 3 * d), float("nan"), device="cuda")
    k_out = k_ref.clone()
    pool_k_paged_ref(k_cache, batch.block_table, batch.seq_lens, inv, k_ref, bs,
                     k_scale=scales["k_scale"])
    pool_k_paged(k_cache, batch.block_table, batch.seq_lens, inv, k_out, bs,
                 k_scale=scales["k_scale"])
    torch.testing.assert_close(k_out, k_ref, rtol=1e-4, atol=1e-4, equal_nan=True)

    index, count = masks_to_block_lists(random_block_masks(lens, n_new, hq, bs, 0.3, "cuda"), mkb)
    args = (q, k_cache, v_cache, batch.block_table, batch.cu_seqlens_q, batch.seq_lens, index,
            count)
    nan = torch.full(q.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    scale = 1.0 / math.sqrt(d)
    ref = sparse_prefill_paged_ref(*args, nan.clone(), scale, bs, **scales)
    out = sparse_prefill_paged(*args, nan.clone(), scale, bs, **scales)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
