"""Plain-PyTorch gate scores and block selection for a varlen batch (reference).

Same signature as :func:`vllm_seer.kernels.block_select.triton.block_select`; per request it runs
:func:`vllm_seer.gate.gate_scores` and :func:`vllm_seer.gate.select_scores` on the pooled inputs
(top-k ranks the causally masked logits, ties to the lowest block index, as upstream and the
Triton kernel) and packs the masks into the ``(block_index, block_count)`` lists that
``sparse_prefill`` consumes.
"""

from __future__ import annotations

import torch

from vllm_seer.gate import (
    Selection,
    block_rope_table,
    gate_scores,
    group_gate_weight,
    select_scores,
    topk_count,
)


def block_select_ref(
    q_pooled: torch.Tensor,
    k_pooled: torch.Tensor,
    weight: torch.Tensor,
    inv_freq: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    sel: Selection,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int = 64,
    workspace: torch.Tensor | None = None,
    topk: torch.Tensor | None = None,
    rope_table: torch.Tensor | None = None,
    grouped_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the active key blocks of every (request, query head, local query block).

    Args:
        q_pooled: ``[B, MQB, Hq, G]`` fp32 pre-RoPE query block means (``paged_pool``).
        k_pooled: ``[B, MKB', Hkv, 3D]`` fp32 ``[max | min | avg]`` key blocks (``paged_pool``).
        weight: ``[Hq, 3D, G]`` the layer's ``mask_linear_k`` weight.
        inv_freq: ``[G // 2]`` fp32 RoPE inverse frequencies (gate RoPE at block starts).
        cu_seqlens_q: ``[B + 1]`` int32.
        seq_lens: ``[B]`` int32.
        sel: threshold / nz_ratio selection, ``last_block_dense`` and ``sink_blocks``.
        block_index: ``[B, Hq, MQB, MKB]`` int32 out, ascending, ``-1`` padded (fully written).
        block_count: ``[B, Hq, MQB]`` int32 out (0 for rows past a request's query blocks).
        block_size: gate block size.
        workspace: unused here (the Triton version's score buffer).
        topk: optional ``[B]`` int32 per-request ``k`` of ``nz_ratio`` top-k, precomputed on the
            host (:func:`vllm_seer.gate.topk_count`); checked against the value computed here.
        rope_table: optional :func:`vllm_seer.gate.block_rope_table` of ``inv_freq`` (the Triton
            version's start-up table); checked equal to the table of ``inv_freq`` here.
        grouped_weight: optional :func:`vllm_seer.gate.group_gate_weight` of ``weight``; checked
            equal to it here.
    Returns:
        ``(block_index, block_count)``.
    """
    block_index.fill_(-1)
    block_count.zero_()
    cu = cu_seqlens_q.tolist()
    if topk is not None and sel.method == "nz_ratio":
        want = [topk_count(-(-L // block_size), sel.nz_ratio) for L in seq_lens.tolist()]
        if topk.tolist() != want:
            raise ValueError(f"topk {topk.tolist()} differs from topk_count of seq_lens: {want}")
    if rope_table is not None:
        want_tab = block_rope_table(inv_freq.to(rope_table.device), rope_table.shape[0], block_size)
        nkb_max = max((-(-L // block_size) for L in seq_lens.tolist()), default=0)
        if rope_table.shape[0] < nkb_max or not torch.equal(rope_table, want_tab):
            raise ValueError("rope_table is not block_rope_table(inv_freq) covering every block")
    if grouped_weight is not None and not torch.equal(
            grouped_weight, group_gate_weight(weight, k_pooled.shape[2])):
        raise ValueError("grouped_weight is not group_gate_weight(weight)")
    for b, L in enumerate(seq_lens.tolist()):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        qb0 = (L - n) // block_size
        nqb = (L - 1) // block_size - qb0 + 1
        nkb = -(-L // block_size)
        scores = gate_scores(q_pooled[b, :nqb], qb0, k_pooled[b, :nkb], weight, inv_freq,
                             block_size)
        mask = select_scores(scores, qb0, sel)  # [Hq, nqb, nkb]
        ids = torch.arange(nkb, device=mask.device).expand_as(mask)
        order = torch.where(mask, ids, ids + nkb).sort(dim=-1).values
        block_index[b, :, :nqb, :nkb] = torch.where(order < nkb, order, -1).to(torch.int32)
        block_count[b, :, :nqb] = mask.sum(-1).to(torch.int32)
    return block_index, block_count
