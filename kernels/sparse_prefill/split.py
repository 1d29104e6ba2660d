"""Splitting long rows of the block-sparse prefill (plan and combine kernels, device side).

A row (request, query head, local query block) whose list holds more than ``split_blocks`` entries
would keep one program busy long after the others finish: the dense last query-block rows of a
chunked-prefill step iterate the whole context (2048 blocks at 128k) while a sparse row iterates
~100. The plan kernel gives each such row ``ceil(count / split_blocks)`` consecutive *partial
slots*; the attention kernel runs one program per slot (the first programs of its grid, so the
heaviest work is dispatched first) over that slice of the list and writes the unnormalised
partial result (``acc``, running max ``m``, running sum ``l``); the combine kernel merges a row's
slices in slot order (deterministic) into the output. Rows that fit in one slice, and rows that
find the workspace full (``capacity`` slots), run whole in one program. Nothing here syncs with
the host: counts stay on the device, grids come from host-known bounds.

With an FP8 cache the attention kernel multiplies a slice's ``acc`` by ``v_scale`` before storing
it, so the merge here is the same for every cache dtype. Both kernels decode a row id with
:func:`row_geometry` / :func:`query_tile`.

Layouts: ``block_count`` ``[R]`` flattened ``[B, Hq, MQB]``; ``row_slot`` ``[R]`` int32 (first
slot of a split row, ``-1`` otherwise); ``segs`` ``[capacity, 3]`` int32 ``(row, slice, nslices)``
(``nslices == 0``: slot unused); ``acc`` ``[capacity, BLOCK, D]`` fp32; ``ml`` ``[capacity, 2,
BLOCK]`` fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from vllm_seer.kernels.triton_common import request_blocks


@dataclass
class SplitWork:
    """Persistent workspace for split rows (allocate once per batch shape, reuse across layers).

    Attributes:
        counter: ``[1]`` int32 partial slots taken (reset by each call).
        row_slot: ``[R]`` int32 first partial slot of each row, ``-1`` when the row runs whole.
        segs: ``[capacity, 3]`` int32 ``(row, slice index, slices of the row)``.
        acc: ``[capacity, block, D]`` fp32 unnormalised partial outputs.
        ml: ``[capacity, 2, block]`` fp32 partial running max (log2 domain) and sum.
        split_blocks: list entries per slice.
    """

    counter: torch.Tensor
    row_slot: torch.Tensor
    segs: torch.Tensor
    acc: torch.Tensor
    ml: torch.Tensor
    split_blocks: int

    @property
    def capacity(self) -> int:
        return self.segs.shape[0]

    @classmethod
    def allocate(cls, rows: int, head_dim: int, device: torch.device | str, block: int = 64,
                 capacity: int = 2048, split_blocks: int = 128) -> SplitWork:
        """``rows``: ``B * Hq * MQB``; ``capacity * block * head_dim * 4`` bytes of partials
        (64 MiB at the defaults, d=128)."""
        if split_blocks < 1 or capacity < 1:
            raise ValueError(f"split_blocks={split_blocks} and capacity={capacity} must be >= 1")
        i32 = dict(dtype=torch.int32, device=device)
        return cls(torch.zeros(1, **i32), torch.empty(rows, **i32),
                   torch.empty(capacity, 3, **i32),
                   torch.empty(capacity, block, triton.next_power_of_2(head_dim),
                               dtype=torch.float32, device=device),
                   torch.empty(capacity, 2, block, dtype=torch.float32, device=device),
                   split_blocks)


@triton.jit
def row_geometry(row, cu_ptr, lens_ptr, MQB, HQ: tl.constexpr, BLOCK: tl.constexpr):
    """Decode a row id of the flattened ``[B, HQ, MQB]`` grid of (request, query head, local query
    block): ``(j, h, b, q_lo, start, seq_len, qb, nqb)``: its local query block, query head and
    request, the request's first packed query row, the first and past-the-last position of its
    rows, the absolute query block ``qb = start // BLOCK + j`` and the request's local query blocks
    (``j < nqb`` holds for a real row; ``nqb`` is 0 when the request has no rows this step)."""
    j = row % MQB
    h = ((row // MQB) % HQ).to(tl.int64)
    b = (row // (MQB * HQ)).to(tl.int64)
    q_lo, start, seq_len, qb0, nqb = request_blocks(cu_ptr, lens_ptr, b, BLOCK)
    return j, h, b, q_lo, start, seq_len, qb0 + j, nqb


@triton.jit
def query_tile(qb, start, seq_len, q_lo, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """``[ROWS]`` absolute positions of the rows from query block ``qb`` on (``ROWS = BLOCK``:
    that block; ``2 * BLOCK``: it and the next, a pair tile), which of them are this step's rows,
    and their packed row indices (garbage where not present)."""
    pos_q = qb * BLOCK + tl.arange(0, ROWS)
    row_ok = (pos_q >= start) & (pos_q < seq_len)
    return pos_q, row_ok, q_lo + pos_q - start


@triton.jit(do_not_specialize=["R", "SEG", "CAP"])  # R: rows of the batch, varies
def _plan_kernel(cnt_ptr, paired_ptr, row_slot_ptr, seg_ptr, counter_ptr, R, SEG, CAP,
                 BR: tl.constexpr, PAIRS: tl.constexpr):
    # one program per BR rows: one atomic for all its split rows, slots handed out in row order;
    # rows of 128-row pair tiles (PAIRS: paired[r] != 0) are never split
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = r < R
    c = tl.load(cnt_ptr + r, mask=ok, other=0)
    if PAIRS:
        c = tl.where(tl.load(paired_ptr + r, mask=ok, other=0) != 0, 0, c)
    nseg = tl.where(c > SEG, (c + SEG - 1) // SEG, 0)
    total = tl.sum(nseg, 0)
    base = tl.atomic_add(counter_ptr, total)
    first = base + tl.cumsum(nseg, 0) - nseg  # [BR] first slot of each row
    fits = (nseg > 0) & (first + nseg <= CAP)
    tl.store(row_slot_ptr + r, tl.where(fits, first, -1), mask=ok)
    for s in range(0, tl.max(nseg, 0)):
        slot = first + s
        w = ok & (s < nseg) & (slot < CAP)  # slots of rows that do not fit are marked unused
        p = seg_ptr + slot.to(tl.int64) * 3
        tl.store(p, r, mask=w)
        tl.store(p + 1, tl.full([BR], 0, tl.int32) + s, mask=w)
        tl.store(p + 2, tl.where(fits, nseg, 0), mask=w)


@triton.jit(do_not_specialize=["MQB", "CAP"])
def _combine_kernel(
    o_ptr, cu_ptr, lens_ptr, seg_ptr, counter_ptr, acc_ptr, ml_ptr,
    MQB, CAP,
    stride_ot, stride_oh, stride_od,
    HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program per partial slot; the first slice of each split row merges the row's slices
    t = tl.program_id(0)
    used = tl.minimum(tl.load(counter_ptr), CAP)
    if t < used:
        row = tl.load(seg_ptr + t * 3)
        s = tl.load(seg_ptr + t * 3 + 1)
        nseg = tl.load(seg_ptr + t * 3 + 2)
        if (s == 0) & (nseg > 0):
            _, h, _, q_lo, start, seq_len, qb, _ = row_geometry(row, cu_ptr, lens_ptr, MQB, HQ,
                                                                 BLOCK)
            pos_q, row_ok, q_rows = query_tile(qb, start, seq_len, q_lo, BLOCK, BLOCK)
            offs_m = tl.arange(0, BLOCK)
            offs_d = tl.arange(0, BLOCK_D)
            m_all = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
            for i in range(0, nseg):
                m_all = tl.maximum(m_all, tl.load(ml_ptr + (t + i).to(tl.int64) * 2 * BLOCK
                                                  + offs_m))
            l_all = tl.zeros([BLOCK], dtype=tl.float32)
            o = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
            for i in range(0, nseg):
                slot = (t + i).to(tl.int64)
                w = tl.exp2(tl.load(ml_ptr + slot * 2 * BLOCK + offs_m) - m_all)
                l_all += w * tl.load(ml_ptr + slot * 2 * BLOCK + BLOCK + offs_m)
                a = tl.load(acc_ptr + slot * BLOCK * BLOCK_D + offs_m[:, None] * BLOCK_D
                            + offs_d[None, :])
                o += a * w[:, None]
            o = o / tl.where(l_all > 0, l_all, 1.0)[:, None]
            o_ptrs = (o_ptr + q_rows[:, None] * stride_ot + h * stride_oh
                      + offs_d[None, :] * stride_od)
            tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def plan_splits(block_count: torch.Tensor, work: SplitWork,
                paired: torch.Tensor | None = None) -> None:
    """Hand out partial slots to the rows of ``block_count`` ``[B, Hq, MQB]`` longer than
    ``work.split_blocks`` (fills ``work.row_slot`` / ``work.segs``; two launches, no sync).
    ``paired``: ``[R]`` int32 flags of rows that run in 128-row pair tiles (never split)."""
    rows = block_count.numel()
    if work.row_slot.numel() < rows:
        raise ValueError(f"SplitWork has row_slot for {work.row_slot.numel()} rows, need {rows}")
    work.counter.zero_()
    br = 1024
    _plan_kernel[(triton.cdiv(rows, br),)](block_count,
                                           block_count if paired is None else paired,
                                           work.row_slot, work.segs, work.counter, rows,
                                           work.split_blocks, work.capacity, BR=br,
                                           PAIRS=paired is not None, num_warps=4)


def combine_splits(out: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                   mqb: int, work: SplitWork, block: int) -> None:
    """Merge the partial slices of every split row into ``out`` ``[T, Hq, D]``."""
    hq, d = out.shape[1], out.shape[2]
    _combine_kernel[(work.capacity,)](
        out, cu_seqlens_q, seq_lens, work.segs, work.counter, work.acc, work.ml, mqb,
        work.capacity, *out.stride(), HQ=hq, HEAD_DIM=d, BLOCK_D=work.acc.shape[2], BLOCK=block,
        num_warps=4)
