"""Triton block-sparse prefill vs the plain-PyTorch reference over the paged cache."""

from __future__ import annotations

import math

import pytest
import torch
from _paged import DEVICE, assert_split_ran, make_batch, random_block_masks
from vllm_seer.kernels.sparse_prefill import masks_to_block_lists, sparse_prefill_paged_ref

# (seq_lens, n_new, Hq, Hkv, D, page_size, layout, block_size, density)
CPU_CASES = {
    "ragged-chunked-gqa4-p16": ([150, 64, 97], [40, 64, 97], 4, 1, 64, 16, "token", 64, 0.5),
    "one-query-token-head-major": ([200, 129], [1, 70], 3, 1, 64, 32, "head", 64, 0.3),
    "empty-request-mha-kv-view": ([128, 90, 60], [128, 0, 5], 2, 2, 64, 64, "kv", 64, 0.6),
    "d128-p128-gqa8": ([190], [130], 8, 1, 128, 128, "token", 64, 0.4),
    "gqa3-small-blocks": ([100, 45], [70, 45], 3, 1, 64, 16, "head", 32, 0.5),
}

GPU_CASES = {
    "llama-8k-chunk": ([8192, 3000], [2048, 3000], 32, 8, 128, 16, "token", 64, 0.2),
    "smollm-ragged": ([4100, 777, 64], [4100, 300, 1], 9, 3, 64, 32, "token", 64, 0.3),
    "head-major-p128": ([2500, 1100], [700, 1100], 8, 2, 128, 128, "head", 64, 0.5),
    "kv-view-mha-p64": ([1000], [999], 4, 4, 64, 64, "kv", 64, 1.0),
}


def _run(case: tuple, dtype: torch.dtype, max_kblocks_pad: int = 0,
         split: tuple[int, int] | None = None, **kernel_kw) -> None:
    """``split``: ``(split_blocks, capacity)`` of the long-row workspace (default: the kernel's);
    ``kernel_kw``: the kernel's ``tma`` / ``band`` options."""
    from vllm_seer.kernels.sparse_prefill import sparse_prefill_paged
    from vllm_seer.kernels.sparse_prefill.split import SplitWork

    lens, n_new, hq, hkv, d, page, layout, bs, dens = case
    batch = make_batch(lens, n_new, hq, hkv, d, page, dtype, layout, DEVICE)
    masks = random_block_masks(lens, n_new, hq, bs, dens, DEVICE)
    mkb = max(-(-L // bs) for L in lens) + max_kblocks_pad
    index, count = masks_to_block_lists(masks, mkb)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu_seqlens_q,
            batch.seq_lens, index, count)
    scale = 1.0 / math.sqrt(d)
    ref = sparse_prefill_paged_ref(*args, torch.full_like(batch.q, float("nan")), scale, bs)
    out = torch.full_like(batch.q, float("nan"))
    work = None
    if split is not None:
        work = SplitWork.allocate(index.numel() // mkb, d, DEVICE, bs, capacity=split[1],
                                  split_blocks=split[0])
    got = sparse_prefill_paged(*args, out, scale, bs, work=work, **kernel_kw)
    assert got is out
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    if work is not None:  # the split path really ran (and, with a small capacity, overflowed)
        assert_split_ran(work, count, split)


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_sparse_prefill_matches_reference(case: tuple) -> None:
    _run(case, torch.float16, max_kblocks_pad=1)


# long rows split into slices of 2 key blocks (merged by the combine kernel); with capacity 5 only
# the first rows fit and the others run whole in one program
SPLIT_CASES = {
    "split-ragged-chunked-p16": (([330, 64, 260], [200, 64, 260], 4, 2, 64, 16, "token", 64, 0.8),
                                 (2, 4096)),
    "split-overflow-p64-head": (([300, 200], [150, 200], 3, 1, 64, 64, "head", 64, 0.9), (2, 5)),
    "split-p128-small-blocks": (([260], [100], 2, 1, 64, 128, "kv", 32, 0.7), (3, 4096)),
}


@pytest.mark.parametrize("case,split", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_sparse_prefill_split_rows(case: tuple, split: tuple[int, int]) -> None:
    _run(case, torch.float16, split=split)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_prefill_split_rows_gpu(dtype: torch.dtype) -> None:
    # a 4k chunk over 20k of context, dense-ish lists: long rows split into 128-block slices,
    # capacity 512 (some rows overflow and run whole)
    _run(([20000, 3000], [4096, 3000], 32, 8, 128, 16, "token", 64, 0.6), dtype, split=(128, 512))


# token-major pages of 64 / 128 with a power-of-two head dim: TMA boxes (auto) or pointers
TMA_CASES = {
    "ragged-chunked-p64-gqa2": ([200, 64, 131], [90, 64, 131], 4, 2, 64, 64, "token", 64, 0.5),
    "d128-p128-gqa4": ([260], [140], 4, 1, 128, 128, "token", 64, 0.6),
    "vllm-nhd-kv-rows-p64": ([200, 131], [90, 131], 4, 2, 64, 64, "nhd", 64, 0.5),
}


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("case", TMA_CASES.values(), ids=TMA_CASES.keys())
def test_sparse_prefill_tma_and_pointer_loads(case: tuple, tma: bool) -> None:
    _run(case, torch.float16, max_kblocks_pad=1, tma=tma)


def test_sparse_prefill_tma_refuses_other_layouts() -> None:
    from vllm_seer.kernels.sparse_prefill.triton import tma_descriptors

    for layout, page in (("head", 64), ("kv", 64), ("token", 16)):
        b = make_batch([100], [100], 2, 2, 64, page, torch.float16, layout, DEVICE)
        assert tma_descriptors(b.k_cache, b.v_cache, 64) is None, (layout, page)
    with pytest.raises(ValueError, match="tma=True"):
        _run(([100], [100], 2, 1, 64, 16, "token", 64, 1.0), torch.float16, tma=True)


# program orders: band 0 (query block slowest across all heads) and KV-head-major bands of query
# blocks (band 1: every row its own band; 2 and 3: bands cut the
# ragged requests' blocks unevenly, the last band shorter), with split rows and GQA
@pytest.mark.parametrize("band", [0, 1, 2, 3])
def test_sparse_prefill_banded_order(band: int) -> None:
    _run(([330, 64, 260], [200, 64, 260], 6, 2, 64, 64, "token", 64, 0.8), torch.float16,
         split=(2, 4096), band=band)


def test_sparse_prefill_bf16_dense_row() -> None:
    # bf16 in (the interpreter computes the dots in fp32), dense causal lists
    _run(([130], [130], 2, 1, 64, 16, "token", 64, 1.0), torch.bfloat16)


def test_sparse_prefill_leaves_foreign_rows() -> None:
    from vllm_seer.kernels.sparse_prefill import sparse_prefill_paged

    batch = make_batch([70], [6], 2, 1, 64, 16, device=DEVICE)
    index, count = masks_to_block_lists(random_block_masks([70], [6], 2, 64, 1.0, DEVICE))
    out = torch.full((10, 2, 64), 7.0, dtype=batch.q.dtype, device=DEVICE)
    sparse_prefill_paged(batch.q, batch.k_cache, batch.v_cache, batch.block_table,
                         batch.cu_seqlens_q, batch.seq_lens, index, count, out[:6], 0.125)
    assert torch.isfinite(out[:6]).all()
    assert (out[6:] == 7.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_sparse_prefill_gpu(case: tuple, dtype: torch.dtype) -> None:
    _run(case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("band", [0, 64])
@pytest.mark.parametrize("tma", [True, False])
def test_sparse_prefill_tma_band_gpu(tma: bool, band: int) -> None:
    # Llama shapes over 64-token pages (the CUDA backend's default) in vLLM's packed K|V rows, a
    # chunk over 12k of context
    _run(([12288, 3000], [4096, 3000], 32, 8, 128, 64, "nhd", 64, 0.2), torch.bfloat16,
         tma=tma, band=band)


def test_sparse_prefill_lists_without_diagonal() -> None:
    """Rows whose list lacks the diagonal block (every entry is a full past block) and empty rows."""
    lens, n_new, hq, bs = [200, 130], [140, 130], 2, 64
    batch = make_batch(lens, n_new, hq, 1, 64, 16, torch.float16, "token", DEVICE)
    masks = random_block_masks(lens, n_new, hq, bs, 0.7, DEVICE)
    for L, n, m in zip(lens, n_new, masks, strict=True):
        qb = (L - n) // bs + torch.arange(m.shape[1], device=DEVICE)
        m[0, torch.arange(m.shape[1], device=DEVICE), qb] = False  # head 0: no diagonal
    masks[1][1, 0] = False  # an empty row: written as zeros
    index, count = masks_to_block_lists(masks, max(-(-L // bs) for L in lens))
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu_seqlens_q,
            batch.seq_lens, index, count)
    from vllm_seer.kernels.sparse_prefill import sparse_prefill_paged

    ref = sparse_prefill_paged_ref(*args, torch.full_like(batch.q, float("nan")), 0.125, bs)
    out = sparse_prefill_paged(*args, torch.full_like(batch.q, float("nan")), 0.125, bs)
    live = torch.isfinite(ref)  # the reference leaves rows without any key as NaN
    torch.testing.assert_close(out.float()[live], ref.float()[live], rtol=2e-2, atol=2e-2)
    assert (out[~live] == 0).all() and (~live).any()
