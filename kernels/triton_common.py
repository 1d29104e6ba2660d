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
