"""Triton block-sparse prefill attention over vLLM's paged KV cache.

Same signature and semantics as
:func:`vllm_seer.kernels.sparse_prefill.naive.sparse_prefill_paged_ref` (layout notes live there and
in ``kernels/README.md``).

Launch: one program per (local query block, request, query head); grid ``(MQB, B, Hq)`` read from
the shape of ``block_index`` so no host sync is needed. Programs whose query block lies past their
request's rows exit at once; the heaviest (last) query blocks are scheduled first. Each program
keeps a ``[block_size, D]`` query tile in registers and walks its own list of key blocks
(FlashAttention-2 online softmax, fp32 accumulation). Lists are ascending and causal, so every
entry but a final diagonal one is a complete block entirely in the past of the tile: those run
without any mask (no causal compare, unmasked vectorised K/V loads) and only the diagonal block is
masked. K is read straight into a ``[D, block]`` tile (no transpose). The query heads of one KV
group read the same K/V pages, which then mostly come from L2 (see the README for the trade-off
against iterating the union of a group's lists).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs() -> list[triton.Config]:
    """``PAIR``: key blocks per inner iteration (2 = two list entries gathered into one 128-wide
    key tile: wider tensor-core dots and half the online-softmax rescales)."""
    if INTERPRET:  # PAIR 2 exercises the pair loop, the odd single block and the diagonal
        return [triton.Config({"PAIR": 2}, num_warps=4, num_stages=1)]
    return [triton.Config({"PAIR": p}, num_warps=w, num_stages=s)
            for p in (1, 2) for w in (4, 8) for s in (2, 3)]


@triton.jit
def _attend(q, acc, m_i, l_i, pos_k, b, pos_q, seq_len, qk_scale,
            k_ptr, v_ptr, bt_ptr, offs_d,
            stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd, stride_btb, stride_btp,
            kvh_off_k, kvh_off_v,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
            BLOCK: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """One key tile (``pos_k``: ``[N]`` absolute key positions, one or two gate blocks) of the
    online softmax: returns the updated ``(acc, m_i, l_i)``.

    ``MASKED`` only for the diagonal block: off-diagonal blocks of an ascending causal list are
    complete and entirely in the past of every query row, so they need neither mask.
    """
    if MASKED:  # the diagonal block may run past the request's last page
        page = tl.load(bt_ptr + b * stride_btb + (pos_k // PAGE_SIZE) * stride_btp,
                       mask=pos_k < seq_len, other=0).to(tl.int64)
    else:
        page = tl.load(bt_ptr + b * stride_btb + (pos_k // PAGE_SIZE) * stride_btp).to(tl.int64)
    slot = pos_k % PAGE_SIZE
    # K^T tile [BLOCK_D, N] read straight from the cache; V tile [N, BLOCK_D]
    kt_ptrs = (k_ptr + kvh_off_k + page[None, :] * stride_kp + slot[None, :] * stride_kt
               + offs_d[:, None] * stride_kd)
    v_ptrs = (v_ptr + kvh_off_v + page[:, None] * stride_vp + slot[:, None] * stride_vt
              + offs_d[None, :] * stride_vd)
    if MASKED:
        k_ok = pos_k < seq_len
        if HEAD_DIM == BLOCK_D:
            kt = tl.load(kt_ptrs, mask=k_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            d_ok = offs_d < HEAD_DIM
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d < HEAD_DIM
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if DOT_FP32:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt) * qk_scale  # [BLOCK, N], log2 domain
    if MASKED:
        ok = (pos_k[None, :] < seq_len) & (pos_k[None, :] <= pos_q[:, None])
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK"])
@triton.jit(do_not_specialize=["MQB", "MKB"])
def _sparse_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    bt_ptr, cu_ptr, lens_ptr, idx_ptr, cnt_ptr,
    scale,
    MQB, MKB,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_btb, stride_btp,
    HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, PAIR: tl.constexpr,
):
    # q: [T, HQ, D]  k/v: [P, PAGE_SIZE, HKV, D]  idx: [B, HQ, MQB, MKB]  cnt: [B, HQ, MQB]
    j = MQB - 1 - tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    q_lo = tl.load(cu_ptr + b).to(tl.int64)
    n = tl.load(cu_ptr + b + 1).to(tl.int64) - q_lo
    seq_len = tl.load(lens_ptr + b).to(tl.int64)
    start = seq_len - n
    qb0 = start // BLOCK
    nqb = tl.where(n > 0, (seq_len - 1) // BLOCK - qb0 + 1, 0)
    if j < nqb:
        kvh = h // GROUP
        qb = qb0 + j
        pos_q = qb * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] absolute positions
        row_ok = (pos_q >= start) & (pos_q < seq_len)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_rows = q_lo + pos_q - start
        q_ptrs = q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        qk_scale = scale * 1.4426950408889634  # fold log2(e): exp2 below
        m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        row = (b * HQ + h) * MQB + j
        count = tl.load(cnt_ptr + row)
        list_ptr = idx_ptr + row.to(tl.int64) * MKB
        offs_k = tl.arange(0, BLOCK)
        # lists are ascending and causal: only a last entry equal to the diagonal needs masks
        last = tl.load(list_ptr + tl.maximum(count - 1, 0))
        n_full = tl.where((count > 0) & (last >= qb), count - 1, count)
        kv_args = (k_ptr, v_ptr, bt_ptr, offs_d, stride_kp, stride_kt, stride_kd, stride_vp,
                   stride_vt, stride_vd, stride_btb, stride_btp, kvh * stride_kh, kvh * stride_vh)
        if PAIR == 2:
            offs_n = tl.arange(0, 2 * BLOCK)
            for i in range(0, n_full - 1, 2):
                kb0 = tl.load(list_ptr + i).to(tl.int64)
                kb1 = tl.load(list_ptr + i + 1).to(tl.int64)
                pos_k = tl.where(offs_n < BLOCK, kb0, kb1) * BLOCK + offs_n % BLOCK
                acc, m_i, l_i = _attend(q, acc, m_i, l_i, pos_k, b, pos_q, seq_len, qk_scale,
                                        *kv_args, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK, False,
                                        DOT_FP32)
            if n_full % 2 == 1:
                kb = tl.load(list_ptr + n_full - 1).to(tl.int64)
                acc, m_i, l_i = _attend(q, acc, m_i, l_i, kb * BLOCK + offs_k, b, pos_q, seq_len,
                                        qk_scale, *kv_args, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK,
                                        False, DOT_FP32)
        else:
            for i in range(0, n_full):
                kb = tl.load(list_ptr + i).to(tl.int64)
                acc, m_i, l_i = _attend(q, acc, m_i, l_i, kb * BLOCK + offs_k, b, pos_q, seq_len,
                                        qk_scale, *kv_args, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK,
                                        False, DOT_FP32)
        if n_full < count:
            acc, m_i, l_i = _attend(q, acc, m_i, l_i, last.to(tl.int64) * BLOCK + offs_k, b, pos_q,
                                    seq_len, qk_scale, *kv_args, HEAD_DIM, BLOCK_D, PAGE_SIZE,
                                    BLOCK, True, DOT_FP32)
        # a row without any allowed key (count == 0) is written as zeros, not NaN
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = o_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def sparse_prefill_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    block_size: int = 64,
) -> torch.Tensor:
    """Block-sparse causal attention of packed prefill rows over the paged cache (Triton).

    Args:
        q: ``[T, Hq, D]`` query rows (post-RoPE), bf16/fp16/fp32.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` views (any strides).
        block_table: ``[B, max_pages]`` int32.
        cu_seqlens_q: ``[B + 1]`` int32 row offsets into ``q``.
        seq_lens: ``[B]`` int32 context + new tokens.
        block_index: ``[B, Hq, MQB, MKB]`` int32, ``-1`` padded, contiguous.
        block_count: ``[B, Hq, MQB]`` int32, contiguous.
        out: ``[T, Hq, D]`` written in place (rows of every request; other rows untouched).
        scale: softmax scale.
        block_size: gate block size (tokens); also the query and key tile.
    Returns:
        ``out``.
    """
    _, hq, d = q.shape
    hkv, page_size = k_cache.shape[2], k_cache.shape[1]
    bsz, _, mqb, mkb = block_index.shape
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if bsz == 0 or mqb == 0:
        return out
    block_index = block_index.contiguous()
    block_count = block_count.contiguous()
    grid = (mqb, bsz, hq)
    _sparse_prefill_kernel[grid](
        q, k_cache, v_cache, out,
        block_table, cu_seqlens_q, seq_lens, block_index, block_count,
        float(scale), mqb, mkb,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_table.stride(),
        HQ=hq, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        PAGE_SIZE=page_size, BLOCK=block_size, DOT_FP32=INTERPRET or q.dtype == torch.float32,
    )
    return out
