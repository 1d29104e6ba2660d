"""FP8 (e4m3) K/V cache and query with per-layer scales: the kernels vs the references.

Inputs are quantized as vLLM stores them (``x / scale`` in float8_e4m3fn over uint8 storage, the
cache views' strides kept), with scales far from 1 so a dropped or doubled scale fails. The
references read ``float8 * scale``; that they equal the 16/32-bit references on the dequantized
values is checked once, so the kernel comparisons pin down the semantics. Interpreter: dots in
fp32 (``tl.dot`` on bf16 is wrong there), fp16 queries; GPU: real shapes, bf16 and float8 queries.
"""

from __future__ import annotations

import math

import pytest
import torch
from _paged import (
    DEVICE,
    assert_split_ran,
    fp8_batch,
    make_batch,
    random_block_masks,
    to_fp8,
)
from vllm_seer.kernels.paged_pool import pool_k_paged_ref, pool_q_varlen_ref
from vllm_seer.kernels.sparse_prefill import masks_to_block_lists, sparse_prefill_paged_ref

from vllm_seer.rope import RopeSpec

K_SCALE, V_SCALE, Q_SCALE = 0.03, 0.015, 0.04  # stored x / scale stays below e4m3 max 448

# (seq_lens, n_new, Hq, Hkv, D, page_size, layout, block_size, density)
ATTN_CASES = {
    "ragged-chunked-gqa4-p16": ([150, 64, 97], [40, 64, 97], 4, 1, 64, 16, "token", 64, 0.5),
    "empty-request-mha-kv-view": ([128, 90, 60], [128, 0, 5], 2, 2, 64, 64, "kv", 64, 0.6),
    "vllm-nhd-rows-p64-gqa2": ([200, 70], [90, 70], 4, 2, 64, 64, "nhd", 64, 0.6),
    "cached-context-head-major-gqa3": ([200, 45], [70, 45], 3, 1, 64, 32, "head", 32, 0.5),
}
SPLIT_CASES = {  # (case, (split_blocks, capacity)): long rows in 2-block slices; capacity 5 overflows
    "split-ragged-p16": (([330, 260], [200, 260], 4, 2, 64, 16, "token", 64, 0.8), (2, 4096)),
    "split-overflow-head": (([300, 200], [150, 200], 3, 1, 64, 64, "head", 64, 0.9), (2, 5)),
}
GPU_ATTN_CASES = {
    "llama-32k-chunk-p16": ([32768, 3000], [4096, 3000], 32, 8, 128, 16, "token", 64, 0.1),
    "llama-8k-p64": ([8192], [8192], 32, 8, 128, 64, "token", 64, 0.3),
    "llama-8k-p64-vllm-nhd": ([8192, 2000], [4096, 2000], 32, 8, 128, 64, "nhd", 64, 0.3),
    "smollm-ragged-kv-view": ([4100, 777, 64], [4100, 300, 1], 9, 3, 64, 32, "kv", 64, 0.3),
}


def _attn(case: tuple, q_dtype: torch.dtype, q_fp8: bool, split: tuple[int, int] | None = None
          ) -> None:
    from vllm_seer.kernels.sparse_prefill import sparse_prefill_paged
    from vllm_seer.kernels.sparse_prefill.split import SplitWork

    lens, n_new, hq, hkv, d, page, layout, bs, dens = case
    base = make_batch(lens, n_new, hq, hkv, d, page, torch.float32, layout, DEVICE)
    base.k_cache.mul_(2.0)  # peakier softmax than unit-variance keys
    batch = fp8_batch(base, K_SCALE, V_SCALE, Q_SCALE if q_fp8 else None)
    q = batch.q if q_fp8 else batch.q.to(q_dtype)
    masks = random_block_masks(lens, n_new, hq, bs, dens, DEVICE)
    mkb = max(-(-L // bs) for L in lens) + 1
    index, count = masks_to_block_lists(masks, mkb)
    args = (q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu_seqlens_q,
            batch.seq_lens, index, count)
    dev = torch.device(DEVICE)
    scales = dict(k_scale=torch.tensor(K_SCALE, device=dev), v_scale=torch.tensor(V_SCALE,
                                                                                  device=dev))
    if q_fp8:
        scales["q_scale"] = torch.tensor([Q_SCALE], device=dev)
    scale = 1.0 / math.sqrt(d)
    out_dtype = q_dtype
    nan = torch.full(q.shape, float("nan"), dtype=out_dtype, device=dev)
    ref = sparse_prefill_paged_ref(*args, nan.clone(), scale, bs, **scales)
    work = None
    if split is not None:
        work = SplitWork.allocate(index.numel() // mkb, d, DEVICE, bs, capacity=split[1],
                                  split_blocks=split[0])
    out = nan.clone()
    got = sparse_prefill_paged(*args, out, scale, bs, work, **scales)
    assert got is out
    assert torch.isfinite(ref).all()  # every row's list holds its diagonal block
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    if work is not None:  # the split path really ran (and, with a small capacity, overflowed)
        assert_split_ran(work, count, split)


def test_references_read_float8_times_scale() -> None:
    """The references on FP8 inputs equal the 16/32-bit references on the dequantized values."""
    lens, n_new, hq, hkv, d, bs = [150, 64], [40, 64], 4, 2, 64, 64
    batch = fp8_batch(make_batch(lens, n_new, hq, hkv, d, 16, torch.float32, "kv", DEVICE),
                      K_SCALE, V_SCALE, Q_SCALE)
    deq = [c.float() * s for c, s in ((batch.q, Q_SCALE), (batch.k_cache, K_SCALE),
                                      (batch.v_cache, V_SCALE))]
    index, count = masks_to_block_lists(random_block_masks(lens, n_new, hq, bs, 0.5, DEVICE))
    tail = (batch.block_table, batch.cu_seqlens_q, batch.seq_lens, index, count)
    out = torch.zeros(batch.q.shape, device=DEVICE)
    got = sparse_prefill_paged_ref(batch.q, batch.k_cache, batch.v_cache, *tail, out.clone(),
                                   0.125, bs, q_scale=Q_SCALE, k_scale=torch.tensor(K_SCALE),
                                   v_scale=V_SCALE)
    want = sparse_prefill_paged_ref(*deq, *tail, out.clone(), 0.125, bs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    inv = RopeSpec(d, 10000.0).inv_freq().to(DEVICE)
    k_got = pool_k_paged_ref(batch.k_cache, batch.block_table, batch.seq_lens, inv,
                             torch.zeros(2, 3, hkv, 3 * d), bs, k_scale=K_SCALE)
    k_want = pool_k_paged_ref(deq[1], batch.block_table, batch.seq_lens, inv,
                              torch.zeros(2, 3, hkv, 3 * d), bs)
    torch.testing.assert_close(k_got, k_want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("q_fp8", [False, True], ids=["fp16-q", "fp8-q"])
@pytest.mark.parametrize("case", ATTN_CASES.values(), ids=ATTN_CASES.keys())
def test_sparse_prefill_fp8_kv(case: tuple, q_fp8: bool) -> None:
    _attn(case, torch.float16, q_fp8)


@pytest.mark.parametrize("case,split", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_sparse_prefill_fp8_split_rows(case: tuple, split: tuple[int, int]) -> None:
    _attn(case, torch.float16, True, split)


# (seq_lens, n_new, Hq, Hkv, D, page_size, layout, rope)
POOL_CASES = {
    "ragged-p16-token": ([150, 64, 1], [40, 64, 1], 4, 2, 64, 16, "token", True),
    "p32-head-major": ([200, 129], [1, 70], 3, 1, 64, 32, "head", True),
    "p64-kv-view-no-rope": ([128, 60, 90], [128, 5, 0], 2, 2, 64, 64, "kv", False),
}
GPU_POOL_CASES = {
    "llama-32k-chunk": ([32768, 5000], [4096, 5000], 32, 8, 128, 16, "token", True),
    "p64-kv-view": ([9000, 130], [100, 130], 8, 2, 128, 64, "kv", True),
}


def _pool(case: tuple, bs: int = 64) -> None:
    from vllm_seer.kernels.paged_pool import pool_k_paged, pool_q_varlen

    lens, n_new, hq, hkv, d, page, layout, rope = case
    batch = fp8_batch(make_batch(lens, n_new, hq, hkv, d, page, torch.float32, layout, DEVICE),
                      K_SCALE, V_SCALE, Q_SCALE)
    inv = RopeSpec(d, 500000.0).inv_freq().to(DEVICE) if rope else None
    ks = torch.tensor(K_SCALE, device=DEVICE)
    mkb = max(-(-L // bs) for L in lens) + 1
    k_ref = torch.full((len(lens), mkb, hkv, 3 * d), float("nan"), device=DEVICE)
    k_out = k_ref.clone()
    pool_k_paged_ref(batch.k_cache, batch.block_table, batch.seq_lens, inv, k_ref, bs, k_scale=ks)
    pool_k_paged(batch.k_cache, batch.block_table, batch.seq_lens, inv, k_out, bs, k_scale=ks)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-4, atol=1e-5, equal_nan=True)
    for b, L in enumerate(lens):  # every real block written, padding untouched
        assert torch.isfinite(k_out[b, :-(-L // bs)]).all()
        assert torch.isnan(k_out[b, -(-L // bs):]).all()
    mqb = max(((L - 1) // bs - (L - n) // bs + 1) if n else 0
              for L, n in zip(lens, n_new, strict=True))
    qs = torch.tensor([Q_SCALE], device=DEVICE)
    q_ref = torch.full((len(lens), mqb, hq, d), float("nan"), device=DEVICE)
    q_out = q_ref.clone()
    pool_q_varlen_ref(batch.q, batch.cu_seqlens_q, batch.seq_lens, inv, q_ref, bs, q_scale=qs)
    pool_q_varlen(batch.q, batch.cu_seqlens_q, batch.seq_lens, inv, q_out, bs, q_scale=qs)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-4, atol=1e-5, equal_nan=True)
    # the gate's one-launch pooling (its own autotuned warps), scales included, against the refs
    from vllm_seer.kernels.paged_pool import pool_qk

    k2, q2 = torch.full_like(k_ref, float("nan")), torch.full_like(q_ref, float("nan"))
    pool_qk(batch.k_cache, batch.block_table, batch.q, batch.cu_seqlens_q, batch.seq_lens, inv,
            k2, q2, bs, k_scale=ks, q_scale=qs)
    torch.testing.assert_close(k2, k_ref, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(q2, q_ref, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("case", POOL_CASES.values(), ids=POOL_CASES.keys())
def test_pool_fp8(case: tuple) -> None:
    _pool(case)


def test_fp8_inputs_refused_clearly() -> None:
    from vllm_seer.kernels.paged_pool import pool_k_paged
    from vllm_seer.kernels.sparse_prefill import sparse_prefill_paged

    batch = make_batch([70], [6], 2, 1, 64, 16, torch.float16, "token", DEVICE)
    fp8 = fp8_batch(batch, K_SCALE, V_SCALE)
    index, count = masks_to_block_lists(random_block_masks([70], [6], 2, 64, 1.0, DEVICE))
    tail = (batch.block_table, batch.cu_seqlens_q, batch.seq_lens, index, count,
            torch.empty_like(batch.q), 0.125)
    k_scale = torch.tensor(K_SCALE, device=DEVICE)
    out = torch.empty(1, 2, 1, 192, device=DEVICE)
    for fn in (sparse_prefill_paged, sparse_prefill_paged_ref):
        with pytest.raises(TypeError, match="view vLLM's FP8 storage as torch.float8_e4m3fn"):
            fn(batch.q, fp8.k_cache.view(torch.uint8), fp8.v_cache.view(torch.uint8), *tail)
        with pytest.raises(TypeError, match="float8_e4m3fn only"):
            fn(batch.q, fp8.k_cache.to(torch.float8_e5m2), fp8.v_cache.to(torch.float8_e5m2),
               *tail, k_scale=k_scale, v_scale=k_scale)
        with pytest.raises(TypeError, match="both or neither"):
            fn(batch.q, fp8.k_cache, batch.v_cache, *tail, k_scale=k_scale)
        with pytest.raises(ValueError, match="v_scale is required"):
            fn(batch.q, fp8.k_cache, fp8.v_cache, *tail, k_scale=k_scale)
        with pytest.raises(ValueError, match="k_scale is given but its input is not float8"):
            fn(batch.q, batch.k_cache, batch.v_cache, *tail, k_scale=k_scale)
    with pytest.raises(TypeError, match="float8 query needs a float8 cache"):
        sparse_prefill_paged(to_fp8(batch.q, Q_SCALE), batch.k_cache, batch.v_cache, *tail,
                             q_scale=Q_SCALE)
    with pytest.raises(ValueError, match=r"k_scale must be one fp32 value .*shape \(2,\)"):
        pool_k_paged(fp8.k_cache, batch.block_table, batch.seq_lens, None, out,
                     k_scale=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="k_scale is required"):
        pool_k_paged(fp8.k_cache, batch.block_table, batch.seq_lens, None, out)


@pytest.mark.gpu
@pytest.mark.parametrize("q_fp8", [False, True], ids=["bf16-q", "fp8-q"])
@pytest.mark.parametrize("case", GPU_ATTN_CASES.values(), ids=GPU_ATTN_CASES.keys())
def test_sparse_prefill_fp8_gpu(case: tuple, q_fp8: bool) -> None:
    _attn(case, torch.bfloat16, q_fp8)


@pytest.mark.gpu
@pytest.mark.parametrize("q_fp8", [False, True], ids=["bf16-q", "fp8-q"])
def test_sparse_prefill_fp8_split_rows_gpu(q_fp8: bool) -> None:
    # a 4k chunk over 20k of context, dense-ish lists: 128-block slices, capacity 512 overflows
    _attn(([20000, 3000], [4096, 3000], 32, 8, 128, 16, "token", 64, 0.6), torch.bfloat16,
          q_fp8, (128, 512))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_POOL_CASES.values(), ids=GPU_POOL_CASES.keys())
def test_pool_fp8_gpu(case: tuple) -> None:
    _pool(case)
