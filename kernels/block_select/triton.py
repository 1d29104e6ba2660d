"""Triton gate scores and block selection (threshold or top-k) for a varlen batch.

Same signature and semantics as :func:`vllm_seer.kernels.block_select.naive.block_select_ref`.

Pipeline (no host sync, grids from tensor shapes):

1. torch: per-query-head projection of the pooled keys as one batched matmul per KV group
   (``[Hkv, B*MKB, 3D] @ [Hkv, 3D, group*G]``, fp32, on a strided view of the pooled keys) —
   cuBLAS is faster than a Triton kernel here; the grouped weight is laid out once per layer at
   start-up (:func:`vllm_seer.gate.group_gate_weight`).
2. ``_scores_kernel`` grid ``(cdiv(MQB, BM), B, Hq)``: RoPE of the pooled queries and of the
   projected keys at their block starts in registers, with cos / sin read from a table made once
   at start-up (:func:`vllm_seer.gate.block_rope_table`, no trigonometry per call), then
   ``q_gate @ k_gate^T / sqrt(G)`` as two half-width dots over the causal key blocks only,
   written to an fp32 workspace ``[B, Hq, MQB, MKB]`` (tf32x3 on GPU). Tile sizes, warps and
   stages autotuned (at the backend's start-up warm-up).
3. ``_select_kernel`` grid ``(MQB, B, Hq)``: one row in registers; softmax + threshold, or top-k by
   an exact radix select on the float bits (one bit per pass, at most 32 passes, stopping once
   exactly ``k`` keys lie above the prefix), 1, 2, 4 or 8 warps per row autotuned per row width (one
   warp reduces with shuffles alone, more warps hold fewer scores per thread; ties: lower block
   index first, the tie-breaking scan only in rows whose passes did not stop early; the
   ``sink_blocks`` first key blocks rank as ``+inf``, so they count in ``k``); diagonal, sink
   blocks, ``last_block_dense`` rows and causality; compaction as one permutation store (selected blocks
   ascending, then ``-1``) so every element of the row is written exactly once.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vllm_seer.gate import Selection, block_rope_table, group_gate_weight

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _select_configs() -> list[triton.Config]:
    # one warp per row reduces with shuffles alone but holds up to 64 scores per thread (255
    # registers + 8 B stack at 2048 key blocks on sm_90, triton 3.9: ~8 warps per SM); 2 / 4 / 8
    # warps trade a shared-memory reduction and a barrier per radix pass for occupancy.
    # Autotuned per row width at start-up (warm_up runs every width). Measured on an H100
    # (2026-12-07, benchmarks/gpu/gate_variants.py, top-k 0.1, Llama shapes), against the former
    # fixed config (1 warp, the tie-breaking scan in every row): 128k prompt 1.596 -> 1.042 ms
    # (4 warps); one 8k chunk at 128k context 0.147 -> 0.090 ms (4 warps); 32k prompt 0.064 ->
    # 0.060 ms (1 warp); one 8k chunk at 32k context 0.026 -> 0.021 ms (2 warps).
    if INTERPRET:
        return [triton.Config({}, num_warps=1, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (1, 2, 4, 8)]


def _scores_configs() -> list[triton.Config]:
    # (BM query blocks, BN key blocks) per tile, warps, stages. Compiled for sm_90 (triton 3.9,
    # G = 128, tf32x3): 64 x 64 at 4 warps spills (255 registers, 256 B stack), 64 x 32 does not
    # (208). Measured on an H100 (2026-12-07, benchmarks/gpu/gate_variants.py) with four more
    # configs: these two were within 2-8 % of each other at every shape (32k / 128k prompts 0.068
    # / 0.56 ms, 8k chunks at 32k / 128k context 0.055 / 0.19 ms); 2 stages, 8 warps, 128 x 32
    # and 64 x 16 were 1.05-2.1x slower. Only the two are kept: the scores are tuned once, at the
    # warm-up's first (16k-token) call, where a config that loses 2x at 128k could win by noise.
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BM": 64, "BN": bn}, num_warps=4, num_stages=1) for bn in (64, 32)]


def _prune_select(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # at most 64 scores per thread (wider rows spill), at least 8 (narrow rows gain nothing from
    # more warps, and each config is one more compile at start-up)
    block_k = {**named_args, **kwargs}["BLOCK_K"]
    need, most = max(1, block_k // 2048), max(1, block_k // 256)
    return [c for c in configs if need <= c.num_warps <= most] or [
        triton.Config({}, num_warps=min(need, 32), num_stages=1)]


@triton.autotune(configs=_scores_configs(), key=["G", "GROUP", "BLOCK"])
@triton.jit(do_not_specialize=["MQB", "MKB"])
def _scores_kernel(
    q_ptr, k_ptr, s_ptr, cs_ptr, cu_ptr, lens_ptr,
    scale, MQB, MKB,
    stride_qb, stride_qn, stride_qh,
    stride_kv, stride_kb, stride_kn, stride_kg,
    HQ: tl.constexpr, GROUP: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
):
    # q: [B, MQB, HQ, G] pre-RoPE pooled queries; k: [Hkv, B, MKB', GROUP, G] projected keys,
    # pre-RoPE; both rotated here at their block starts with the table cs: [NTAB, 2, G // 2]
    # (cos | sin of block * BLOCK * inv_freq); s: [B, HQ, MQB, MKB]
    HALF: tl.constexpr = G // 2
    j0 = tl.program_id(0) * BM
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    n = tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)
    seq_len = tl.load(lens_ptr + b)
    qb0 = (seq_len - n) // BLOCK
    nqb = tl.where(n > 0, (seq_len - 1) // BLOCK - qb0 + 1, 0)
    nkb = (seq_len + BLOCK - 1) // BLOCK
    if j0 < nqb:
        offs_j = j0 + tl.arange(0, BM)
        offs_g = tl.arange(0, HALF)
        j_ok = offs_j < nqb
        qb = qb0 + offs_j  # absolute query block of each row
        q_rows = q_ptr + b * stride_qb + offs_j[:, None].to(tl.int64) * stride_qn + h * stride_qh
        q1 = tl.load(q_rows + offs_g[None, :], mask=j_ok[:, None], other=0.0)
        q2 = tl.load(q_rows + HALF + offs_g[None, :], mask=j_ok[:, None], other=0.0)
        cs_q = cs_ptr + qb[:, None].to(tl.int64) * G + offs_g[None, :]
        c = tl.load(cs_q, mask=j_ok[:, None], other=1.0)
        sn = tl.load(cs_q + HALF, mask=j_ok[:, None], other=0.0)
        r1 = q1 * c - q2 * sn  # rotated halves, [BM, HALF]
        r2 = q2 * c + q1 * sn
        kb_end = tl.minimum(nkb, qb0 + j0 + BM)
        k_base = k_ptr + (h // GROUP) * stride_kv + b * stride_kb + (h % GROUP) * stride_kg
        s_row = s_ptr + ((b * HQ + h) * MQB + offs_j.to(tl.int64)) * MKB  # [BM]
        for kb_start in range(0, kb_end, BN):
            offs_k = kb_start + tl.arange(0, BN)
            k_ok = offs_k < kb_end
            kt = k_base + offs_k[None, :].to(tl.int64) * stride_kn + offs_g[:, None]  # [HALF, BN]
            k1 = tl.load(kt, mask=k_ok[None, :], other=0.0)
            k2 = tl.load(kt + HALF, mask=k_ok[None, :], other=0.0)
            cs_k = cs_ptr + offs_k[None, :].to(tl.int64) * G + offs_g[:, None]  # [HALF, BN]
            ck = tl.load(cs_k, mask=k_ok[None, :], other=1.0)
            sk = tl.load(cs_k + HALF, mask=k_ok[None, :], other=0.0)
            s = tl.dot(r1, k1 * ck - k2 * sk, input_precision=PRECISION)
            s = tl.dot(r2, k2 * ck + k1 * sk, acc=s, input_precision=PRECISION) * scale
            ok = k_ok[None, :] & (offs_k[None, :] <= qb[:, None])
            s = tl.where(ok, s, float("-inf"))
            tl.store(s_row[:, None] + offs_k[None, :], s,
                     mask=j_ok[:, None] & k_ok[None, :] & (offs_k[None, :] < MKB))


@triton.jit
def _break_ties(key, kth, k):
    """The top ``k`` of ``key`` given the k-th largest value ``kth``: every key above it, then the
    tied ones by ascending block index (the same set as ``key >= kth`` when exactly k are)."""
    above = key > kth
    tied = key == kth
    room = k - tl.sum(above.to(tl.int32), 0)
    return above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= room))


@triton.autotune(configs=_select_configs(), key=["BLOCK_K", "TOPK"],
                 prune_configs_by={"early_config_prune": _prune_select})
@triton.jit(do_not_specialize=["MQB", "MKB", "SINK"])
def _select_kernel(
    s_ptr, topk_ptr, idx_ptr, cnt_ptr, cu_ptr, lens_ptr,
    threshold, MQB, MKB, SINK,
    HQ: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    TOPK: tl.constexpr, LAST_DENSE: tl.constexpr,
):
    # s: [B, HQ, MQB, MKB] fp32 scores  topk: [B] int32  idx: [B, HQ, MQB, MKB]  cnt: [B, HQ, MQB]
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    n = tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)
    seq_len = tl.load(lens_ptr + b)
    qb0 = (seq_len - n) // BLOCK
    nqb = tl.where(n > 0, (seq_len - 1) // BLOCK - qb0 + 1, 0)
    qb = qb0 + j
    row = (b * HQ + h) * MQB + j
    kb = tl.arange(0, BLOCK_K)
    # causal (implies kb < nkb); rows past the request's query blocks select nothing
    causal = (kb <= tl.where(j < nqb, qb, -1)) & (kb < MKB)
    s = tl.load(s_ptr + row * MKB + kb, mask=causal, other=float("-inf"))
    sink = causal & (kb < SINK)  # the sink blocks: always active, first in the top-k ranking
    if TOPK:
        k = tl.load(topk_ptr + b)
        s = tl.where(sink, float("inf"), s)
        # order-preserving unsigned 32-bit key of the fp32 score (sign flipped for positives,
        # all bits flipped for negatives); one row per program (1-8 warps, autotuned: one warp
        # reduces each pass with shuffles alone, more warps need a barrier per pass)
        bits = s.to(tl.uint32, bitcast=True)
        neg = (bits >> 31) == 1
        key = tl.where(neg, ~bits, bits | 0x80000000)
        # kth: the largest prefix with at least k keys >= it, one bit per pass from the top. The
        # passes stop early once exactly k keys are >= kth: those are the top k (every other key
        # is below kth), the same set the remaining passes would give (random scores resolve
        # after ~12-20 of the 32 bits); only a row whose k-th key is tied runs all 32 passes.
        # (4 histogram passes of 8-bit digits were measured 2.1x slower at 128k on the H200)
        kth = tl.zeros([], dtype=tl.uint32)
        bit = tl.full([], 31, tl.int32)
        n_ge = tl.full([], -1, tl.int32)
        while (bit >= 0) & (n_ge != k):
            cand = kth | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
            n_ge = tl.sum((key >= cand).to(tl.int32), 0)
            kth = tl.where(n_ge >= k, cand, kth)
            bit -= 1
        # a runtime branch (no ternary in Triton): when the passes stopped early, the k keys >=
        # kth are the top k and there is no tie to break (the scan over the row is skipped)
        if n_ge == k:  # noqa: SIM108
            chosen = key >= kth
        else:
            chosen = _break_ties(key, kth, k)
    else:
        m = tl.maximum(tl.max(s, 0), -1.0e30)  # finite even for an empty row
        e = tl.where(causal, tl.exp(s - m), 0.0)
        chosen = e / tl.maximum(tl.sum(e, 0), 1.0e-30) > threshold
    chosen = chosen | (kb == qb) | sink
    if LAST_DENSE:
        chosen = chosen | (j >= nqb - 2)
    chosen = chosen & causal
    c32 = chosen.to(tl.int32)
    rank = tl.cumsum(c32, 0)  # inclusive
    count = tl.sum(c32, 0)
    slot = tl.where(chosen, rank - 1, count + kb - rank)  # a permutation of 0..BLOCK_K-1
    tl.store(idx_ptr + row * MKB + slot, tl.where(chosen, kb, -1), mask=slot < MKB)
    tl.store(cnt_ptr + row, count)


def block_select(
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
        block_index: ``[B, Hq, MQB, MKB]`` int32 out (contiguous), ascending, ``-1`` padded.
        block_count: ``[B, Hq, MQB]`` int32 out (contiguous), 0 past a request's query blocks.
        block_size: gate block size.
        workspace: optional fp32 buffer of at least ``B * Hq * MQB * MKB`` scores (allocated
            here when ``None``; pass a persistent one to keep allocation off the hot path).
        topk: optional ``[B]`` int32 per-request ``k`` of ``nz_ratio`` top-k, precomputed on the
            host once per step (:func:`vllm_seer.gate.topk_count`); computed here with a few small
            device ops when ``None``.
        rope_table: optional ``[NTAB, 2, G // 2]`` :func:`vllm_seer.gate.block_rope_table` of
            ``inv_freq`` with ``NTAB >= MKB`` (made once at start-up); built here when ``None``.
        grouped_weight: optional :func:`vllm_seer.gate.group_gate_weight` of ``weight`` (made once
            per layer at start-up); built here when ``None``.
    Returns:
        ``(block_index, block_count)``.

    Launches with both tables given and ``topk`` precomputed: the projection (cuBLAS), scores,
    selection.
    """
    bsz, mqb, hq, g = q_pooled.shape
    _, mkbp, hkv, c3 = k_pooled.shape
    mkb = block_index.shape[3]
    if bsz == 0 or mqb == 0:
        return block_index, block_count
    group = hq // hkv
    dev = q_pooled.device
    if rope_table is None:
        rope_table = block_rope_table(inv_freq.to(dev), max(mkb, mkbp), block_size)
    if rope_table.shape[0] < mkb or tuple(rope_table.shape[1:]) != (2, g // 2):
        raise ValueError(f"rope_table {tuple(rope_table.shape)}: expected [>= {mkb}, 2, {g // 2}]")
    if grouped_weight is None:
        grouped_weight = group_gate_weight(weight, hkv)
    # 1. projection per query head, batched per KV group: [Hkv, B*MKB', 3D] @ [Hkv, 3D, group*G]
    #    (cuBLAS, fp32, on a strided view of the pooled keys)
    kp = k_pooled.reshape(bsz * mkbp, hkv, c3).transpose(0, 1)
    k_gate = torch.matmul(kp, grouped_weight)  # [Hkv, B*MKB', group*G] contiguous, pre-RoPE
    # 2. causal scores into the workspace (RoPE of both sides at block starts inside the kernel)
    if workspace is None:
        workspace = torch.empty(bsz * hq * mqb * mkb, dtype=torch.float32, device=dev)
    _scores_kernel[lambda meta: (triton.cdiv(mqb, meta["BM"]), bsz, hq)](
        q_pooled, k_gate, workspace, rope_table, cu_seqlens_q, seq_lens,
        1.0 / math.sqrt(g), mqb, mkb,
        *q_pooled.stride()[:3], *k_gate.view(hkv, bsz, mkbp, group, g).stride()[:4],
        HQ=hq, GROUP=group, G=g, BLOCK=block_size,
        PRECISION="ieee" if INTERPRET else "tf32x3",
    )
    # 3. per-row selection
    use_topk = sel.method == "nz_ratio"
    k_per_req = topk
    if k_per_req is None:
        frac = 1.0 - math.sqrt(1.0 - sel.nz_ratio) if use_topk else 0.0
        nkb = (seq_lens.long() + block_size - 1) // block_size
        k_per_req = torch.clamp((frac * nkb.to(torch.float64)).floor(), min=1).to(torch.int32)
    block_kk = triton.next_power_of_2(mkb)
    _select_kernel[(mqb, bsz, hq)](
        workspace, k_per_req, block_index, block_count, cu_seqlens_q, seq_lens,
        float(sel.threshold), mqb, mkb, sel.sink_blocks,
        HQ=hq, BLOCK=block_size, BLOCK_K=block_kk, TOPK=use_topk, LAST_DENSE=sel.last_block_dense,
    )
    return block_index, block_count
