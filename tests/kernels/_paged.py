"""Shared builders for the kernel tests: ragged batches written into a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class PagedBatch:
    """A varlen batch over a paged cache (views like vLLM's, see ``sparse_prefill/naive.py``)."""

    q: torch.Tensor  # [T, Hq, D] this step's query rows
    k_cache: torch.Tensor  # [P, page_size, Hkv, D] view
    v_cache: torch.Tensor  # [P, page_size, Hkv, D] view
    block_table: torch.Tensor  # [B, max_pages] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    keys: list[torch.Tensor]  # per request [L, Hkv, D] (what the cache holds)
    n_new: list[int]


def make_batch(seq_lens: list[int], n_new: list[int], hq: int, hkv: int, d: int, page_size: int,
               dtype: torch.dtype = torch.float16, layout: str = "token", device: str = "cpu",
               ) -> PagedBatch:
    """Random K/V for every context position, scattered over shuffled pages.

    ``layout``: ``"token"`` (CUDA: ``[P, page, Hkv, D]`` contiguous), ``"head"`` (CPU:
    ``[P, Hkv, page, D]`` transposed), ``"kv"`` (``[P, Hkv, page, 2D]`` K|V, sliced: vLLM's HND
    layout) or ``"nhd"`` (``[P, page, Hkv, 2D]`` K|V rows, sliced: vLLM CUDA's default NHD layout).
    """
    pages_per = [-(-L // page_size) for L in seq_lens]
    max_pages = max(pages_per) + 1
    total = sum(pages_per) + 3
    perm = torch.randperm(total, device=device)
    if layout == "token":
        k_cache = torch.randn(total, page_size, hkv, d, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
    elif layout == "head":
        k_cache = torch.randn(total, hkv, page_size, d, dtype=dtype, device=device).transpose(1, 2)
        v_cache = torch.randn(total, hkv, page_size, d, dtype=dtype, device=device).transpose(1, 2)
    elif layout == "kv":
        kv = torch.randn(total, hkv, page_size, 2 * d, dtype=dtype, device=device)
        k_cache, v_cache = kv[..., :d].transpose(1, 2), kv[..., d:].transpose(1, 2)
    elif layout == "nhd":
        kv = torch.randn(total, page_size, hkv, 2 * d, dtype=dtype, device=device)
        k_cache, v_cache = kv[..., :d], kv[..., d:]
    else:
        raise ValueError(layout)
    block_table = torch.full((len(seq_lens), max_pages), total - 1, dtype=torch.int32,
                             device=device)
    keys, used = [], 0
    for b, L in enumerate(seq_lens):
        ids = perm[used:used + pages_per[b]]
        used += pages_per[b]
        block_table[b, :len(ids)] = ids.to(torch.int32)
        keys.append(k_cache[ids.long()].reshape(-1, hkv, d)[:L])
    cu = torch.tensor([0] + n_new, device=device).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, dtype=dtype, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return PagedBatch(q, k_cache, v_cache, block_table, cu, lens, keys, list(n_new))


def random_block_masks(seq_lens: list[int], n_new: list[int], hq: int, block_size: int,
                       density: float, device: str = "cpu") -> list[torch.Tensor]:
    """Per request ``[Hq, nqb, nkb]`` bool: random causal blocks, diagonal always on."""
    masks = []
    for L, n in zip(seq_lens, n_new, strict=True):
        nkb = -(-L // block_size)
        qb0 = (L - n) // block_size
        nqb = (L - 1) // block_size - qb0 + 1 if n else 0
        qb = qb0 + torch.arange(nqb, device=device)
        kb = torch.arange(nkb, device=device)
        m = torch.rand(hq, nqb, nkb, device=device) < density
        m |= kb[None, None, :] == qb[None, :, None]
        m &= kb[None, None, :] <= qb[None, :, None]
        masks.append(m)
    return masks


def to_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` as ``float8_e4m3fn`` over uint8 storage with ``x``'s shape and strides (how
    vLLM keeps an FP8 cache: uint8 viewed as float8)."""
    raw = torch.empty_strided(x.shape, x.stride(), dtype=torch.uint8, device=x.device)
    fp8 = raw.view(torch.float8_e4m3fn)
    fp8.copy_((x.float() / scale).to(torch.float8_e4m3fn))
    return fp8


def fp8_batch(batch: PagedBatch, k_scale: float, v_scale: float,
              q_scale: float | None = None) -> PagedBatch:
    """The batch with its caches (and, with ``q_scale``, its query) quantized to FP8 (strides kept;
    ``keys`` are the dequantized keys)."""
    k8, v8 = to_fp8(batch.k_cache, k_scale), to_fp8(batch.v_cache, v_scale)
    q = batch.q if q_scale is None else to_fp8(batch.q, q_scale)
    keys = []
    for b, L in enumerate(batch.seq_lens.tolist()):
        page = k8.shape[1]
        ids = batch.block_table[b, :-(-L // page)].long()
        keys.append(k8[ids].float().reshape(-1, *k8.shape[2:])[:L] * k_scale)
    return PagedBatch(q, k8, v8, batch.block_table, batch.cu_seqlens_q, batch.seq_lens, keys,
                      batch.n_new)


def assert_split_ran(work, count: torch.Tensor, split: tuple[int, int]) -> None:
    """After a sparse prefill with a ``SplitWork`` of ``split = (split_blocks, capacity)``: rows
    longer than ``split_blocks`` exist, some of them took slices (all of them unless the capacity
    overflowed), and the overflow happened exactly when more slices were asked than fit."""
    n_split = int((count > split[0]).sum())
    taken = int((work.row_slot[:count.numel()] >= 0).sum())
    assert n_split > 0 and 0 < taken <= n_split
    assert (taken < n_split) == (int(work.counter) > split[1])


def overlapping_block_masks(seq_lens: list[int], n_new: list[int], hq: int, block_size: int,
                            density: float, flip: float, device: str = "cpu",
                            ) -> list[torch.Tensor]:
    """:func:`random_block_masks` whose odd local query blocks copy the row before them with a
    fraction ``flip`` of their causal blocks toggled (adjacent rows overlap, as real gates'
    do), diagonal always on."""
    masks = random_block_masks(seq_lens, n_new, hq, block_size, density, device)
    for L, n, m in zip(seq_lens, n_new, masks, strict=True):
        qb0 = (L - n) // block_size
        kb = torch.arange(m.shape[2], device=device)
        for j in range(1, m.shape[1], 2):
            causal = kb <= qb0 + j
            toggle = (torch.rand(hq, m.shape[2], device=device) < flip) & causal
            m[:, j] = (m[:, j - 1] ^ toggle) & causal
            m[:, j, qb0 + j] = True
    return masks
