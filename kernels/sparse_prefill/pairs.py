"""128-row pair tiles of the block-sparse prefill: two adjacent query blocks over one union list.

A 64-row tile feeds each 32 KB K/V block (d=128, bf16) to 64 query rows: 64 FLOP per byte moved
from L2 (Nsight Compute on the 64-row kernel at 32k: L2 throughput 77 %, tensor pipe 44 %). Where
two adjacent query blocks of one head select nearly the same key blocks (real
and structured gates: adjacent-row Jaccard 0.6-0.98, ``benchmarks/results/selection-overlap.md``)
one 128-row program over the union of their lists loads each block once for both; a block only one
row selected is masked (``-inf``) in the other half. :func:`plan_pairs` chooses the pairs whose
union costs at most ``max_ratio`` times their own work (:mod:`.pairs_naive` has the rules, the
layouts and the reference); :func:`pair_attention` runs them (heaviest first, like the 64-row
kernel); the 64-row kernel skips their rows and the long-row split plan never slices them.
Measured on an H100 they run 0.78-0.88x the 64-row kernel even where the two lists coincide
(``benchmarks/results/pair-variants-h100.md``), so the backend leaves them off by default.

Per program: the ``[128, D]`` query tile of blocks ``qb`` and ``qb + 1`` stays in registers and the
union list is walked with the next entry's code and page loaded one iteration ahead (TMA boxes over
64-token-multiple pages, as the 64-row kernel). Every entry before ``qb`` is a complete block in the
past of both halves (flag mask only); the at most two entries ``qb`` / ``qb + 1`` are the diagonals
(causal and length masks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from vllm_seer.kernels.sparse_prefill.pairs_naive import PairWork
from vllm_seer.kernels.sparse_prefill.split import query_tile, row_geometry
from vllm_seer.kernels.sparse_prefill.tiles import (
    load_kt,
    load_kv_masked,
    load_query,
    load_v,
    log2_qk_scale,
    online_softmax_step,
    page_row,
    row_of,
    token_offsets,
)
from vllm_seer.kernels.triton_common import request_blocks

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _lower_bound(base, n, x, LOG: tl.constexpr):
    """``[S]`` int32: for each ``x``, how many of the ``n`` ascending entries at ``base`` are
    ``< x`` (binary search, ``LOG`` halvings cover ``n <= 2 ** (LOG - 1)``)."""
    lo = tl.zeros_like(x)
    hi = lo + n
    for _ in tl.static_range(LOG):
        live = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(base + mid, mask=live, other=0)
        right = live & (v < x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(live & ~right, mid, hi)
    return lo


@triton.jit(do_not_specialize=["MQB", "MKB", "MQP"])
def _pair_plan_kernel(idx_ptr, cnt_ptr, cu_ptr, lens_ptr, union_ptr, ucnt_ptr, paired_ptr,
                      ratio, MQB, MKB, MQP, HQ: tl.constexpr, S: tl.constexpr,
                      LOG: tl.constexpr, BLOCK: tl.constexpr):
    # one program per pair (b, h, p): rows j = 2p (list A) and 2p + 1 (list B). With
    # lb_i = #{b < a_i} and la_j = #{a < b_j} (binary searches) the union ranks are
    #   a_i:           i + lb_i - #{common entries before a_i}
    #   b_j not in A:  la_j + j - #{common entries before b_j}
    pair = tl.program_id(0)
    p = pair % MQP
    bh = pair // MQP
    b = bh // HQ
    row_a = bh.to(tl.int64) * MQB + 2 * p
    has_b = 2 * p + 1 < MQB
    nqb = request_blocks(cu_ptr, lens_ptr, b, BLOCK)[4]
    c_a = tl.load(cnt_ptr + row_a)
    c_b = tl.load(cnt_ptr + row_a + 1, mask=has_b, other=0)
    valid = (2 * p + 1 < nqb) & (c_a > 0) & (c_b > 0) & (c_a <= S) & (c_b <= S)
    u = c_a * 0
    if valid:
        out = union_ptr + pair.to(tl.int64) * (2 * S)
        list_a = idx_ptr + row_a * MKB
        list_b = list_a + MKB
        offs = tl.arange(0, S)
        a_ok = offs < c_a
        b_ok = offs < c_b
        a = tl.load(list_a + offs, mask=a_ok, other=0)
        bb = tl.load(list_b + offs, mask=b_ok, other=0)
        lb = _lower_bound(list_b, c_b, a, LOG)
        la = _lower_bound(list_a, c_a, bb, LOG)
        in_b = (a_ok & (lb < c_b) & (tl.load(list_b + lb, mask=a_ok & (lb < c_b), other=-1)
                                       == a)).to(tl.int32)
        in_a = (b_ok & (la < c_a) & (tl.load(list_a + la, mask=b_ok & (la < c_a), other=-1)
                                       == bb)).to(tl.int32)
        rank_a = offs + lb - (tl.cumsum(in_b, 0) - in_b)
        rank_b = la + offs - (tl.cumsum(in_a, 0) - in_a)
        tl.store(out + rank_a, a * 4 + 1 + 2 * in_b, mask=a_ok)
        tl.store(out + rank_b, bb * 4 + 2, mask=b_ok & (in_a == 0))
        u = c_a + c_b - tl.sum(in_b, 0)
        take = (2 * u).to(tl.float32) <= ratio * (c_a + c_b).to(tl.float32)
        u = tl.where(take, u, 0)
    tl.store(ucnt_ptr + pair, u)
    tl.store(paired_ptr + row_a, (u > 0).to(tl.int32))
    tl.store(paired_ptr + row_a + 1, (u > 0).to(tl.int32), mask=has_b)


def plan_pairs(block_index: torch.Tensor, block_count: torch.Tensor,
               cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, work: PairWork,
               block_size: int = 64) -> None:
    """Triton twin of :func:`.pairs_naive.plan_pairs_ref` (one launch, no host sync)."""
    bsz, hq, mqb, mkb = block_index.shape
    work.check(bsz * hq, mqb)
    mqp = -(-mqb // 2)
    s = work.list_cap
    _pair_plan_kernel[(bsz * hq * mqp,)](
        block_index, block_count, cu_seqlens_q, seq_lens, work.union, work.union_count,
        work.paired, work.max_ratio, mqb, mkb, mqp, HQ=hq, S=s, LOG=s.bit_length(),
        BLOCK=block_size, num_warps=4)


def _configs() -> list[triton.Config]:
    # a [128, D] query tile and fp32 accumulator: 8 warps keep them at the 64-row kernel's
    # registers per thread
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=8, num_stages=s) for s in (2, 3)]


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK", "PAGE_SIZE", "USE_TMA"])
@triton.jit(do_not_specialize=["MQB", "MQP", "S2", "BAND", "stride_btb"])
def _pair_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, k_desc, v_desc,
    bt_ptr, cu_ptr, lens_ptr, union_ptr, ucnt_ptr, qs_ptr, ks_ptr, vs_ptr,
    scale, MQB, MQP, NB, S2, BAND,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_btb, stride_btp,
    HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
    Q_FP8: tl.constexpr, KV_FP8: tl.constexpr, FP8_QK: tl.constexpr, DOT_DTYPE: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    # q: [T, HQ, D]  k/v: [P, PAGE_SIZE, HKV, D]  union: [B, HQ, MQP, S2] (kb * 4 + flags)
    # ucnt: [B, HQ, MQP] (0: the pair runs as two 64-row tiles); NB = B * HQ
    pair = row_of(tl.program_id(0), MQP, NB, BAND, HQ, GROUP)
    uc = tl.load(ucnt_ptr + pair)
    if uc > 0:
        row_a = (pair // MQP) * MQB + 2 * (pair % MQP)
        _, h, b, q_lo, start, seq_len, qb, _ = row_geometry(row_a, cu_ptr, lens_ptr, MQB, HQ,
                                                            BLOCK)
        kvh = h // GROUP
        offs_m = tl.arange(0, 2 * BLOCK)
        offs_n = tl.arange(0, BLOCK)
        half_b = offs_m >= BLOCK  # rows of query block qb + 1
        pos_q, row_ok, q_rows = query_tile(qb, start, seq_len, q_lo, BLOCK, 2 * BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = load_query(q_ptr, q_rows, row_ok, h, offs_d, d_ok, stride_qt, stride_qh, stride_qd,
                       DOT_FP32, Q_FP8, FP8_QK, DOT_DTYPE)
        qk_scale = log2_qk_scale(scale, qs_ptr, ks_ptr, Q_FP8, KV_FP8)
        m_i = tl.full([2 * BLOCK], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([2 * BLOCK], dtype=tl.float32)
        acc = tl.zeros([2 * BLOCK, BLOCK_D], dtype=tl.float32)
        list_ptr = union_ptr + pair.to(tl.int64) * S2
        bt_row = bt_ptr + b * stride_btb
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        dk = offs_d[:, None] * stride_kd
        dv = offs_d[None, :] * stride_vd
        # the union is ascending: only its last two entries can be the diagonals qb / qb + 1
        last = tl.load(list_ptr + uc - 1) >> 2
        prev = tl.load(list_ptr + tl.maximum(uc - 2, 0)) >> 2
        n_full = uc - (last >= qb).to(tl.int32) - ((uc >= 2) & (prev >= qb)).to(tl.int32)
        code = tl.load(list_ptr)
        if USE_TMA:
            col_k = (kvh * stride_kh).to(tl.int32)
            col_v = (kvh * stride_vh).to(tl.int32)
            r_kv = page_row(code >> 2, bt_row, stride_btp, PAGE_SIZE, BLOCK)
            for i in range(0, n_full):
                code_n = tl.load(list_ptr + tl.minimum(i + 1, n_full - 1))
                k = k_desc.load([r_kv, col_k])  # [BLOCK, D]
                v = v_desc.load([r_kv, col_v])
                ok = tl.where(half_b, (code & 2) != 0, (code & 1) != 0)[:, None]
                r_kv = page_row(code_n >> 2, bt_row, stride_btp, PAGE_SIZE, BLOCK)
                acc, m_i, l_i = online_softmax_step(q, tl.trans(k), v, acc, m_i, l_i, qk_scale,
                                                    ok, True, DOT_FP32, KV_FP8, FP8_QK,
                                                    DOT_DTYPE)
                code = code_n
        else:
            tok_k = token_offsets(code >> 2, bt_row, stride_btp, stride_kp, stride_kt, offs_n,
                                  PAGE_SIZE, BLOCK)
            tok_v = token_offsets(code >> 2, bt_row, stride_btp, stride_vp, stride_vt, offs_n,
                                  PAGE_SIZE, BLOCK)
            for i in range(0, n_full):
                code_n = tl.load(list_ptr + tl.minimum(i + 1, n_full - 1))
                kt = load_kt(k_base, tok_k, dk, d_ok, HEAD_DIM, BLOCK_D)
                v = load_v(v_base, tok_v, dv, d_ok, HEAD_DIM, BLOCK_D)
                ok = tl.where(half_b, (code & 2) != 0, (code & 1) != 0)[:, None]
                tok_k = token_offsets(code_n >> 2, bt_row, stride_btp, stride_kp, stride_kt,
                                      offs_n, PAGE_SIZE, BLOCK)
                tok_v = token_offsets(code_n >> 2, bt_row, stride_btp, stride_vp, stride_vt,
                                      offs_n, PAGE_SIZE, BLOCK)
                acc, m_i, l_i = online_softmax_step(q, kt, v, acc, m_i, l_i, qk_scale, ok, True,
                                                    DOT_FP32, KV_FP8, FP8_QK, DOT_DTYPE)
                code = code_n
        for i in range(n_full, uc):  # the diagonals: causal and past-the-end masks
            code = tl.load(list_ptr + i)
            pos_k, k_ok, kt, v = load_kv_masked(code >> 2, seq_len, bt_row, stride_btp, k_base,
                                                v_base, stride_kp, stride_kt, stride_vp,
                                                stride_vt, dk, dv, d_ok, offs_n, PAGE_SIZE, BLOCK)
            sel = tl.where(half_b, (code & 2) != 0, (code & 1) != 0)
            ok = sel[:, None] & k_ok[None, :] & (pos_k[None, :] <= pos_q[:, None])
            acc, m_i, l_i = online_softmax_step(q, kt, v, acc, m_i, l_i, qk_scale, ok, True,
                                                DOT_FP32, KV_FP8, FP8_QK, DOT_DTYPE)
        if KV_FP8:
            acc = acc * tl.load(vs_ptr)
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = o_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def pair_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   descs: tuple | None, block_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   seq_lens: torch.Tensor, mqb: int, work: PairWork, out: torch.Tensor,
                   scale: float, block_size: int, band: int, scales: list[torch.Tensor],
                   flags: dict) -> None:
    """Launch the pair tiles planned in ``work`` (called by ``sparse_prefill_paged``, which
    checks the inputs; ``flags``: its dtype switches ``DOT_FP32`` .. ``DOT_DTYPE``)."""
    hq, d = q.shape[1], q.shape[2]
    bsz = seq_lens.shape[0]
    mqp = -(-mqb // 2)
    _pair_kernel[(bsz * hq * mqp,)](
        q, k_cache, v_cache, out, *(descs or (k_cache, v_cache)),
        block_table, cu_seqlens_q, seq_lens, work.union, work.union_count, *scales,
        float(scale), mqb, mqp, bsz * hq, work.union.shape[1], band,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_table.stride(),
        HQ=hq, GROUP=hq // k_cache.shape[2], HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        PAGE_SIZE=k_cache.shape[1], BLOCK=block_size, USE_TMA=descs is not None, **flags)

