"""Triton gate pooling: K ``[max | min | avg]`` per block from the paged cache, Q ``avg`` per block.

Same signatures and semantics as :mod:`vllm_seer.kernels.paged_pool.naive`. RoPE is undone per
token from ``inv_freq`` (angle ``pos * inv_freq`` in fp32, accurate libdevice cos/sin on GPU), so
the cache is read once and nothing but the pooled blocks is written: memory bound.

Grids come from the output shapes (no host sync): K ``(MKB, B)``, Q ``(MQB, B)``, a program
looping over the heads so cos/sin are computed once per block. The gate's fused ``pool_qk``
(``(Hkv / KH, MKB + MQB, B)``) splits the heads over ``KH``-head programs (autotuned) and reads
cos/sin from a per-position table made at start-up when given one (on the H200 at 128k context
the one-program-per-block form ran at ~0.7 TB/s: latency bound, the heads' loads one after
another). Programs past their request's blocks exit at once. A ``float8_e4m3fn`` cache (query)
is loaded as float8, converted to fp32 and multiplied by its scale, read in-kernel from vLLM's
device tensor (``SCALED``: compile-time).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from vllm_seer.kernels.paged_pool.key_cache import LayerKeyCache
from vllm_seer.kernels.sparse_prefill.kv_fp8 import check_dtype, scale_arg
from vllm_seer.kernels.triton_common import request_blocks, rope_cs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (2, 4, 8)]


@triton.jit
def _unrope(x1, x2, c, s):
    """Rotate ``[R, HALF]`` halves by minus the angle of ``c``/``s`` (NeoX)."""
    return x1 * c + x2 * s, x2 * c - x1 * s


@triton.jit
def _load_scaled(ptrs, mask, s_ptr, SCALED: tl.constexpr):
    """fp32 values at ``ptrs`` (0 where masked), times the scale at ``s_ptr`` when ``SCALED``."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        x = x * tl.load(s_ptr)
    return x


@triton.jit
def _store6(o, stride, a, b, c, d, e, f, mask):
    """Store the six ``[HALF]`` parts of a pooled key at ``o + i * stride``."""
    tl.store(o, a, mask=mask)
    tl.store(o + stride, b, mask=mask)
    tl.store(o + 2 * stride, c, mask=mask)
    tl.store(o + 3 * stride, d, mask=mask)
    tl.store(o + 4 * stride, e, mask=mask)
    tl.store(o + 5 * stride, f, mask=mask)


@triton.jit
def _pool_k_block(
    kb, b, h0, k_ptr, bt_ptr, lens_ptr, f_ptr, t_ptr, s_ptr, o_ptr, pc_ptr, st_ptr, step,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_btb, stride_btp,
    stride_ob, stride_on, stride_oh, stride_oc,
    NH: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_TABLE: tl.constexpr,
    LIBDEVICE: tl.constexpr, SCALED: tl.constexpr, CACHED: tl.constexpr = False,
    HKV: tl.constexpr = 1, ENTRY_TOKENS: tl.constexpr = 1,
):
    """Key block ``kb`` of request ``b``: ``[max | min | avg]`` of its un-rotated keys for the
    ``NH`` heads ``h0 .. h0 + NH - 1``.

    k: ``[P, PAGE_SIZE, HKV, 2*HALF]``; out: ``[B, MKB, HKV, 6*HALF]``; t: the per-position
    cos/sin table (``HAS_TABLE``); s: ``[1]`` fp32 scale of a float8 cache (``SCALED`` only).
    ``CACHED``: pc ``[E, HKV, 6*HALF]`` fp32 / st ``[E, HKV]`` int32, one layer of a
    :class:`~vllm_seer.kernels.paged_pool.key_cache.PooledKeyCache` (contiguous): a complete
    block whose entry holds, for all ``NH`` heads, stamps in ``(0, step)`` is copied from it;
    otherwise pooled, and a complete block's result stored there with ``step``.
    Blocks past the request's keys write nothing."""
    seq_len = tl.load(lens_ptr + b).to(tl.int64)
    if kb * BLOCK < seq_len:
        if CACHED:
            complete = (kb + 1) * BLOCK <= seq_len
            last = kb * BLOCK + BLOCK - 1  # the block's last token: its slot names the entry
            lpage = tl.load(bt_ptr + b * stride_btb + (last // PAGE_SIZE) * stride_btp,
                            mask=complete, other=0).to(tl.int64)
            e = (lpage * PAGE_SIZE + last % PAGE_SIZE) // ENTRY_TOKENS
            pc = pc_ptr + e * (HKV * 6 * HALF)
            st = st_ptr + e * HKV
            hit = complete
            for hh in range(NH):
                stamp = tl.load(st + h0 + hh, mask=complete, other=0)
                hit = hit & (stamp > 0) & (stamp < step)
            if hit:
                offs = tl.arange(0, BLOCK_HALF)
                half_ok = offs < HALF
                for hh in range(NH):
                    h = h0 + hh
                    o = o_ptr + b * stride_ob + kb * stride_on + h * stride_oh + offs * stride_oc
                    for part in tl.static_range(6):
                        tl.store(o + part * HALF * stride_oc,
                                 tl.load(pc + h * (6 * HALF) + part * HALF + offs, mask=half_ok),
                                 mask=half_ok)
            else:
                _pool_k_heads(kb, b, h0, seq_len, k_ptr, bt_ptr, f_ptr, t_ptr, s_ptr, o_ptr, pc,
                              st, step, stride_kp, stride_kt, stride_kh, stride_kd, stride_btb,
                              stride_btp, stride_ob, stride_on, stride_oh, stride_oc, NH, HALF,
                              BLOCK_HALF, PAGE_SIZE, BLOCK, HAS_ROPE, HAS_TABLE, LIBDEVICE,
                              SCALED, True)
        else:  # (o / lens stand in for the cache pointers: never used)
            _pool_k_heads(kb, b, h0, seq_len, k_ptr, bt_ptr, f_ptr, t_ptr, s_ptr, o_ptr, o_ptr,
                          lens_ptr, step, stride_kp, stride_kt, stride_kh, stride_kd, stride_btb,
                          stride_btp, stride_ob, stride_on, stride_oh, stride_oc, NH, HALF,
                          BLOCK_HALF, PAGE_SIZE, BLOCK, HAS_ROPE, HAS_TABLE, LIBDEVICE, SCALED,
                          False)


@triton.jit
def _pool_k_heads(
    kb, b, h0, seq_len, k_ptr, bt_ptr, f_ptr, t_ptr, s_ptr, o_ptr, pc, st, step,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_btb, stride_btp,
    stride_ob, stride_on, stride_oh, stride_oc,
    NH: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_TABLE: tl.constexpr,
    LIBDEVICE: tl.constexpr, SCALED: tl.constexpr, STORE: tl.constexpr,
):
    """Pool key block ``kb`` of request ``b`` (``kb * BLOCK < seq_len``) for the ``NH`` heads
    from ``h0`` into ``o``; ``STORE``: a complete block also into the entry ``pc`` ``[HKV,
    6*HALF]`` with ``step`` in its stamps ``st`` ``[HKV]``."""
    offs = tl.arange(0, BLOCK_HALF)
    half_ok = offs < HALF
    pos = kb * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = pos < seq_len
    page = tl.load(bt_ptr + b * stride_btb + (pos // PAGE_SIZE) * stride_btp,
                   mask=ok, other=0).to(tl.int64)
    m2 = ok[:, None] & half_ok[None, :]
    c, sn = rope_cs(pos, ok, f_ptr, t_ptr, offs, half_ok, HALF, HAS_ROPE, HAS_TABLE, LIBDEVICE)
    cnt = tl.minimum(seq_len - kb * BLOCK, BLOCK).to(tl.float32)
    for hh in range(NH):
        h = h0 + hh
        base = k_ptr + page * stride_kp + (pos % PAGE_SIZE) * stride_kt + h * stride_kh
        x1 = _load_scaled(base[:, None] + offs[None, :] * stride_kd, m2, s_ptr, SCALED)
        x2 = _load_scaled(base[:, None] + (offs[None, :] + HALF) * stride_kd, m2, s_ptr, SCALED)
        y1, y2 = _unrope(x1, x2, c, sn)
        mx1 = tl.max(tl.where(m2, y1, float("-inf")), 0)
        mx2 = tl.max(tl.where(m2, y2, float("-inf")), 0)
        mn1 = tl.min(tl.where(m2, y1, float("inf")), 0)
        mn2 = tl.min(tl.where(m2, y2, float("inf")), 0)
        av1 = tl.sum(tl.where(m2, y1, 0.0), 0) / cnt
        av2 = tl.sum(tl.where(m2, y2, 0.0), 0) / cnt
        o = o_ptr + b * stride_ob + kb * stride_on + h * stride_oh + offs * stride_oc
        _store6(o, HALF * stride_oc, mx1, mx2, mn1, mn2, av1, av2, half_ok)
        if STORE:
            # (a [BLOCK_HALF] comparison: int1 scalar & vector is int32 in the interpreter)
            keep = half_ok & ((kb + 1) * BLOCK + offs * 0 <= seq_len)
            _store6(pc + h * (6 * HALF) + offs, HALF, mx1, mx2, mn1, mn2, av1, av2, keep)
            tl.store(st + h, step, mask=(kb + 1) * BLOCK <= seq_len)


@triton.jit
def _pool_q_block(
    j, b, h0, q_ptr, cu_ptr, lens_ptr, f_ptr, t_ptr, s_ptr, o_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_ob, stride_on, stride_oh, stride_od,
    NH: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_TABLE: tl.constexpr, LIBDEVICE: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Local query block ``j`` of request ``b``: the mean of its un-rotated query rows for the
    ``NH`` heads ``h0 .. h0 + NH - 1``.

    q: ``[T, HQ, 2*HALF]``; out: ``[B, MQB, HQ, 2*HALF]``. Blocks past the request's rows write
    nothing."""
    q_lo, start, seq_len, qb0, nqb = request_blocks(cu_ptr, lens_ptr, b, BLOCK)
    if j < nqb:
        pos = (qb0 + j) * BLOCK + tl.arange(0, BLOCK)
        ok = (pos >= start) & (pos < seq_len)
        offs = tl.arange(0, BLOCK_HALF)
        half_ok = offs < HALF
        m2 = ok[:, None] & half_ok[None, :]
        c, sn = rope_cs(pos, ok, f_ptr, t_ptr, offs, half_ok, HALF, HAS_ROPE, HAS_TABLE,
                        LIBDEVICE)
        cnt = tl.sum(ok.to(tl.float32), 0)
        for hh in range(NH):
            h = h0 + hh
            base = q_ptr + (q_lo + pos - start) * stride_qt + h * stride_qh
            x1 = _load_scaled(base[:, None] + offs[None, :] * stride_qd, m2, s_ptr, SCALED)
            x2 = _load_scaled(base[:, None] + (offs[None, :] + HALF) * stride_qd, m2, s_ptr,
                              SCALED)
            y1, y2 = _unrope(x1, x2, c, sn)
            o = o_ptr + b * stride_ob + j * stride_on + h * stride_oh + offs * stride_od
            tl.store(o, tl.sum(tl.where(m2, y1, 0.0), 0) / cnt, mask=half_ok)
            tl.store(o + HALF * stride_od, tl.sum(tl.where(m2, y2, 0.0), 0) / cnt, mask=half_ok)


@triton.heuristics({"HAS_ROPE": lambda a: a["f_ptr"] is not None,
                    "SCALED": lambda a: a["s_ptr"] is not None})
@triton.autotune(configs=_configs(), key=["HALF", "PAGE_SIZE", "BLOCK"])
@triton.jit(do_not_specialize=["MKB", "stride_btb"])
def _pool_k_kernel(
    k_ptr, bt_ptr, lens_ptr, f_ptr, s_ptr, o_ptr,
    MKB,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_btb, stride_btp,
    stride_ob, stride_on, stride_oh, stride_oc,
    HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr, HAS_ROPE: tl.constexpr, LIBDEVICE: tl.constexpr, SCALED: tl.constexpr,
):
    # one program per (key block, request), every head
    _pool_k_block(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), 0,
                  k_ptr, bt_ptr, lens_ptr, f_ptr, f_ptr, s_ptr, o_ptr, o_ptr, o_ptr, 0,
                  stride_kp, stride_kt, stride_kh, stride_kd, stride_btb, stride_btp,
                  stride_ob, stride_on, stride_oh, stride_oc,
                  HKV, HALF, BLOCK_HALF, PAGE_SIZE, BLOCK, HAS_ROPE, False, LIBDEVICE, SCALED)


@triton.heuristics({"HAS_ROPE": lambda a: a["f_ptr"] is not None,
                    "SCALED": lambda a: a["s_ptr"] is not None})
@triton.autotune(configs=_configs(), key=["HALF", "BLOCK"])
@triton.jit(do_not_specialize=["MQB"])
def _pool_q_kernel(
    q_ptr, cu_ptr, lens_ptr, f_ptr, s_ptr, o_ptr,
    MQB,
    stride_qt, stride_qh, stride_qd,
    stride_ob, stride_on, stride_oh, stride_od,
    HQ: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK: tl.constexpr,
    HAS_ROPE: tl.constexpr, LIBDEVICE: tl.constexpr, SCALED: tl.constexpr,
):
    # one program per (local query block, request), every head
    _pool_q_block(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), 0,
                  q_ptr, cu_ptr, lens_ptr, f_ptr, f_ptr, s_ptr, o_ptr,
                  stride_qt, stride_qh, stride_qd, stride_ob, stride_on, stride_oh, stride_od,
                  HQ, HALF, BLOCK_HALF, BLOCK, HAS_ROPE, False, LIBDEVICE, SCALED)


def _qk_configs() -> list[triton.Config]:
    """``KH``: KV heads pooled per program (its query heads with them); several programs per
    block keep more loads in flight than one program looping over every head."""
    if INTERPRET:
        return [triton.Config({"KH": 1}, num_warps=4, num_stages=1)]  # several head groups
    return [triton.Config({"KH": kh}, num_warps=w, num_stages=1)
            for kh in (1, 2, 8) for w in (2, 4)]


def _prune_qk(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    hkv = kwargs["HKV"]
    keep = [c for c in configs if hkv % c.kwargs["KH"] == 0]
    return keep[:1] if INTERPRET else keep


@triton.heuristics({"HAS_ROPE": lambda a: a["f_ptr"] is not None,
                    "HAS_TABLE": lambda a: a["t_ptr"] is not None,
                    "K_SCALED": lambda a: a["ks_ptr"] is not None,
                    "Q_SCALED": lambda a: a["qs_ptr"] is not None,
                    "CACHED": lambda a: a["pc_ptr"] is not None})
@triton.autotune(configs=_qk_configs(), key=["HALF", "PAGE_SIZE", "BLOCK", "HAS_TABLE"],
                 prune_configs_by={"early_config_prune": _prune_qk})
@triton.jit(do_not_specialize=["MKB", "MQB", "stride_btb", "step"])
def _pool_qk_kernel(
    k_ptr, bt_ptr, ks_ptr, ko_ptr, q_ptr, cu_ptr, qs_ptr, qo_ptr, lens_ptr, f_ptr, t_ptr,
    pc_ptr, st_ptr, step,
    MKB, MQB,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_btb, stride_btp,
    stride_kob, stride_kon, stride_koh, stride_koc,
    stride_qt, stride_qh, stride_qd,
    stride_qob, stride_qon, stride_qoh, stride_qod,
    HKV: tl.constexpr, HQ: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, HAS_ROPE: tl.constexpr,
    HAS_TABLE: tl.constexpr, LIBDEVICE: tl.constexpr, K_SCALED: tl.constexpr,
    Q_SCALED: tl.constexpr, CACHED: tl.constexpr, ENTRY_TOKENS: tl.constexpr, KH: tl.constexpr,
):
    # grid (HKV // KH, MKB + MQB, B): head group g; programs [0, MKB) of axis 1 pool key blocks
    # (KH KV heads), [MKB, MKB + MQB) query blocks (the group's KH * HQ // HKV query heads)
    g = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    QH: tl.constexpr = KH * (HQ // HKV)
    if i < MKB:
        _pool_k_block(i, b, g * KH, k_ptr, bt_ptr, lens_ptr, f_ptr, t_ptr, ks_ptr, ko_ptr,
                      pc_ptr, st_ptr, step,
                      stride_kp, stride_kt, stride_kh, stride_kd, stride_btb, stride_btp,
                      stride_kob, stride_kon, stride_koh, stride_koc,
                      KH, HALF, BLOCK_HALF, PAGE_SIZE, BLOCK, HAS_ROPE, HAS_TABLE, LIBDEVICE,
                      K_SCALED, CACHED, HKV, ENTRY_TOKENS)
    else:
        _pool_q_block(i - MKB, b, g * QH, q_ptr, cu_ptr, lens_ptr, f_ptr, t_ptr, qs_ptr, qo_ptr,
                      stride_qt, stride_qh, stride_qd, stride_qob, stride_qon, stride_qoh,
                      stride_qod, QH, HALF, BLOCK_HALF, BLOCK, HAS_ROPE, HAS_TABLE, LIBDEVICE,
                      Q_SCALED)


def pool_k_paged(
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    inv_freq: torch.Tensor | None,
    out: torch.Tensor,
    block_size: int = 64,
    *,
    k_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Pool every context key per block: ``out [B, MKB, Hkv, 3D]`` fp32 ``[max | min | avg]``.

    Args:
        k_cache: ``[num_pages, page_size, Hkv, D]`` post-RoPE keys (any strides), 16/32-bit or
            float8_e4m3fn.
        block_table: ``[B, max_pages]`` int32.
        seq_lens: ``[B]`` int32 context + new tokens.
        inv_freq: ``[D // 2]`` fp32 or ``None``.
        out: ``[B, MKB, Hkv, 3D]`` fp32, ``MKB >= ceil(max(seq_lens) / block_size)``.
        block_size: gate block size.
        k_scale: vLLM's per-layer K scale (one fp32 value on the device), exactly for a float8
            cache.
    Returns:
        ``out`` (entries past each request's blocks untouched).
    """
    s = scale_arg(k_scale, "k_scale", check_dtype(k_cache, "k_cache"), k_cache.device)
    _, page_size, hkv, d = k_cache.shape
    bsz, mkb = out.shape[0], out.shape[1]
    if bsz == 0 or mkb == 0:
        return out
    _pool_k_kernel[(mkb, bsz)](
        k_cache, block_table, seq_lens, inv_freq, s, out, mkb,
        *k_cache.stride(), *block_table.stride(), *out.stride(),
        HKV=hkv, HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2), PAGE_SIZE=page_size,
        BLOCK=block_size, LIBDEVICE=not INTERPRET,
    )
    return out


def pool_q_varlen(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    inv_freq: torch.Tensor | None,
    out: torch.Tensor,
    block_size: int = 64,
    *,
    q_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Average this step's query rows per absolute block: ``out [B, MQB, Hq, D]`` fp32.

    Args:
        q: ``[T, Hq, D]`` post-RoPE rows; request ``b`` at positions ``L_b - n_b .. L_b - 1``
            (16/32-bit or float8_e4m3fn).
        cu_seqlens_q: ``[B + 1]`` int32.
        seq_lens: ``[B]`` int32.
        inv_freq: ``[D // 2]`` fp32 or ``None``.
        out: ``[B, MQB, Hq, D]`` fp32; local block ``j`` is absolute block ``(L - n) // bs + j``.
        block_size: gate block size.
        q_scale: the query's scale (one fp32 value on the device), exactly for a float8 query.
    Returns:
        ``out``.
    """
    s = scale_arg(q_scale, "q_scale", check_dtype(q, "q"), q.device)
    hq, d = q.shape[1], q.shape[2]
    bsz, mqb = out.shape[0], out.shape[1]
    if bsz == 0 or mqb == 0:
        return out
    _pool_q_kernel[(mqb, bsz)](
        q, cu_seqlens_q, seq_lens, inv_freq, s, out, mqb,
        *q.stride(), *out.stride(),
        HQ=hq, HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2), BLOCK=block_size,
        LIBDEVICE=not INTERPRET,
    )
    return out


def pool_qk(
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    inv_freq: torch.Tensor | None,
    k_out: torch.Tensor,
    q_out: torch.Tensor,
    block_size: int = 64,
    *,
    k_scale: torch.Tensor | float | None = None,
    q_scale: torch.Tensor | float | None = None,
    rope_positions: torch.Tensor | None = None,
    key_cache: LayerKeyCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pool_k_paged` and :func:`pool_q_varlen` in one launch (the gate's pooling step).

    Same arguments and results as the two calls ``pool_k_paged(k_cache, block_table, seq_lens,
    inv_freq, k_out, block_size, k_scale=k_scale)`` and ``pool_q_varlen(q, cu_seqlens_q, seq_lens,
    inv_freq, q_out, block_size, q_scale=q_scale)``; returns ``(k_out, q_out)``.

    ``rope_positions``: optional ``[NPOS, 2, D // 2]`` fp32 cos/sin of ``p * inv_freq`` for every
    position ``p < NPOS`` (:func:`vllm_seer.gate.block_rope_table` with block size 1, made once at
    start-up; ``NPOS`` at least every request's length): read instead of evaluating cos/sin per
    element (the same fp32 angles). Programs pool ``KH`` KV heads each (autotuned).

    ``key_cache``: this layer's view of a
    :class:`~vllm_seer.kernels.paged_pool.key_cache.PooledKeyCache` for this step: complete key
    blocks it holds are copied from it, the others pooled (and the complete ones stored); ``k_out``
    is the same as without it (the stored values are what the pooling wrote).
    """
    ks = scale_arg(k_scale, "k_scale", check_dtype(k_cache, "k_cache"), k_cache.device)
    qs = scale_arg(q_scale, "q_scale", check_dtype(q, "q"), q.device)
    _, page_size, hkv, d = k_cache.shape
    hq = q.shape[1]
    if q.shape[2] != d:
        raise ValueError(f"q head dim {q.shape[2]} differs from the cache's {d}")
    bsz, mkb = k_out.shape[0], k_out.shape[1]
    mqb = q_out.shape[1]
    if q_out.shape[0] != bsz:
        raise ValueError(f"k_out has {bsz} requests, q_out {q_out.shape[0]}")
    if bsz == 0 or mkb + mqb == 0:
        return k_out, q_out
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if rope_positions is not None:
        if inv_freq is None:
            raise ValueError("rope_positions without inv_freq: nothing to un-rotate")
        if (rope_positions.dtype != torch.float32 or rope_positions.dim() != 3
                or tuple(rope_positions.shape[1:]) != (2, d // 2)
                or not rope_positions.is_contiguous()):
            raise ValueError(f"rope_positions {tuple(rope_positions.shape)} "
                             f"{rope_positions.dtype}: expected contiguous [NPOS, 2, {d // 2}] "
                             "float32")
    if key_cache is not None:
        key_cache.check(k_cache.shape[0], page_size, hkv, d, block_size, k_cache.device)
    kc = key_cache
    _pool_qk_kernel[lambda meta: (hkv // meta["KH"], mkb + mqb, bsz)](
        k_cache, block_table, ks, k_out, q, cu_seqlens_q, qs, q_out, seq_lens, inv_freq,
        rope_positions, kc.data if kc else None, kc.stamps if kc else None,
        kc.step if kc else 0, mkb, mqb,
        *k_cache.stride(), *block_table.stride(), *k_out.stride(), *q.stride(), *q_out.stride(),
        HKV=hkv, HQ=hq, HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2),
        PAGE_SIZE=page_size, BLOCK=block_size, LIBDEVICE=not INTERPRET,
        ENTRY_TOKENS=kc.entry_tokens if kc else 1,
    )
    return k_out, q_out


@triton.jit(do_not_specialize=["T", "E", "L"])  # one variant for every step's size
def _invalidate_kernel(st_ptr, slot_ptr, T, E, L, HKV: tl.constexpr, HKV_P2: tl.constexpr,
                       ENTRY_TOKENS: tl.constexpr, BLOCK_T: tl.constexpr):
    # grid (cdiv(T, BLOCK_T),): zero the stamps [L, E, HKV] of the entries these slots fall in
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    slot = tl.load(slot_ptr + t, mask=ok, other=0).to(tl.int64)
    e = tl.maximum(slot, 0) // ENTRY_TOKENS  # padding (-1) -> entry 0: one needless re-pooling
    h = tl.arange(0, HKV_P2)
    m = ok[:, None] & (h < HKV)[None, :]
    zero = tl.zeros((BLOCK_T, HKV_P2), dtype=tl.int32)
    for layer in range(L):
        tl.store(st_ptr + (layer * E + e)[:, None] * HKV + h[None, :], zero, mask=m)


def invalidate(stamps: torch.Tensor, slot_mapping: torch.Tensor, entry_tokens: int) -> None:
    """Zero ``stamps`` ``[L, E, Hkv]`` int32 (contiguous) at every entry ``max(slot, 0) //
    entry_tokens`` of ``slot_mapping`` ``[T]`` (any integer dtype), every layer and head, in one
    launch (:func:`vllm_seer.kernels.paged_pool.naive.invalidate_ref`)."""
    if stamps.dtype != torch.int32 or stamps.dim() != 3 or not stamps.is_contiguous():
        raise ValueError(f"stamps {tuple(stamps.shape)} {stamps.dtype}: expected contiguous "
                         "[L, E, Hkv] int32")
    n = slot_mapping.numel()
    if n == 0:
        return
    layers, e, hkv = stamps.shape
    block_t = 64
    _invalidate_kernel[(triton.cdiv(n, block_t),)](
        stamps, slot_mapping, n, e, layers, HKV=hkv, HKV_P2=triton.next_power_of_2(hkv),
        ENTRY_TOKENS=entry_tokens, BLOCK_T=block_t)
