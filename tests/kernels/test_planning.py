"""Planner + the whole Triton pipeline vs the torch gate (``vllm_seer.gate``) and the reference."""

from __future__ import annotations

import math

import pytest
import torch
from _paged import DEVICE, make_batch
from vllm_seer.kernels.planning import SeerBuffers, plan_batch, seer_prefill
from vllm_seer.kernels.sparse_prefill import masks_to_block_lists, sparse_prefill_paged_ref

from vllm_seer.gate import Selection, gate_mask
from vllm_seer.rope import RopeSpec, rotate


def test_plan_batch_geometry() -> None:
    plan = plan_batch([0, 40, 40, 41], [150, 64, 128])
    # request 0: positions 110..149 -> blocks 1..2; request 1: no rows; request 2: position 127
    assert (plan.num_reqs, plan.max_qblocks, plan.max_kblocks) == (3, 2, 3)
    with pytest.raises(ValueError):
        plan_batch([0, 10], [5])


def test_pipeline_matches_torch_gate() -> None:
    lens, n_new, hq, hkv, d, page = [300, 64, 130], [120, 64, 1], 4, 2, 64, 32
    batch = make_batch(lens, n_new, hq, hkv, d, page, torch.float16, "head", DEVICE)
    inv = RopeSpec(d, 10000.0).inv_freq().to(DEVICE)
    # the cache holds post-RoPE keys: rotate the random "pre-RoPE" keys in place
    for b, L in enumerate(lens):
        post = rotate(batch.keys[b], torch.arange(L, device=DEVICE), inv).to(torch.float16)
        pages = batch.block_table[b, :-(-L // page)].long()
        flat = torch.zeros(len(pages) * page, hkv, d, dtype=torch.float16, device=DEVICE)
        flat[:L] = post
        batch.k_cache[pages] = flat.view(len(pages), page, hkv, d)
        batch.keys[b] = post
    weight = torch.randn(hq, 3 * d, d, device=DEVICE) * (2.0 / math.sqrt(3 * d))
    sel = Selection("threshold", 1e-2, 0.0, True)
    plan = plan_batch(batch.cu_seqlens_q.cpu(), batch.seq_lens.cpu())
    bufs = SeerBuffers.allocate(plan, hq, hkv, d, DEVICE)
    out = torch.full_like(batch.q, float("nan"))
    seer_prefill(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu_seqlens_q,
                 batch.seq_lens, weight, inv, sel, bufs, out, 0.125)
    cu = batch.cu_seqlens_q.tolist()
    masks = []
    for b in range(len(lens)):
        m, _ = gate_mask(batch.q[cu[b]:cu[b + 1]], batch.keys[b], weight, inv, 64, sel)
        masks.append(m)
    index, count = masks_to_block_lists(masks, plan.max_kblocks)
    assert torch.equal(bufs.block_count, count)
    assert torch.equal(bufs.block_index, index)
    ref = sparse_prefill_paged_ref(batch.q, batch.k_cache, batch.v_cache, batch.block_table,
                                   batch.cu_seqlens_q, batch.seq_lens, index, count,
                                   torch.full_like(batch.q, float("nan")), 0.125)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_layer_path_never_syncs() -> None:
    """The per-layer Seer path (gate + split plan + sparse attention + combine) launches only: under
    ``torch.cuda.set_sync_debug_mode("error")`` any synchronising call raises. A 20k-token chunk
    over 40k of context makes rows long enough to be split."""
    lens, n_new, hq, hkv, d, page = [40000, 3000], [20000, 3000], 32, 8, 128, 16
    batch = make_batch(lens, n_new, hq, hkv, d, page, torch.bfloat16, "token", DEVICE)
    inv = RopeSpec(d, 500000.0).inv_freq().to(DEVICE)
    weight = torch.randn(hq, 3 * d, d, device=DEVICE) * (2.0 / math.sqrt(3 * d))
    sel = Selection("nz_ratio", 0.0, 0.1, True)
    bufs = SeerBuffers.allocate(plan_batch(batch.cu_seqlens_q.cpu(), batch.seq_lens.cpu()),
                                hq, hkv, d, DEVICE)
    assert bufs.split is not None
    bufs.set_topk(lens, sel)  # per step, as the CUDA builder does
    out = torch.full_like(batch.q, float("nan"))
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu_seqlens_q,
            batch.seq_lens, weight, inv, sel, bufs, out, 0.125)
    seer_prefill(*args)  # compile + autotune (these sync) before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seer_prefill(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(bufs.split.counter) > 0 and torch.isfinite(out).all()


def test_select_widths() -> None:
    """One selection row width per power of two up to the longest request's key blocks."""
    from vllm_seer.kernels.planning import select_widths

    assert select_widths(1) == [1]
    assert select_widths(5) == [1, 2, 4, 5]
    assert select_widths(2048) == [1 << i for i in range(12)]
    import triton

    assert sorted({triton.next_power_of_2(m) for m in select_widths(2046)}) == \
        sorted({triton.next_power_of_2(m) for m in range(1, 2047)})


@pytest.mark.parametrize("sel", [Selection("nz_ratio", 0.0, 0.3, True),
                                 Selection("threshold", 1e-2, 0.0, False)], ids=["topk", "threshold"])
def test_warm_up_runs_every_variant_small(sel: Selection) -> None:
    """The start-up warm-up runs (interpreter on CPU: tiny heads, 5-block longest request, a
    200-token synthetic prefill) with the start-up tables, and touches no real cache."""
    from vllm_seer.kernels.planning import warm_up

    from vllm_seer.gate import block_rope_table, group_gate_weight

    hq, hkv, d = 2, 1, 64
    inv = RopeSpec(d, 10000.0).inv_freq().to(DEVICE)
    weight = torch.randn(hq, 3 * d, d, device=DEVICE) / math.sqrt(3 * d)
    warm_up(torch.float32, hq, hkv, d, 16, weight, inv, sel, 5, DEVICE, 64, 200,
            block_rope_table(inv, 5, 64), group_gate_weight(weight, hkv))
