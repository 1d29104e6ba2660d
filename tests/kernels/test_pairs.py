"""128-row pair tiles: the Triton planner vs its reference, and the sparse prefill with pairs vs
the plain-PyTorch attention reference (NaN-filled outputs: an unwritten element fails)."""

from __future__ import annotations

import math

import pytest
import torch
from _paged import DEVICE, assert_split_ran, make_batch, overlapping_block_masks
from vllm_seer.kernels.sparse_prefill import masks_to_block_lists, sparse_prefill_paged_ref
from vllm_seer.kernels.sparse_prefill.pairs_naive import PairWork, plan_pairs_ref


def _lists(lens, n_new, hq, bs, dens, flip, pad=0):
    masks = overlapping_block_masks(lens, n_new, hq, bs, dens, flip, DEVICE)
    return masks_to_block_lists(masks, max(-(-L // bs) for L in lens) + pad)


def _taken(work: PairWork, pairs: int) -> torch.Tensor:
    return work.union_count[:pairs] > 0


@pytest.mark.parametrize("list_cap,ratio,flip", [(4, 1.25, 0.15), (8, 1.6, 0.15), (16, 1.1, 0.03)])
def test_plan_pairs_matches_reference(list_cap: int, ratio: float, flip: float) -> None:
    from vllm_seer.kernels.sparse_prefill.pairs import plan_pairs

    # ragged: an odd number of query blocks, a chunk starting mid-block, an empty request, and
    # lists longer than list_cap (never taken)
    lens, n_new, hq, bs = [300, 90, 70, 260], [230, 90, 0, 130], 3, 32
    index, count = _lists(lens, n_new, hq, bs, 0.3, flip, pad=1)
    cu = torch.tensor([0, *n_new], device=DEVICE).cumsum(0).to(torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    bsz, _, mqb, _ = index.shape
    got = PairWork.allocate(bsz * hq, mqb, DEVICE, list_cap, ratio)
    ref = PairWork.allocate(bsz * hq, mqb, DEVICE, list_cap, ratio)
    for w in (got, ref):
        w.union.fill_(-7)
        w.paired.fill_(-7)
    plan_pairs(index, count, cu, seq, got, bs)
    plan_pairs_ref(index.cpu(), count.cpu(), cu.cpu(), seq.cpu(), ref, bs)
    torch.testing.assert_close(got.union_count.cpu(), ref.union_count.cpu())
    torch.testing.assert_close(got.paired.cpu(), ref.paired.cpu())
    taken = _taken(ref, ref.union_count.numel()).cpu()
    for pr in taken.nonzero().flatten().tolist():
        u = int(ref.union_count[pr])
        torch.testing.assert_close(got.union[pr, :u].cpu(), ref.union[pr, :u].cpu())
    # both outcomes occur, and every taken pair obeys the rule
    assert taken.any() and (~taken).any()
    assert (count.flatten().cpu()[ref.paired.cpu() > 0] <= list_cap).all()


def test_plan_pairs_reference_unions() -> None:
    """The reference's union of two known lists, with its flags."""
    index = torch.full((1, 1, 2, 6), -1, dtype=torch.int32)
    index[0, 0, 0, :3] = torch.tensor([0, 2, 4])
    index[0, 0, 1, :4] = torch.tensor([0, 3, 4, 5])
    count = torch.tensor([[[3, 4]]], dtype=torch.int32)
    cu, seq = torch.tensor([0, 128], dtype=torch.int32), torch.tensor([384], dtype=torch.int32)
    w = PairWork.allocate(1, 2, "cpu", 4, 1.5)
    plan_pairs_ref(index, count, cu, seq, w, 64)
    assert w.union_count.tolist() == [5] and w.paired.tolist() == [1, 1]
    assert w.union[0, :5].tolist() == [0 * 4 + 3, 2 * 4 + 1, 3 * 4 + 2, 4 * 4 + 3, 5 * 4 + 2]
    w = PairWork.allocate(1, 2, "cpu", 4, 1.4)  # 2 * 5 > 1.4 * 7: not taken
    plan_pairs_ref(index, count, cu, seq, w, 64)
    assert w.union_count.tolist() == [0] and w.paired.tolist() == [0, 0]


def test_pair_work_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="list_cap=6"):
        PairWork.allocate(2, 4, "cpu", 6)
    with pytest.raises(ValueError, match="max_ratio=0.9"):
        PairWork.allocate(2, 4, "cpu", 8, 0.9)
    with pytest.raises(ValueError, match="holds 2 pairs"):
        PairWork.allocate(1, 4, "cpu", 8).check(2, 4)


def _run(case: tuple, dtype: torch.dtype, list_cap: int = 8, ratio: float = 1.5,
         split: tuple[int, int] | None = None, **kernel_kw) -> PairWork:
    from vllm_seer.kernels.sparse_prefill import sparse_prefill_paged
    from vllm_seer.kernels.sparse_prefill.split import SplitWork

    lens, n_new, hq, hkv, d, page, layout, bs, dens, flip = case
    batch = make_batch(lens, n_new, hq, hkv, d, page, dtype, layout, DEVICE)
    index, count = _lists(lens, n_new, hq, bs, dens, flip)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu_seqlens_q,
            batch.seq_lens, index, count)
    scale = 1.0 / math.sqrt(d)
    ref = sparse_prefill_paged_ref(*args, torch.full_like(batch.q, float("nan")), scale, bs)
    bsz, _, mqb, mkb = index.shape
    pairs = PairWork.allocate(bsz * hq, mqb, DEVICE, list_cap, ratio)
    work = None
    if split is not None:
        work = SplitWork.allocate(index.numel() // mkb, d, DEVICE, bs, capacity=split[1],
                                  split_blocks=split[0])
    out = torch.full_like(batch.q, float("nan"))
    sparse_prefill_paged(*args, out, scale, bs, work=work, pairs=pairs, **kernel_kw)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    taken = _taken(pairs, bsz * hq * -(-mqb // 2))
    assert taken.any() and (~taken).any()  # both tiles ran
    if work is not None:
        assert_split_ran(work, count.flatten().masked_fill(pairs.paired[:count.numel()] > 0, 0),
                         split)
    return pairs


# (seq_lens, n_new, Hq, Hkv, D, page_size, layout, block_size, density, flip)
CPU_CASES = {
    "ragged-chunked-gqa2-p16": ([330, 64, 200], [200, 64, 131], 4, 2, 64, 16, "token", 32, 0.4,
                                0.1),
    "head-major-p32-mha": ([260, 97], [260, 40], 2, 2, 64, 32, "head", 32, 0.5, 0.2),
    "tma-nhd-p64-gqa4": ([300, 131], [170, 131], 4, 1, 64, 64, "nhd", 64, 0.5, 0.1),
}


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_sparse_prefill_pairs_match_reference(case: tuple) -> None:
    _run(case, torch.float16)


@pytest.mark.parametrize("band", [0, 1, 3])
def test_sparse_prefill_pairs_with_split_rows(band: int) -> None:
    # split rows (lists > 3 blocks) beside pairs: the split plan never slices a paired row
    _run(([400, 150], [300, 150], 4, 2, 64, 16, "token", 32, 0.6, 0.1), torch.float16,
         list_cap=16, split=(3, 4096), band=band)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_prefill_pairs_gpu(dtype: torch.dtype, tma: bool) -> None:
    # Llama shapes: a 4k chunk over 12k of context in vLLM's packed K|V rows on 64-token pages,
    # a second request prefilled whole; pairs of lists up to 32 entries, rows over 40 entries
    # split into 40-block slices (their lists reach ~57 entries: some rows find the 512 slots
    # full and run whole)
    _run(([12288, 3000], [4096, 3000], 32, 8, 128, 64, "nhd", 64, 0.1, 0.15), dtype,
         list_cap=32, ratio=1.25, split=(40, 512), tma=tma)


@pytest.mark.gpu
def test_sparse_prefill_pairs_gpu_pointer_pages() -> None:
    _run(([9000, 777], [2048, 700], 9, 3, 64, 16, "token", 64, 0.2, 0.1), torch.bfloat16,
         list_cap=128, ratio=1.3)


@pytest.mark.parametrize("q_fp8", [False, True])
def test_sparse_prefill_pairs_fp8_cache(q_fp8: bool) -> None:
    """Pair tiles over a float8 cache (and a float8 query): the scales fold as in the 64-row
    kernel (v_scale once on the accumulator)."""
    from _paged import fp8_batch
    from vllm_seer.kernels.sparse_prefill import sparse_prefill_paged

    k_s, v_s, q_s = 0.03, 0.015, 0.04
    lens, n_new, hq, hkv, d, page, layout, bs = [260, 131], [200, 131], 4, 2, 64, 64, "nhd", 32
    base = make_batch(lens, n_new, hq, hkv, d, page, torch.float32, layout, DEVICE)
    base.k_cache.mul_(2.0)
    batch = fp8_batch(base, k_s, v_s, q_s if q_fp8 else None)
    q = batch.q if q_fp8 else batch.q.to(torch.float16)
    index, count = _lists(lens, n_new, hq, bs, 0.4, 0.1)
    dev = torch.device(DEVICE)
    scales = dict(k_scale=torch.tensor(k_s, device=dev), v_scale=torch.tensor(v_s, device=dev))
    if q_fp8:
        scales["q_scale"] = torch.tensor([q_s], device=dev)
    args = (q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu_seqlens_q,
            batch.seq_lens, index, count)
    nan = torch.full(q.shape, float("nan"), dtype=torch.float16, device=dev)
    ref = sparse_prefill_paged_ref(*args, nan.clone(), 0.125, bs, **scales)
    bsz, _, mqb, _ = index.shape
    pairs = PairWork.allocate(bsz * hq, mqb, DEVICE, 8, 1.5)
    out = sparse_prefill_paged(*args, nan.clone(), 0.125, bs, pairs=pairs, **scales)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    taken = _taken(pairs, bsz * hq * -(-mqb // 2))
    assert taken.any() and (~taken).any()


def test_plan_pairs_default_cap_long_lists() -> None:
    """The backend's list cap (256: nine halvings per search) on lists up to and over it."""
    from vllm_seer.kernels.sparse_prefill.pairs import plan_pairs

    lens, n_new, hq, bs = [20000], [256], 2, 64  # 313 key blocks
    index, count = _lists(lens, n_new, hq, bs, 0.82, 0.02)
    cu = torch.tensor([0, *n_new], device=DEVICE).cumsum(0).to(torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    got = PairWork.allocate(hq, index.shape[2], DEVICE, 256, 1.25)
    ref = PairWork.allocate(hq, index.shape[2], DEVICE, 256, 1.25)
    plan_pairs(index, count, cu, seq, got, bs)
    plan_pairs_ref(index.cpu(), count.cpu(), cu.cpu(), seq.cpu(), ref, bs)
    assert int(count.max()) > 256 and int(count.min()) <= 256  # both sides of the cap
    torch.testing.assert_close(got.union_count.cpu(), ref.union_count.cpu())
    torch.testing.assert_close(got.paired.cpu(), ref.paired.cpu())
    taken = (ref.union_count > 0).nonzero().flatten().tolist()
    assert taken and max(int(ref.union_count[p]) for p in taken) > 200
    for pr in taken:
        u = int(ref.union_count[pr])
        torch.testing.assert_close(got.union[pr, :u].cpu(), ref.union[pr, :u].cpu())


def test_sparse_prefill_pairs_tails_and_small_pages() -> None:
    """Union tails other than ``qb, qb + 1`` (rows without their diagonal, one-entry rows) and
    pages smaller than a gate block (8 tokens, pointer loads)."""
    from vllm_seer.kernels.sparse_prefill import sparse_prefill_paged

    lens, n_new, hq, bs = [300, 200], [230, 200], 4, 32
    batch = make_batch(lens, n_new, hq, 2, 64, 8, torch.float16, "token", DEVICE)
    masks = overlapping_block_masks(lens, n_new, hq, bs, 0.4, 0.1, DEVICE)
    for L, n, m in zip(lens, n_new, masks, strict=True):
        qb = (L - n) // bs + torch.arange(m.shape[1], device=DEVICE)
        rows = torch.arange(m.shape[1], device=DEVICE)
        m[0, rows, qb] = False  # head 0: no diagonals (tails end below qb)
        m[1, rows[1::2], qb[1::2]] = False  # head 1: only A's diagonal (tail ends at qb)
        m[2] = False
        m[2, :, 0] = True  # head 2: one entry per row (block 0)
    index, count = masks_to_block_lists(masks, max(-(-L // bs) for L in lens))
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu_seqlens_q,
            batch.seq_lens, index, count)
    ref = sparse_prefill_paged_ref(*args, torch.full_like(batch.q, float("nan")), 0.125, bs)
    bsz, _, mqb, _ = index.shape
    pairs = PairWork.allocate(bsz * hq, mqb, DEVICE, 16, 1.5)
    out = sparse_prefill_paged(*args, torch.full_like(batch.q, float("nan")), 0.125, bs,
                               pairs=pairs)
    live = torch.isfinite(ref)  # rows whose list allows no key of theirs stay NaN in the reference
    torch.testing.assert_close(out.float()[live], ref.float()[live], rtol=2e-2, atol=2e-2)
    assert torch.isfinite(out).all()
    taken = pairs.union_count[:bsz * hq * -(-mqb // 2)].view(bsz, hq, -1) > 0
    assert all(bool(taken[:, h].any()) for h in range(3))  # every tail kind ran in a pair
