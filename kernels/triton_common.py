"""Triton helpers shared by the Seer kernels."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def cos_sin(pos, f_ptr, offs, half_ok, HAS_ROPE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """``[R, HALF]`` cos/sin of ``pos * inv_freq`` (fp32), computed once and reused by every head."""
    if HAS_ROPE:
        f = tl.load(f_ptr + offs, mask=half_ok, other=0.0)
        ang = pos.to(tl.float32)[:, None] * f[None, :]
        if LIBDEVICE:
            c = libdevice.cos(ang)
            s = libdevice.sin(ang)
        else:
            c = tl.cos(ang)
            s = tl.sin(ang)
    else:  # identity rotation
        c = 1.0
        s = 0.0
    return c, s


@triton.jit
def rope_cs(pos, ok, f_ptr, t_ptr, offs, half_ok, HALF: tl.constexpr, HAS_ROPE: tl.constexpr,
            HAS_TABLE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """``[R, HALF]`` cos/sin of ``pos * inv_freq``: read from the per-position table ``t``
    ``[NPOS, 2, HALF]`` fp32 (``HAS_TABLE``: :func:`vllm_seer.gate.block_rope_table` with block
    size 1, the same fp32 angles; rows where ``ok`` is false are not read), else computed
    (:func:`cos_sin`)."""
    if HAS_TABLE:
        rows = t_ptr + pos.to(tl.int64)[:, None] * (2 * HALF) + offs[None, :]
        m = ok[:, None] & half_ok[None, :]
        c = tl.load(rows, mask=m, other=1.0)
        s = tl.load(rows + HALF, mask=m, other=0.0)
    else:
        c, s = cos_sin(pos, f_ptr, offs, half_ok, HAS_ROPE, LIBDEVICE)
    return c, s


@triton.jit
def request_blocks(cu_ptr, lens_ptr, b, BLOCK: tl.constexpr):
    """This step's rows of request ``b`` in gate blocks (int64): ``(q_lo, start, seq_len, qb0,
    nqb)``: its first packed query row, the first and past-the-last position of its rows, its first
    absolute query block and how many query blocks its rows touch (0 when it has no rows)."""
    q_lo = tl.load(cu_ptr + b).to(tl.int64)
    n = tl.load(cu_ptr + b + 1).to(tl.int64) - q_lo
    seq_len = tl.load(lens_ptr + b).to(tl.int64)
    start = seq_len - n
    qb0 = start // BLOCK
    nqb = tl.where(n > 0, (seq_len - 1) // BLOCK - qb0 + 1, 0)
    return q_lo, start, seq_len, qb0, nqb
