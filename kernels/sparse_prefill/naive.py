"""Plain-PyTorch block-sparse prefill attention over vLLM's paged KV cache (the reference).

Same signature as :func:`vllm_seer.kernels.sparse_prefill.triton.sparse_prefill_paged`.

Layout conventions
------------------
* ``k_cache`` / ``v_cache``: ``[num_pages, page_size, Hkv, D]`` *views* with arbitrary strides, so
  the CPU backend's head-major cache and the CUDA token-major cache are both read in place.
* Requests are packed: request ``b`` owns query rows ``cu_seqlens_q[b] : cu_seqlens_q[b+1]`` at
  absolute positions ``seq_lens[b] - n_b .. seq_lens[b] - 1``; its keys are positions
  ``0 .. seq_lens[b] - 1`` found through ``block_table[b]``.
* Gate blocks are ``block_size`` tokens aligned to position 0. Local query block ``j`` of request
  ``b`` is absolute block ``(seq_lens[b] - n_b) // block_size + j``.
* ``block_index[b, h, j, :block_count[b, h, j]]`` lists the active key blocks of (request, query
  head, local query block); the rest is ``-1``. Causality inside the diagonal block is applied here.
* FP8 (:mod:`.kv_fp8`): ``k_cache`` / ``v_cache`` (both or neither) and ``q`` may be
  ``float8_e4m3fn``; each float8 input comes with its per-layer scale and is read as ``float8 *
  scale``.
"""

from __future__ import annotations

import torch
from vllm_seer.kernels.sparse_prefill.kv_fp8 import check_dtype, check_presence, dequantize


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Read the first ``length`` tokens of one request from a paged cache view.

    Args:
        cache: ``[num_pages, page_size, H, D]`` (any strides).
        block_table_row: ``[max_pages]`` page ids of the request.
    Returns:
        ``[length, H, D]`` (a copy, cache dtype).
    """
    page_size = cache.shape[1]
    n_pages = -(-length // page_size)
    pages = cache[block_table_row[:n_pages].long()]  # [n_pages, page_size, H, D]
    return pages.reshape(n_pages * page_size, *cache.shape[2:])[:length]


def sparse_prefill_paged_ref(
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
    *,
    q_scale: torch.Tensor | float | None = None,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention of packed prefill rows over the paged cache.

    Args:
        q: ``[T, Hq, D]`` query rows (post-RoPE).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` views.
        block_table: ``[B, max_pages]`` int32.
        cu_seqlens_q: ``[B + 1]`` int32 row offsets into ``q``.
        seq_lens: ``[B]`` int32 context + new tokens.
        block_index: ``[B, Hq, MQB, MKB]`` int32, ``-1`` padded.
        block_count: ``[B, Hq, MQB]`` int32.
        out: ``[T, Hq, D]`` written in place (rows of every request).
        scale: softmax scale.
        block_size: gate block size (tokens).
        q_scale, k_scale, v_scale: per-layer scales, exactly for the ``float8_e4m3fn`` inputs
            (0-dim / ``[1]`` fp32 tensors as vLLM keeps them, or floats).
    Returns:
        ``out``.
    """
    kv_fp8 = check_fp8_kv(k_cache, v_cache)
    check_presence(k_scale, "k_scale", kv_fp8)
    check_presence(v_scale, "v_scale", kv_fp8)
    check_presence(q_scale, "q_scale", check_dtype(q, "q"))
    hq, hkv = q.shape[1], k_cache.shape[2]
    group = hq // hkv
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        s, e, L = cu[b], cu[b + 1], lens[b]
        n = e - s
        if n == 0:
            continue
        k = dequantize(gather_paged(k_cache, block_table[b], L), k_scale)
        v = dequantize(gather_paged(v_cache, block_table[b], L), v_scale)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qf = dequantize(q[s:e], q_scale).transpose(0, 1)  # [Hq, n, D]
        allowed = _allowed(block_index[b], block_count[b], L, n, block_size, q.device)
        logits = torch.einsum("hnd,hld->hnl", qf, k) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out[s:e] = torch.einsum("hnl,hld->hnd", p, v).transpose(0, 1).to(out.dtype)
    return out


def check_fp8_kv(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Both caches ``float8_e4m3fn`` (``True``) or both 16/32-bit (``False``)."""
    kv_fp8 = check_dtype(k_cache, "k_cache")
    if check_dtype(v_cache, "v_cache") != kv_fp8:
        raise TypeError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}: both or "
                        "neither must be float8_e4m3fn")
    return kv_fp8


def _allowed(index: torch.Tensor, count: torch.Tensor, L: int, n: int, block_size: int,
             device: torch.device) -> torch.Tensor:
    """``[Hq, n, L]`` bool: token-level mask from a request's block lists (causal included)."""
    hq, mqb, mkb = index.shape
    nkb = -(-L // block_size)
    slot = torch.arange(mkb, device=device)
    live = slot[None, None, :] < count[:, :, None].long()
    idx = torch.where(live, index.long(), torch.full_like(index.long(), nkb))
    blocks = torch.zeros(hq, mqb, nkb + 1, dtype=torch.bool, device=device)
    blocks.scatter_(-1, idx, True)
    blocks = blocks[..., :nkb]
    qpos = torch.arange(L - n, L, device=device)
    local_qb = qpos // block_size - (L - n) // block_size
    kpos = torch.arange(L, device=device)
    per_row = blocks[:, local_qb, :]  # [Hq, n, nkb]
    tok = per_row[:, :, kpos // block_size]  # [Hq, n, L]
    return tok & (kpos[None, None, :] <= qpos[None, :, None])


def masks_to_block_lists(masks: list[torch.Tensor], max_kblocks: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-request boolean block masks into ``(block_index, block_count)``.

    Args:
        masks: per request ``[Hq, nqb_b, nkb_b]`` bool.
    Returns:
        ``block_index [B, Hq, MQB, MKB]`` int32 (ascending, ``-1`` padded) and
        ``block_count [B, Hq, MQB]`` int32.
    """
    hq = masks[0].shape[0]
    mqb = max(m.shape[1] for m in masks)
    mkb = max_kblocks or max(m.shape[2] for m in masks)
    dev = masks[0].device
    index = torch.full((len(masks), hq, mqb, mkb), -1, dtype=torch.int32, device=dev)
    count = torch.zeros((len(masks), hq, mqb), dtype=torch.int32, device=dev)
    for b, m in enumerate(masks):
        nqb, nkb = m.shape[1], m.shape[2]
        ids = torch.arange(nkb, device=dev).expand_as(m)
        # active ids first (ascending), inactive pushed past the end by the sort key
        key = torch.where(m, ids, ids + nkb)
        order = key.sort(dim=-1).values
        packed = torch.where(order < nkb, order, torch.full_like(order, -1))
        index[b, :, :nqb, :nkb] = packed.to(torch.int32)
        count[b, :, :nqb] = m.sum(dim=-1).to(torch.int32)
    return index, count
