"""Device helpers shared by the block-sparse prefill kernels (64-row tiles in :mod:`.triton`,
128-row pair tiles in :mod:`.pairs`): cache addressing of a key block, the heaviest-first program
order, complete-block K/V loads and one step of the online softmax."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def token_offsets(kb, bt_row, stride_btp, stride_p, stride_t, offs_n,
                  PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """``[BLOCK]`` int64 cache offsets of the tokens of key block ``kb`` (page + slot)."""
    pos = kb.to(tl.int64) * BLOCK + offs_n
    if PAGE_SIZE % BLOCK == 0:  # the block is one contiguous run of one page
        page = tl.load(bt_row + (kb.to(tl.int64) * BLOCK // PAGE_SIZE) * stride_btp).to(tl.int64)
        return page * stride_p + (pos % PAGE_SIZE) * stride_t
    else:
        page = tl.load(bt_row + (pos // PAGE_SIZE) * stride_btp).to(tl.int64)
        return page * stride_p + (pos % PAGE_SIZE) * stride_t


@triton.jit
def page_row(kb, bt_row, stride_btp, PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Row of key block ``kb``'s first token in the ``[num_pages * PAGE_SIZE, Hkv * D]`` view of
    the cache (``PAGE_SIZE % BLOCK == 0``: the block is one contiguous run of one page), int32 as
    tensor-descriptor coordinates are."""
    page = tl.load(bt_row + (kb.to(tl.int64) * BLOCK // PAGE_SIZE) * stride_btp)
    return page * PAGE_SIZE + (kb * BLOCK) % PAGE_SIZE


@triton.jit
def row_of(rr, MQB, NB, BAND, HQ: tl.constexpr, GROUP: tl.constexpr):
    """Row id (flattened ``[B, HQ, MQB]``) of whole-row program ``rr``: heaviest first.

    ``BAND == 0``: the local query block ``j`` descends slowest, then request, query head.
    ``BAND > 0``: bands of ``BAND`` query blocks (descending); inside a band request and KV head
    slowest, then ``j`` (descending), then the heads of the KV group, so the programs in flight
    share the K/V of few KV heads (L2) while the long rows still start first."""
    if BAND > 0:
        band = rr // (BAND * NB)
        jtop = MQB - 1 - band * BAND
        bl = tl.minimum(jtop + 1, BAND)
        r2 = rr - band * BAND * NB
        g = r2 % GROUP
        t = r2 // GROUP
        j0 = jtop - t % bl
        bkv = t // bl
        bh = (bkv // (HQ // GROUP)) * HQ + (bkv % (HQ // GROUP)) * GROUP + g
    else:
        j0 = MQB - 1 - rr // NB
        bh = rr % NB
    return bh * MQB + j0


@triton.jit
def load_kt(k_base, tok, dk, d_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_D, BLOCK]`` K^T tile of one complete key block (no token mask)."""
    if HEAD_DIM == BLOCK_D:
        return tl.load(k_base + tok[None, :] + dk)
    else:
        return tl.load(k_base + tok[None, :] + dk, mask=d_ok[:, None], other=0.0)


@triton.jit
def load_v(v_base, tok, dv, d_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK, BLOCK_D]`` V tile of one complete key block (no token mask)."""
    if HEAD_DIM == BLOCK_D:
        return tl.load(v_base + tok[:, None] + dv)
    else:
        return tl.load(v_base + tok[:, None] + dv, mask=d_ok[None, :], other=0.0)


@triton.jit
def online_softmax_step(q, kt, v, acc, m_i, l_i, qk_scale, ok, MASKED: tl.constexpr,
                        DOT_FP32: tl.constexpr, KV_FP8: tl.constexpr, FP8_QK: tl.constexpr,
                        DOT_DTYPE: tl.constexpr):
    """One key tile of the online softmax for a ``[M, D]`` query tile; ``ok`` (``MASKED``) masks
    scores: the diagonal block's causal mask, and in pair tiles the half whose row did not select
    the block.
    ``DOT_DTYPE``: what float8 K (unless ``FP8_QK``: float8 q and K dot as they are) and V tiles
    are converted to."""
    if DOT_FP32:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    elif KV_FP8:
        if not FP8_QK:
            kt = kt.to(DOT_DTYPE)
        v = v.to(DOT_DTYPE)
    s = tl.dot(q, kt) * qk_scale  # [BLOCK, N], log2 domain
    if MASKED:
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def load_query(q_ptr, q_rows, row_ok, h, offs_d, d_ok, stride_qt, stride_qh, stride_qd,
               DOT_FP32: tl.constexpr, Q_FP8: tl.constexpr, FP8_QK: tl.constexpr,
               DOT_DTYPE: tl.constexpr):
    """``[M, BLOCK_D]`` query tile of head ``h`` (rows ``q_rows`` where ``row_ok``, zeros
    elsewhere) in the dtype the dots take: fp32 (``DOT_FP32``), ``DOT_DTYPE`` for a float8 query
    whose K is converted, else as stored."""
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    elif Q_FP8 and not FP8_QK:
        q = q.to(DOT_DTYPE)
    return q


@triton.jit
def log2_qk_scale(scale, qs_ptr, ks_ptr, Q_FP8: tl.constexpr, KV_FP8: tl.constexpr):
    """The softmax scale in the log2 domain (``exp2`` in :func:`online_softmax_step`), with the
    float8 query's and cache's per-layer scales folded in."""
    qk_scale = scale * 1.4426950408889634
    if Q_FP8:
        qk_scale = qk_scale * tl.load(qs_ptr)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr)
    return qk_scale


@triton.jit
def load_kv_masked(kb, seq_len, bt_row, stride_btp, k_base, v_base, stride_kp, stride_kt,
                   stride_vp, stride_vt, dk, dv, d_ok, offs_n, PAGE_SIZE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """K^T ``[BLOCK_D, BLOCK]`` and V ``[BLOCK, BLOCK_D]`` of key block ``kb`` that may run past
    the request's last token (a diagonal block), a page id per token, zeros past ``seq_len``;
    with the block's positions ``pos_k`` and which of them exist (``k_ok``)."""
    pos_k = kb.to(tl.int64) * BLOCK + offs_n
    k_ok = pos_k < seq_len
    page = tl.load(bt_row + (pos_k // PAGE_SIZE) * stride_btp, mask=k_ok, other=0).to(tl.int64)
    slot = pos_k % PAGE_SIZE
    kt = tl.load(k_base + (page * stride_kp + slot * stride_kt)[None, :] + dk,
                 mask=d_ok[:, None] & k_ok[None, :], other=0.0)
    v = tl.load(v_base + (page * stride_vp + slot * stride_vt)[:, None] + dv,
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    return pos_k, k_ok, kt, v
