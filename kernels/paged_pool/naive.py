"""Plain-PyTorch gate pooling (reference): K from the paged cache, Q from this step's packed rows.

Same signatures as :mod:`vllm_seer.kernels.paged_pool.triton`. Both undo RoPE per token (NeoX
layout, angle ``position * inv_freq`` in fp32) before pooling, because max/min pooling does not
commute with the rotation; ``inv_freq=None`` pools the values as they are (pre-RoPE cache).
A ``float8_e4m3fn`` cache (or query) is read as ``float8 * scale`` with vLLM's per-layer scale
(:mod:`vllm_seer.kernels.sparse_prefill.kv_fp8`): the gate pools dequantized keys.

Output layouts (fp32, padded; entries past a request's blocks are left untouched):

* K: ``out[b, kb, h, :] = [max | min | avg]`` over the real tokens of absolute block ``kb``
  (positions ``kb*bs .. min(L, (kb+1)*bs) - 1``), ``[B, MKB, Hkv, 3D]``.
* Q: ``out[b, j, h, :]`` = mean over the rows present of absolute block ``qb0 + j`` with
  ``qb0 = (L - n) // bs``, ``[B, MQB, Hq, D]``.
"""

from __future__ import annotations

import torch
from vllm_seer.kernels.paged_pool.key_cache import LayerKeyCache, entry_index
from vllm_seer.kernels.sparse_prefill.kv_fp8 import check_dtype, check_presence, dequantize
from vllm_seer.kernels.sparse_prefill.naive import gather_paged

from vllm_seer.gate import block_rope_table, pool_k, pool_q
from vllm_seer.rope import rotate


def _unrope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor | None
            ) -> torch.Tensor:
    """``x`` fp32 ``[N, H, D]`` rotated back to pre-RoPE (as it is when ``inv_freq`` is None)."""
    if inv_freq is None:
        return x
    return rotate(x, positions, inv_freq, inverse=True)


def pool_k_paged_ref(
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    inv_freq: torch.Tensor | None,
    out: torch.Tensor,
    block_size: int = 64,
    *,
    k_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Pool every context key of every request per ``block_size`` block.

    Args:
        k_cache: ``[num_pages, page_size, Hkv, D]`` post-RoPE keys (any strides), 16/32-bit or
            float8_e4m3fn.
        block_table: ``[B, max_pages]`` int32.
        seq_lens: ``[B]`` int32 context + new tokens (all already written to the cache).
        inv_freq: ``[D // 2]`` fp32 RoPE inverse frequencies, or ``None`` (no RoPE to undo).
        out: ``[B, MKB, Hkv, 3D]`` fp32, ``MKB >= ceil(max(seq_lens) / block_size)``.
        block_size: gate block size.
        k_scale: vLLM's per-layer K scale, exactly for a float8 cache.
    Returns:
        ``out``.
    """
    check_presence(k_scale, "k_scale", check_dtype(k_cache, "k_cache"))
    for b, L in enumerate(seq_lens.tolist()):
        if L == 0:
            continue
        k = dequantize(gather_paged(k_cache, block_table[b], L), k_scale)
        k_pre = _unrope(k, torch.arange(L, device=k.device), inv_freq)
        pooled = pool_k(k_pre, block_size)
        out[b, :pooled.shape[0]] = pooled
    return out


def pool_q_varlen_ref(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    inv_freq: torch.Tensor | None,
    out: torch.Tensor,
    block_size: int = 64,
    *,
    q_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Average this step's query rows per absolute block (blocks cut by the chunk start included).

    Args:
        q: ``[T, Hq, D]`` post-RoPE query rows, request ``b`` at positions ``L_b - n_b .. L_b - 1``
            (16/32-bit or float8_e4m3fn).
        cu_seqlens_q: ``[B + 1]`` int32.
        seq_lens: ``[B]`` int32.
        inv_freq: ``[D // 2]`` fp32 or ``None``.
        out: ``[B, MQB, Hq, D]`` fp32.
        block_size: gate block size.
        q_scale: the query's scale, exactly for a float8 query.
    Returns:
        ``out``.
    """
    check_presence(q_scale, "q_scale", check_dtype(q, "q"))
    cu = cu_seqlens_q.tolist()
    for b, L in enumerate(seq_lens.tolist()):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        start = L - n
        q_pre = _unrope(dequantize(q[cu[b]:cu[b + 1]], q_scale),
                        torch.arange(start, L, device=q.device), inv_freq)
        pooled, _ = pool_q(q_pre, start, block_size)
        out[b, :pooled.shape[0]] = pooled
    return out


def invalidate_ref(stamps: torch.Tensor, slot_mapping: torch.Tensor, entry_tokens: int) -> None:
    """Zero ``stamps`` ``[L, E, Hkv]`` at every entry ``max(slot, 0) // entry_tokens`` of
    ``slot_mapping`` ``[T]`` (negative slots are padding: entry 0)."""
    if slot_mapping.numel():
        entries = slot_mapping.clamp(min=0).div(entry_tokens, rounding_mode="floor")
        stamps.index_fill_(1, entries.to(torch.int64), 0)


def _through_cache(kc: LayerKeyCache, k_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, k_out: torch.Tensor, block_size: int) -> None:
    """Replace / store ``k_out``'s complete blocks by the rule of ``pool_qk_ref``'s key cache."""
    num_pages, page_size, hkv, d = k_cache.shape
    kc.check(num_pages, page_size, hkv, d, block_size, k_cache.device)
    for b, L in enumerate(seq_lens.tolist()):
        for kb in range(L // block_size):
            e = entry_index(block_table[b], kb, page_size, block_size, kc.entry_tokens)
            stamp = kc.stamps[e]
            hit = (stamp > 0) & (stamp < kc.step)  # [Hkv]
            k_out[b, kb, hit] = kc.data[e, hit]
            kc.data[e, ~hit] = k_out[b, kb, ~hit]
            kc.stamps[e, ~hit] = kc.step


def pool_qk_ref(
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
    """:func:`pool_k_paged_ref` then :func:`pool_q_varlen_ref` (the Triton ``pool_qk`` does both
    in one launch); returns ``(k_out, q_out)``. ``rope_positions``: the per-position cos/sin table
    the Triton kernel reads instead of evaluating cos/sin; here it is only checked to be that of
    ``inv_freq`` (:func:`vllm_seer.gate.block_rope_table` with block size 1) over every position
    of the batch, and the angles are computed as without it.

    ``key_cache``: per complete key block and KV head, the entry's value when its stamp is in
    ``(0, step)``, else the pooled value, stored with ``step``
    (:mod:`vllm_seer.kernels.paged_pool.key_cache`)."""
    if rope_positions is not None:
        if inv_freq is None:
            raise ValueError("rope_positions without inv_freq: nothing to un-rotate")
        want = block_rope_table(inv_freq.to(rope_positions.device), rope_positions.shape[0], 1)
        if want.shape != rope_positions.shape or not torch.allclose(want, rope_positions):
            raise ValueError("rope_positions is not block_rope_table(inv_freq, NPOS, 1)")
        if int(seq_lens.max()) > rope_positions.shape[0]:
            raise ValueError(f"rope_positions covers {rope_positions.shape[0]} positions, a "
                             f"request has {int(seq_lens.max())}")
    pool_k_paged_ref(k_cache, block_table, seq_lens, inv_freq, k_out, block_size, k_scale=k_scale)
    if key_cache is not None:
        _through_cache(key_cache, k_cache, block_table, seq_lens, k_out, block_size)
    pool_q_varlen_ref(q, cu_seqlens_q, seq_lens, inv_freq, q_out, block_size, q_scale=q_scale)
    return k_out, q_out
