"""Triton block-sparse prefill attention over vLLM's paged KV cache.

Same signature and semantics as
:func:`vllm_seer.kernels.sparse_prefill.naive.sparse_prefill_paged_ref` (layout notes live there and
in ``kernels/README.md``), plus an optional :class:`~.split.SplitWork` workspace.

Schedule (one 1-D grid, no host sync; dispatch follows program order):

1. the first ``capacity`` programs run the slices of *split* rows (rows whose list is longer than
   ``split_blocks``, e.g. the dense last query-block rows of a chunked-prefill step, see
   :mod:`.split`), each at most ``split_blocks`` key blocks, and write partial results;
2. then one program per remaining row, heaviest first in bands of query blocks (:func:`.tiles.row_of`):
   bands descending (causal rows grow with the local query block ``j``), inside a band request and
   KV head slowest, then ``j`` descending, then the heads of the KV group, so the programs in
   flight share the K/V of a few KV heads in L2;
3. a combine kernel merges the slices of the split rows.

Each program keeps one ``[block, D]`` query tile in registers and walks its slice of the row's
ascending list (FlashAttention-2 online softmax, exp2, fp32 accumulation). The next entry's block id
and page ids are loaded one iteration ahead and carried in the loop, so the K/V addresses of an
iteration never wait on a load issued in the same iteration and the loads can be pipelined. Over
vLLM CUDA's token-major pages of a multiple of the gate block (:func:`tma_descriptors`) complete
key blocks are loaded by TMA (tensor descriptors, one row coordinate per entry). With
pages of at least one gate block (``page_size % block == 0``) a key block is one contiguous run of a
page: one page id per block instead of one per token. Every entry but a final diagonal one is a
complete block entirely in the past of the tile: those run without masks; only the diagonal block is
masked.

FP8 (``KV_FP8`` / ``Q_FP8``, compile-time switches: the 16-bit path is unchanged): K/V tiles are
loaded as ``float8_e4m3fn`` (half the bytes of the loads and of the shared-memory ring) and
converted in registers to ``DOT_DTYPE``, the query's 16-bit dtype (fp32 in the interpreter); when
the query is float8 too (vLLM's FlashAttention backend quantizes it with ``q_scale`` when the cache
is FP8), ``QK^T`` runs as an FP8 x FP8 dot on the tiles as loaded and V is converted to the
output's dtype. The scales cost nothing per element of the loop: ``q_scale * k_scale`` folds into
the softmax scale, ``v_scale`` multiplies the accumulator once at the end (before a slice's partial
is stored, so the combine kernel needs none).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from vllm_seer.kernels.sparse_prefill.kv_fp8 import check_dtype, scale_arg
from vllm_seer.kernels.sparse_prefill.naive import check_fp8_kv
from vllm_seer.kernels.sparse_prefill.pairs import pair_attention, plan_pairs
from vllm_seer.kernels.sparse_prefill.pairs_naive import PairWork
from vllm_seer.kernels.sparse_prefill.split import (
    SplitWork,
    combine_splits,
    plan_splits,
    query_tile,
    row_geometry,
)
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

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# whole-row programs in bands of query blocks, KV-head-major inside a band (see tiles.row_of): the
# band is MQB // 4 capped at BAND_MAX. Measured on the H200 (2026-12-03, Llama-3.1-8B shapes,
# page 64, TMA, random gates at density 0.1; benchmarks/bench_sparse_variants.py): band 128 vs 0
# 2.28 vs 2.85 ms at 32k and 34.0 vs 43.8 ms at 128k (L2 keeps the K/V of the few KV heads in
# flight); at 8k (MQB 128) band 32 0.230 vs 0.226 ms, band 128 0.291 ms (a band as long as the
# grid loses the heaviest-first order).
BAND_MAX = 128


def default_band(mqb: int) -> int:
    """The program order's band for ``mqb`` query blocks per row of the grid (see ``BAND_MAX``)."""
    return max(1, min(BAND_MAX, mqb // 4))

DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _configs() -> list[triton.Config]:
    # measured on the H200 (2026-12-02): 4 warps / 3 stages won at every shape; a variant issuing
    # the next entry's QK^T before this entry's softmax needed 255 registers with spills at 4 warps
    # and ran 1.6-1.7x slower, so it was dropped
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK", "PAGE_SIZE", "USE_TMA"])
@triton.jit(do_not_specialize=["MQB", "MKB", "NSEG_GRID", "SEG", "CAP", "BAND", "stride_btb"])
def _sparse_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, k_desc, v_desc,
    bt_ptr, cu_ptr, lens_ptr, idx_ptr, cnt_ptr, paired_ptr,
    row_slot_ptr, seg_ptr, counter_ptr, pacc_ptr, pml_ptr, qs_ptr, ks_ptr, vs_ptr,
    scale, MQB, MKB, NB, NSEG_GRID, SEG, CAP, BAND,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_btb, stride_btp,
    HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT: tl.constexpr,
    Q_FP8: tl.constexpr, KV_FP8: tl.constexpr, FP8_QK: tl.constexpr, DOT_DTYPE: tl.constexpr,
    USE_TMA: tl.constexpr, PAIRS: tl.constexpr,
):
    # q: [T, HQ, D]  k/v: [P, PAGE_SIZE, HKV, D]  idx: [B, HQ, MQB, MKB]  cnt: [B, HQ, MQB]
    # paired (PAIRS): [B, HQ, MQB] int32, rows run by the 128-row pair tiles (.pairs) are skipped
    # k_desc / v_desc (USE_TMA): tensor descriptors over the [P * PAGE_SIZE, HKV * D] views of
    # k/v with [BLOCK, D] boxes (complete key blocks are loaded by TMA; the diagonal by pointers)
    # NB = B * HQ; programs [0, NSEG_GRID) run split slices, the rest whole rows (heaviest first)
    # qs/ks/vs: [1] fp32 scales of float8 q / K / V (read only under Q_FP8 / KV_FP8)
    pid = tl.program_id(0)
    if SPLIT and pid < NSEG_GRID:
        used = tl.minimum(tl.load(counter_ptr), CAP)
        t = tl.minimum(pid, CAP - 1)
        row = tl.load(seg_ptr + t * 3)
        sl = tl.load(seg_ptr + t * 3 + 1)
        valid = (pid < used) & (tl.load(seg_ptr + t * 3 + 2) > 0)
        row = tl.where(valid, row, 0)  # unused slots hold garbage
        sl = tl.where(valid, sl, 0)
        is_slice = True
    else:
        row = row_of(pid - NSEG_GRID, MQB, NB, BAND, HQ, GROUP)
        sl = 0
        t = 0
        valid = True
        if SPLIT:
            valid = tl.load(row_slot_ptr + row) < 0
        if PAIRS:
            valid = valid & (tl.load(paired_ptr + row) == 0)
        is_slice = False
    j, h, b, q_lo, start, seq_len, qb, nqb = row_geometry(row, cu_ptr, lens_ptr, MQB, HQ, BLOCK)
    if valid & (j < nqb):
        kvh = h // GROUP
        offs_m = tl.arange(0, BLOCK)
        pos_q, row_ok, q_rows = query_tile(qb, start, seq_len, q_lo, BLOCK, BLOCK)  # [BLOCK]
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = load_query(q_ptr, q_rows, row_ok, h, offs_d, d_ok, stride_qt, stride_qh, stride_qd,
                       DOT_FP32, Q_FP8, FP8_QK, DOT_DTYPE)
        qk_scale = log2_qk_scale(scale, qs_ptr, ks_ptr, Q_FP8, KV_FP8)
        m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        count = tl.load(cnt_ptr + row)
        lo = sl * SEG
        hi = count
        if is_slice:
            hi = tl.minimum(lo + SEG, count)
        list_ptr = idx_ptr + row.to(tl.int64) * MKB
        bt_row = bt_ptr + b * stride_btb
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        # lists are ascending and causal: only a last entry equal to the diagonal needs masks
        last = tl.load(list_ptr + tl.maximum(count - 1, 0))
        n_full = tl.where((count > 0) & (hi == count) & (last >= qb), hi - 1, hi)
        dk = offs_d[:, None] * stride_kd
        dv = offs_d[None, :] * stride_vd
        # software pipeline: block ids and token offsets are loaded ahead and carried, so an
        # iteration's K/V addresses are ready at its top (entries clamped to >= 0: an empty row's
        # list is all -1 and its loop does not run)
        kb = tl.maximum(tl.load(list_ptr + tl.minimum(lo, tl.maximum(n_full - 1, 0))), 0)
        if USE_TMA:  # one int32 coordinate carried per entry; TMA computes the addresses
            col_k = (kvh * stride_kh).to(tl.int32)  # the head's first column in a token's row
            col_v = (kvh * stride_vh).to(tl.int32)
            r_kv = page_row(kb, bt_row, stride_btp, PAGE_SIZE, BLOCK)
            for i in range(lo, n_full):
                kb_n = tl.maximum(tl.load(list_ptr + tl.minimum(i + 1, n_full - 1)), 0)
                k = k_desc.load([r_kv, col_k])  # [BLOCK, D]
                v = v_desc.load([r_kv, col_v])
                r_kv = page_row(kb_n, bt_row, stride_btp, PAGE_SIZE, BLOCK)
                acc, m_i, l_i = online_softmax_step(q, tl.trans(k), v, acc, m_i, l_i, qk_scale,
                                                     True, False, DOT_FP32, KV_FP8, FP8_QK,
                                                     DOT_DTYPE)
        else:
            tok_k = token_offsets(kb, bt_row, stride_btp, stride_kp, stride_kt, offs_m,
                                   PAGE_SIZE, BLOCK)
            tok_v = token_offsets(kb, bt_row, stride_btp, stride_vp, stride_vt, offs_m,
                                   PAGE_SIZE, BLOCK)
            for i in range(lo, n_full):
                kb_n = tl.maximum(tl.load(list_ptr + tl.minimum(i + 1, n_full - 1)), 0)
                kt = load_kt(k_base, tok_k, dk, d_ok, HEAD_DIM, BLOCK_D)
                v = load_v(v_base, tok_v, dv, d_ok, HEAD_DIM, BLOCK_D)
                tok_k = token_offsets(kb_n, bt_row, stride_btp, stride_kp, stride_kt, offs_m,
                                       PAGE_SIZE, BLOCK)
                tok_v = token_offsets(kb_n, bt_row, stride_btp, stride_vp, stride_vt, offs_m,
                                       PAGE_SIZE, BLOCK)
                acc, m_i, l_i = online_softmax_step(q, kt, v, acc, m_i, l_i, qk_scale, True,
                                                     False, DOT_FP32, KV_FP8, FP8_QK, DOT_DTYPE)
        if n_full < hi:  # the diagonal block: may run past the request's last token
            pos_k, k_ok, kt, v = load_kv_masked(last, seq_len, bt_row, stride_btp, k_base, v_base,
                                                stride_kp, stride_kt, stride_vp, stride_vt, dk,
                                                dv, d_ok, offs_m, PAGE_SIZE, BLOCK)
            ok = k_ok[None, :] & (pos_k[None, :] <= pos_q[:, None])
            acc, m_i, l_i = online_softmax_step(q, kt, v, acc, m_i, l_i, qk_scale, ok, True,
                                                 DOT_FP32, KV_FP8, FP8_QK, DOT_DTYPE)
        if KV_FP8:  # V = float8 * v_scale: linear, so once on the accumulator
            acc = acc * tl.load(vs_ptr)
        if is_slice:  # unnormalised partial result of this slice (merged by the combine kernel)
            slot = t.to(tl.int64)
            p_ptrs = pacc_ptr + slot * BLOCK * BLOCK_D + offs_m[:, None] * BLOCK_D
            tl.store(p_ptrs + offs_d[None, :], acc)
            tl.store(pml_ptr + slot * 2 * BLOCK + offs_m, m_i)
            tl.store(pml_ptr + slot * 2 * BLOCK + BLOCK + offs_m, l_i)
        else:
            # a row without any allowed key (count == 0) is written as zeros, not NaN
            acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_ptrs = (o_ptr + q_rows[:, None] * stride_ot + h * stride_oh
                      + offs_d[None, :] * stride_od)
            tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def tma_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block: int,
                    ) -> tuple[TensorDescriptor, TensorDescriptor] | None:
    """Tensor descriptors over the token rows of ``k_cache`` / ``v_cache`` ``[num_pages,
    page_size, Hkv, D]`` with ``[block, D]`` boxes, or ``None`` where TMA cannot load a key block as
    one box.

    Each view is read as a 2-D ``[num_pages * page_size, (Hkv - 1) * head_stride + D]`` tensor
    with the token stride as row stride; head ``h``'s box starts at column ``h * head_stride``.
    That covers vLLM CUDA's layouts: separate contiguous K and V (head stride ``D``) and the
    packed ``[num_pages, page, Hkv, 2D]`` K|V rows of vLLM 0.26+ (head stride ``2D``, the V view
    starting ``D`` elements in). ``None`` for pages not a multiple of ``block``, a head dim that
    is not a power of two (the box would read the next head), head-major pages (tokens of a page
    not one stride apart across pages), or addresses / strides not 16-byte aligned."""
    page, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    if page % block or d != triton.next_power_of_2(d) or d * k_cache.element_size() < 16:
        return None
    descs = []
    for c in (k_cache, v_cache):
        st, es = c.stride(), c.element_size()
        cols = (hkv - 1) * st[2] + d
        if (st[3] != 1 or st[0] != page * st[1] or st[2] < d or st[1] < cols
                or c.data_ptr() % 16 or (st[1] * es) % 16):
            return None
        descs.append(TensorDescriptor(c, [c.shape[0] * page, cols], [st[1], 1], [block, d]))
    return descs[0], descs[1]


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
    work: SplitWork | None = None,
    *,
    q_scale: torch.Tensor | float | None = None,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    tma: bool | None = None,
    band: int | None = None,
    pairs: PairWork | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention of packed prefill rows over the paged cache (Triton).

    Args:
        q: ``[T, Hq, D]`` query rows (post-RoPE), bf16/fp16/fp32, or float8_e4m3fn (with
            ``q_scale``, over a float8 cache only).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` views (any strides), both the
            16/32-bit dtype of the dots or both float8_e4m3fn (with ``k_scale`` / ``v_scale``).
        block_table: ``[B, max_pages]`` int32.
        cu_seqlens_q: ``[B + 1]`` int32 row offsets into ``q``.
        seq_lens: ``[B]`` int32 context + new tokens.
        block_index: ``[B, Hq, MQB, MKB]`` int32, ``-1`` padded, contiguous.
        block_count: ``[B, Hq, MQB]`` int32, contiguous.
        out: ``[T, Hq, D]`` bf16/fp16/fp32, written in place (rows of every request; other rows
            untouched).
        scale: softmax scale.
        block_size: gate block size (tokens); also the query and key tile.
        work: workspace for splitting long rows (:class:`SplitWork`, reused across calls; one
            with the default split length and capacity is allocated when ``None`` and a row could
            be longer than the split length).
        q_scale, k_scale, v_scale: vLLM's per-layer scales of the float8 inputs (one fp32 value on
            the device each, read in-kernel: no host sync), exactly for the float8 inputs.
        tma: load complete key blocks with tensor descriptors (TMA on Hopper); ``None``: wherever
            :func:`tma_descriptors` allows it; ``True`` raises where it does not.
        band: program order (see :func:`.tiles.row_of`; ``None``: :func:`default_band`; 0: the query
            block slowest across all heads). The pair tiles' grid (over pairs of query blocks)
            takes :func:`default_band` of its own length unless ``band`` is 0.
        pairs: workspace of the 128-row pair tiles (:mod:`.pairs`): adjacent query blocks whose
            lists overlap enough run as one tile over the union of their lists; ``None``: every
            row as a 64-row tile.
    Returns:
        ``out``.
    """
    kv_fp8 = check_fp8_kv(k_cache, v_cache)
    q_fp8 = check_dtype(q, "q")
    if q_fp8 and not kv_fp8:
        raise TypeError(f"q is float8_e4m3fn over a {k_cache.dtype} cache: a float8 query needs a "
                        "float8 cache")
    if out.dtype not in DOT_DTYPES:
        raise TypeError(f"out is {out.dtype}; expected one of {list(DOT_DTYPES)}")
    dev = q.device
    scales = [scale_arg(s, n, f, dev) for s, n, f in ((q_scale, "q_scale", q_fp8),
                                                     (k_scale, "k_scale", kv_fp8),
                                                     (v_scale, "v_scale", kv_fp8))]
    dot_fp32 = INTERPRET or q.dtype == torch.float32
    # float8 tiles are converted to the query's dtype (a float8 query: the output's)
    dot_dtype = DOT_DTYPES[out.dtype if q_fp8 else q.dtype]
    _, hq, d = q.shape
    hkv, page_size = k_cache.shape[2], k_cache.shape[1]
    bsz, _, mqb, mkb = block_index.shape
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if bsz == 0 or mqb == 0:
        return out
    block_index = block_index.contiguous()
    block_count = block_count.contiguous()
    rows = bsz * hq * mqb
    if work is None and mkb > 128:
        work = SplitWork.allocate(rows, d, q.device, block_size)
    split = work is not None and mkb > work.split_blocks
    if split and (work.acc.shape[1] != block_size
                  or work.acc.shape[2] != triton.next_power_of_2(d)):
        raise ValueError(f"SplitWork tiles {tuple(work.acc.shape[1:])} do not fit block "
                         f"{block_size} x head dim {d}")
    descs = tma_descriptors(k_cache, v_cache, block_size) if tma is not False else None
    if tma and descs is None:
        raise ValueError(f"tma=True, but a cache of shape {tuple(k_cache.shape)}, strides "
                         f"{k_cache.stride()} / {v_cache.stride()} cannot be read as "
                         f"[{block_size}, D] boxes (see tma_descriptors)")
    band = default_band(mqb) if band is None else band
    if band < 0:
        raise ValueError(f"band={band}; expected >= 0")
    # every check above runs before the first launch
    use_pairs = pairs is not None and mqb >= 2
    if use_pairs:
        plan_pairs(block_index, block_count, cu_seqlens_q, seq_lens, pairs, block_size)
    paired = pairs.paired if use_pairs else block_count  # unused unless use_pairs
    if split:
        plan_splits(block_count, work, paired if use_pairs else None)
        nseg_grid, seg, cap = work.capacity, work.split_blocks, work.capacity
        ws = (work.row_slot, work.segs, work.counter, work.acc, work.ml)
    else:
        nseg_grid, seg, cap = 0, mkb, 1
        ws = (block_count, block_count, block_count, out, out)  # unused (SPLIT=False)
    scales = [block_count if s is None else s for s in scales]  # unused where None
    flags = dict(DOT_FP32=dot_fp32, Q_FP8=q_fp8, KV_FP8=kv_fp8,
                 FP8_QK=q_fp8 and kv_fp8 and not dot_fp32, DOT_DTYPE=dot_dtype)
    if use_pairs:  # heaviest first as well: the pair grid's band is over pairs of query blocks
        pair_attention(q, k_cache, v_cache, descs, block_table, cu_seqlens_q, seq_lens, mqb,
                       pairs, out, scale, block_size, band and default_band(-(-mqb // 2)), scales,
                       flags)
    _sparse_prefill_kernel[(nseg_grid + rows,)](
        q, k_cache, v_cache, out, *(descs or (k_cache, v_cache)),
        block_table, cu_seqlens_q, seq_lens, block_index, block_count, paired, *ws, *scales,
        float(scale), mqb, mkb, bsz * hq, nseg_grid, seg, cap, band,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_table.stride(),
        HQ=hq, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        PAGE_SIZE=page_size, BLOCK=block_size, SPLIT=split, USE_TMA=descs is not None,
        PAIRS=use_pairs, **flags,
    )
    if split:
        combine_splits(out, cu_seqlens_q, seq_lens, mqb, work, block_size)
    return out
