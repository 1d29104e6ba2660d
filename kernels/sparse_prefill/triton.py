"""Triton block-sparse prefill attention over vLLM's paged KV cache.

Same signature and semantics as
:func:`vllm_seer.kernels.sparse_prefill.naive.sparse_prefill_paged_ref` (layout notes live there and
in ``kernels/README.md``).

Launch: one program per (local query block, request, query head); grid ``(MQB, B, Hq)`` read from
the shape of ``block_index`` so no host sync is needed. Programs whose query block lies past their
request's rows exit at once; the heaviest (last) query blocks are scheduled first. Each program
keeps a ``[block_size, D]`` query tile in registers and walks its own list of key blocks
(FlashAttention-2 online softmax, fp32 accumulation). The query heads of one KV group read the same
K/V pages, which then mostly come from L2 (see the README for the trade-off against iterating the
union of a group's lists).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "GROUP", "PAGE_SIZE", "BLOCK"])
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
    PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
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
        pos_q = (qb0 + j) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] absolute positions
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
        for i in range(0, count):
            kb = tl.load(list_ptr + i).to(tl.int64)
            pos_k = kb * BLOCK + offs_k  # [BLOCK]
            k_ok = (pos_k < seq_len) & (pos_k >= 0)
            page = tl.load(bt_ptr + b * stride_btb + (pos_k // PAGE_SIZE) * stride_btp,
                           mask=k_ok, other=0).to(tl.int64)
            slot = pos_k % PAGE_SIZE
            k_ptrs = (k_ptr + page[:, None] * stride_kp + slot[:, None] * stride_kt
                      + kvh * stride_kh + offs_d[None, :] * stride_kd)  # [BLOCK, BLOCK_D]
            kt = tl.trans(tl.load(k_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0))
            if DOT_FP32:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt) * qk_scale  # [BLOCK, BLOCK]
            ok = k_ok[None, :] & (pos_k[None, :] <= pos_q[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptrs = (v_ptr + page[:, None] * stride_vp + slot[:, None] * stride_vt
                      + kvh * stride_vh + offs_d[None, :] * stride_vd)  # [BLOCK, BLOCK_D]
            v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
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
