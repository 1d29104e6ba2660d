"""Host-side planning for the Seer prefill kernels, once per batch (vLLM metadata builder).

The per-layer path (:func:`seer_prefill`) only launches kernels: grid sizes come from the shapes of
the buffers planned here, nothing calls ``.item()`` and nothing is allocated.

Example::

    plan = plan_batch(query_start_loc_cpu, seq_lens_cpu)           # build(): host ints
    bufs = SeerBuffers.allocate(plan, hq=32, hkv=8, head_dim=128, device="cuda")
    for layer in layers:                                           # forward(): launches only
        seer_prefill(q, k_cache, v_cache, block_table, cu_q, seq_lens, layer.gate_weight,
                     inv_freq, sel, bufs, out, scale)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm_seer.kernels.paged_pool.key_cache import LayerKeyCache, PooledKeyCache
from vllm_seer.kernels.sparse_prefill.pairs_naive import PairWork
from vllm_seer.kernels.sparse_prefill.split import SplitWork

from vllm_seer.gate import Selection, topk_count


@dataclass(frozen=True)
class SeerPlan:
    """Batch geometry in gate blocks.

    Attributes:
        num_reqs: requests in the batch (``B``).
        max_qblocks: most local query blocks of a request (``MQB``; 0 if no request has rows).
        max_kblocks: most key blocks of a request's context (``MKB``).
        block_size: gate block size.
    """

    num_reqs: int
    max_qblocks: int
    max_kblocks: int
    block_size: int = 64


def plan_batch(cu_seqlens_q: torch.Tensor | list[int], seq_lens: torch.Tensor | list[int],
               block_size: int = 64) -> SeerPlan:
    """Plan a batch from host copies of ``query_start_loc`` ``[B + 1]`` and ``seq_lens`` ``[B]``."""
    cu = cu_seqlens_q.tolist() if isinstance(cu_seqlens_q, torch.Tensor) else list(cu_seqlens_q)
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
    if len(cu) != len(lens) + 1:
        raise ValueError(f"cu_seqlens_q has {len(cu)} entries for {len(lens)} requests")
    mqb = mkb = 0
    for b, L in enumerate(lens):
        n = cu[b + 1] - cu[b]
        if n < 0 or n > L:
            raise ValueError(f"request {b}: {n} query rows for seq_len {L}")
        if n:
            mqb = max(mqb, (L - 1) // block_size - (L - n) // block_size + 1)
        mkb = max(mkb, -(-L // block_size))
    return SeerPlan(len(lens), mqb, mkb, block_size)


@dataclass
class SeerBuffers:
    """Persistent per-batch buffers shared by all layers (sized from a :class:`SeerPlan`)."""

    plan: SeerPlan
    q_pooled: torch.Tensor  # [B, MQB, Hq, D] fp32
    k_pooled: torch.Tensor  # [B, MKB, Hkv, 3D] fp32
    block_index: torch.Tensor  # [B, Hq, MQB, MKB] int32
    block_count: torch.Tensor  # [B, Hq, MQB] int32
    scores: torch.Tensor  # [B * Hq * MQB * MKB] fp32 workspace of block_select
    split: SplitWork | None = None  # long-row slices of sparse_prefill (None: no row can be long)
    topk: torch.Tensor | None = None  # [B] int32 per-request top-k k (set_topk), else per call
    pairs: PairWork | None = None  # 128-row pair tiles of sparse_prefill (None: 64-row only)

    def set_topk(self, seq_lens: list[int], sel: Selection) -> None:
        """Per-request ``k`` of ``nz_ratio`` top-k from host ``seq_lens``, once per step (an
        asynchronous pinned copy: no per-layer launches, no host sync)."""
        if sel.method != "nz_ratio":
            self.topk = None
            return
        bs = self.plan.block_size
        k = torch.tensor([topk_count(-(-L // bs), sel.nz_ratio) for L in seq_lens],
                         dtype=torch.int32)
        dev = self.block_count.device
        self.topk = k.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else k.to(dev)

    @classmethod
    def allocate(cls, plan: SeerPlan, hq: int, hkv: int, head_dim: int,
                 device: torch.device | str, split_blocks: int = 128,
                 split_capacity: int = 2048, pair_max_ratio: float = 0.0,
                 pair_list_cap: int = 256) -> SeerBuffers:
        """``split_blocks`` / ``split_capacity``: see :class:`SplitWork` (its partials take
        ``split_capacity * block * head_dim * 4`` bytes, only when a row can exceed
        ``split_blocks``). ``pair_max_ratio`` / ``pair_list_cap``: see :class:`PairWork` (0: no
        pair tiles)."""
        b, mqb, mkb = plan.num_reqs, plan.max_qblocks, plan.max_kblocks
        f32 = dict(dtype=torch.float32, device=device)
        split = pairs = None
        if mkb > split_blocks:
            split = SplitWork.allocate(b * hq * mqb, head_dim, device, plan.block_size,
                                       split_capacity, split_blocks)
        if pair_max_ratio and mqb >= 2:
            pairs = PairWork.allocate(b * hq, mqb, device, pair_list_cap, pair_max_ratio)
        return cls(
            plan,
            torch.empty(b, mqb, hq, head_dim, **f32),
            torch.empty(b, mkb, hkv, 3 * head_dim, **f32),
            torch.empty(b, hq, mqb, mkb, dtype=torch.int32, device=device),
            torch.empty(b, hq, mqb, dtype=torch.int32, device=device),
            torch.empty(b * hq * mqb * mkb, **f32),
            split,
            pairs=pairs,
        )


def seer_gate(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
              cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, weight: torch.Tensor,
              inv_freq: torch.Tensor, sel: Selection, bufs: SeerBuffers,
              rope_table: torch.Tensor | None = None,
              grouped_weight: torch.Tensor | None = None, *,
              q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
              rope_positions: torch.Tensor | None = None,
              key_cache: LayerKeyCache | None = None) -> None:
    """Pool (RoPE undone), score and select: fills ``bufs.block_index`` / ``bufs.block_count``.

    Four launches with the start-up tables and a per-step ``bufs.topk``: the pooling of K and Q
    (:func:`pool_qk`), the projection (cuBLAS), the scores and the selection.

    Args:
        q: ``[T, Hq, D]`` post-RoPE rows; k_cache ``[P, page, Hkv, D]``; weight ``[Hq, 3D, G]``.
        rope_table, grouped_weight: the start-up tables of
            :func:`vllm_seer.kernels.block_select.triton.block_select` (built per call if ``None``).
        q_scale, k_scale: scales of a float8 query / cache (the gate pools dequantized values).
        rope_positions: the start-up per-position cos/sin table of :func:`pool_qk` (computed per
            element when ``None``).
        key_cache: this layer's view of the pooled-key cache for this step (:func:`pool_qk`).
    """
    from vllm_seer.kernels.block_select.triton import block_select
    from vllm_seer.kernels.paged_pool.triton import pool_qk

    bs = bufs.plan.block_size
    pool_qk(k_cache, block_table, q, cu_seqlens_q, seq_lens, inv_freq, bufs.k_pooled,
            bufs.q_pooled, bs, k_scale=k_scale, q_scale=q_scale, rope_positions=rope_positions,
            key_cache=key_cache)
    block_select(bufs.q_pooled, bufs.k_pooled, weight, inv_freq, cu_seqlens_q, seq_lens, sel,
                 bufs.block_index, bufs.block_count, bs, bufs.scores, bufs.topk, rope_table,
                 grouped_weight)


def seer_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                 weight: torch.Tensor, inv_freq: torch.Tensor, sel: Selection,
                 bufs: SeerBuffers, out: torch.Tensor, scale: float, *,
                 q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Gate + block-sparse prefill attention of one layer; writes and returns ``out [T, Hq, D]``.
    ``q_scale`` / ``k_scale`` / ``v_scale``: scales of float8 inputs (:mod:`.sparse_prefill`)."""
    from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged

    seer_gate(q, k_cache, block_table, cu_seqlens_q, seq_lens, weight, inv_freq, sel, bufs,
              q_scale=q_scale, k_scale=k_scale)
    return sparse_prefill_paged(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens,
                                bufs.block_index, bufs.block_count, out, scale,
                                bufs.plan.block_size, bufs.split, q_scale=q_scale,
                                k_scale=k_scale, v_scale=v_scale, pairs=bufs.pairs)


SELECT_WARM_QBLOCKS = 128  # query blocks of vLLM's default 8192-token prefill chunk


def select_widths(max_blocks: int) -> list[int]:
    """Key-block counts ``MKB`` whose selection kernels differ (its row width is the next power of
    two of ``MKB``): one per power of two up to that of ``max_blocks``."""
    widths, p = [], 1
    while p < max_blocks:
        widths.append(p)
        p *= 2
    return [*widths, max_blocks]


def warm_up(q_dtype: torch.dtype, hq: int, hkv: int, head_dim: int, page_size: int,
            weight: torch.Tensor, inv_freq: torch.Tensor, sel: Selection, max_blocks: int,
            device: torch.device | str, block_size: int = 64, tokens: int = 16384,
            rope_table: torch.Tensor | None = None,
            grouped_weight: torch.Tensor | None = None, *, kv_dtype: torch.dtype | None = None,
            out_dtype: torch.dtype | None = None,
            kv_views: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
            rope_positions: torch.Tensor | None = None, pair_max_ratio: float = 0.0,
            key_cache: bool = False) -> None:
    """Compile and autotune every Seer kernel variant a request can need, on synthetic inputs.

    Autotuned configs are keyed by head dim, page and block size only, and the sizes that change
    per batch are not specialised on; what does change the compiled code is the selection row
    width (a power of two of the context's key blocks) and whether long rows are split. So: one
    synthetic ``tokens``-token prefill (long rows split), one of ``2 * block_size * 16`` tokens (no
    split), and the selection alone at every row width up to ``max_blocks`` (the longest request).

    Args:
        q_dtype: the query's dtype as the backend gets it (float8_e4m3fn when vLLM quantizes it).
        max_blocks: key blocks of the longest request (``ceil(max_model_len / block_size)``).
        tokens: clipped to ``max_blocks * block_size``.
        kv_dtype: the cache's dtype (``q_dtype`` when ``None``); float8 inputs get unit scales.
        out_dtype: the attention output's (``q_dtype`` when ``None``).
        kv_views: ``pages -> (k_cache, v_cache)`` views ``[pages, page_size, Hkv, D]`` of a random
            cache laid out as the server's real one (its strides decide which kernel variants are
            compiled: vLLM's packed K|V rows read through TMA boxes with another head stride than
            separate caches); ``None``: separate contiguous K and V caches.
        rope_positions: the per-position cos/sin table the backend passes to :func:`seer_gate`
            (its pooling variant is compiled with it).
        pair_max_ratio: the backend's (its buffers' pair tiles are compiled and autotuned too).
        key_cache: the backend keeps a pooled-key cache (the pooling variant that reads and
            writes one is compiled too, on a cache made for the synthetic pages and freed).
    """
    from vllm_seer.kernels.block_select.triton import block_select
    from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged

    dev = torch.device(device)
    kv_dtype, out_dtype = kv_dtype or q_dtype, out_dtype or q_dtype
    one = torch.ones(1, dtype=torch.float32, device=dev)
    q_scale = one if q_dtype == torch.float8_e4m3fn else None
    kv_scale = one if kv_dtype == torch.float8_e4m3fn else None
    # longest first: the scores kernel is autotuned at its first call (one config for all shapes)
    for n in sorted({min(tokens, max_blocks * block_size), min(32 * block_size,
                                                                 max_blocks * block_size)},
                    reverse=True):
        pages = -(-n // page_size)
        if kv_views is None:
            k_cache = torch.randn(pages, page_size, hkv, head_dim, device=dev).to(kv_dtype)
            v_cache = torch.randn(pages, page_size, hkv, head_dim, device=dev).to(kv_dtype)
        else:
            k_cache, v_cache = kv_views(pages)
            if k_cache.shape[1:] != (page_size, hkv, head_dim) or k_cache.dtype != kv_dtype:
                raise ValueError(f"kv_views({pages}) gave {tuple(k_cache.shape)} {k_cache.dtype}; "
                                 f"expected [{pages}, {page_size}, {hkv}, {head_dim}] {kv_dtype}")
        block_table = torch.randperm(pages, device=dev).to(torch.int32)[None]
        q = torch.randn(n, hq, head_dim, device=dev).to(q_dtype)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        lens = cu[1:].clone()
        bufs = SeerBuffers.allocate(plan_batch([0, n], [n], block_size), hq, hkv, head_dim, dev,
                                    pair_max_ratio=pair_max_ratio)
        bufs.set_topk([n], sel)
        seer_gate(q, k_cache, block_table, cu, lens, weight, inv_freq, sel, bufs, rope_table,
                  grouped_weight, q_scale=q_scale, k_scale=kv_scale,
                  rope_positions=rope_positions)
        if key_cache:  # twice: the first call stores every complete block, the second reads them
            kc = PooledKeyCache.allocate(1, pages * page_size, page_size, block_size, hkv,
                                         head_dim, dev)
            for _ in range(2):  # (slot 0 written: one block re-pooled, the others read)
                kc.begin_step(torch.zeros(16, dtype=torch.int64, device=dev))
                seer_gate(q, k_cache, block_table, cu, lens, weight, inv_freq, sel, bufs,
                          rope_table, grouped_weight, q_scale=q_scale, k_scale=kv_scale,
                          rope_positions=rope_positions, key_cache=kc.layer(0))
            del kc
        sparse_prefill_paged(q, k_cache, v_cache, block_table, cu, lens, bufs.block_index,
                             bufs.block_count, torch.empty(q.shape, dtype=out_dtype, device=dev),
                             1.0 / head_dim ** 0.5, block_size, bufs.split, q_scale=q_scale,
                             k_scale=kv_scale, v_scale=kv_scale, pairs=bufs.pairs)
    for mkb in select_widths(max_blocks):
        # a chunk of up to SELECT_WARM_QBLOCKS query blocks at the end of an mkb-block context:
        # the selection is autotuned per row width on as many rows as a long chunk gives
        n = mkb * block_size
        n_q = min(mkb, SELECT_WARM_QBLOCKS) * block_size
        cu = torch.tensor([0, n_q], dtype=torch.int32, device=dev)
        lens = torch.tensor([n], dtype=torch.int32, device=dev)
        bufs = SeerBuffers.allocate(plan_batch([0, n_q], [n], block_size), hq, hkv, head_dim,
                                    dev)
        bufs.set_topk([n], sel)
        bufs.q_pooled.normal_()
        bufs.k_pooled.normal_()
        block_select(bufs.q_pooled, bufs.k_pooled, weight, inv_freq, cu, lens, sel,
                     bufs.block_index, bufs.block_count, block_size, bufs.scores, bufs.topk,
                     rope_table, grouped_weight)
        del bufs  # one width's buffers at a time (128 rows at 16k blocks: ~0.7 GB)
