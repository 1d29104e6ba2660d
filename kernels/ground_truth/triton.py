"""FlashAttention-style Triton kernel for the gate-distillation ground truth.

Same signature as :func:`vllm_seer.kernels.ground_truth.naive.block_attn_ground_truth`.

One program per (query block, query head), ``BLOCK`` query rows. Pass 1 streams the causal key
blocks and keeps, per row, the running softmax max ``m`` and normaliser ``l`` (online softmax) and,
per (row, key block), the block's raw row max of the scores ``s_max`` written to a scratch
``[Hq, T, nkb]`` buffer (fp32, ``T * nkb`` per head: ``1/B`` of the attention map). The epilogue
turns each into ``exp(s_max - m) / l`` — the row's largest probability inside the block — and
max-reduces over the block's rows, then normalises the query-block row. The ``[T, T]`` probability
map never exists in memory.

Under ``TRITON_INTERPRET=1`` (CPU) ``tl.dot`` runs on fp32 tiles (the interpreter's bf16 dot is
wrong); on GPU it runs in the input dtype with fp32 accumulation.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _gt_fwd(q_ptr, k_ptr, smax_ptr, out_ptr, T, NKB, scale,
            stride_qt, stride_qh, stride_kt, stride_kh,
            GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, F32_DOT: tl.constexpr):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    row_ok = rows < T
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_qt + h * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK], tl.float32)
    smax_row = smax_ptr + (h.to(tl.int64) * T + rows.to(tl.int64)) * NKB
    for kb in range(0, qb + 1):
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        k = tl.load(k_ptr + cols[:, None].to(tl.int64) * stride_kt + hk * stride_kh
                    + dims[None, :], mask=(cols < T)[:, None], other=0.0)
        if F32_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK, BLOCK] fp32
        ok = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T)
        s = tl.where(ok, s, float("-inf"))
        bmax = tl.max(s, axis=1)
        tl.store(smax_row + kb, bmax, mask=row_ok)
        m_new = tl.maximum(m, bmax)
        l_sum = l_sum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    # epilogue: each stored block max becomes that row's largest probability in the block,
    # max-pooled over the block's rows; pass A sums the row, pass B writes it normalised.
    tl.debug_barrier()  # smax was written in another thread layout than it is read back
    kbs = tl.arange(0, BLOCK)
    denom = 0.0
    for c0 in range(0, qb + 1, BLOCK):
        denom += tl.sum(_pooled(smax_row, c0 + kbs, qb, row_ok, m, l_sum), axis=0)
    out_row = out_ptr + (h.to(tl.int64) * NKB + qb) * NKB
    for c0 in range(0, NKB, BLOCK):
        kbi = c0 + kbs
        pooled = _pooled(smax_row, kbi, qb, row_ok, m, l_sum)
        tl.store(out_row + kbi, tl.where(kbi <= qb, pooled / denom, 0.0), mask=kbi < NKB)


@triton.jit
def _pooled(smax_row, kbi, qb, row_ok, m, l_sum):
    """``[BLOCK]`` max over rows of ``exp(s_max - m) / l`` for key blocks ``kbi`` (0 if masked)."""
    valid = (kbi[None, :] <= qb) & row_ok[:, None]
    sm = tl.load(smax_row[:, None] + kbi[None, :], mask=valid, other=float("-inf"))
    p = tl.where(valid, tl.exp(sm - m[:, None]) / l_sum[:, None], 0.0)
    return tl.max(p, axis=0)


def block_attn_ground_truth(q: torch.Tensor, k: torch.Tensor, block_size: int = 64,
                            sm_scale: float | None = None, chunk: int = 512) -> torch.Tensor:
    """Block max-pooled, row-normalised causal attention probabilities (Triton).

    Args:
        q: ``[T, Hq, D]`` post-RoPE queries; k: ``[T, Hkv, D]`` post-RoPE keys (``Hq % Hkv == 0``).
        block_size: tile edge ``B`` (power of two, >= 16).
        sm_scale: softmax scale (default ``1 / sqrt(D)``).
        chunk: unused (kept for signature parity with the reference).
    Returns:
        ``[Hq, nqb, nkb]`` fp32, rows sum to 1, zero above the block diagonal.
    """
    del chunk
    t, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if d & (d - 1) or block_size & (block_size - 1) or block_size < 16:
        raise ValueError("head_dim and block_size must be powers of two (block_size >= 16)")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    nb = -(-t // block_size)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    smax = torch.empty(hq, t, nb, dtype=torch.float32, device=q.device)
    out = torch.full((hq, nb, nb), float("nan"), dtype=torch.float32, device=q.device)
    f32 = os.environ.get("TRITON_INTERPRET") == "1"
    _gt_fwd[(nb, hq)](q, k, smax, out, t, nb, scale, q.stride(0), q.stride(1), k.stride(0),
                      k.stride(1), GROUP=hq // hkv, D=d, BLOCK=block_size, F32_DOT=f32,
                      num_warps=4)
    return out
