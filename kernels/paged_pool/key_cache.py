"""Pooled keys of complete blocks kept across prefill steps (chunked prefill, prefix-cache hits).

Without it every prefill step re-pools its request's whole context: a 128k prompt in 8k chunks
pools ~17k key blocks per layer instead of 2048. :class:`PooledKeyCache` keeps the pooled keys
(fp32 ``[max | min | avg]``, exactly what the pooling wrote) of every *complete* gate block, one
entry per gate block of KV-cache slots, indexed by where the block's last token lives in vLLM's
paged cache:

    entry(block) = slot(last token) // min(page_size, block_size)

so with pages of at least ``block_size`` tokens the entries are the cache's slots in blocks, and
with smaller pages (``block_size`` a multiple of ``page_size``) one entry per page, the page that
ends the block. Entries therefore belong to whichever request holds those pages and are freed and
reused with them, and two requests share an entry only where vLLM's prefix cache shares the page
that ends the block, whose hash chain makes every earlier page of that block shared too.

Validity, per layer and KV head, by step stamps (``int32``, 0 = invalid):

* :meth:`PooledKeyCache.begin_step` (the metadata builder, once per step, before the layers run)
  advances ``step`` and zeroes the stamps of every entry one of this step's new tokens lands in
  (``slot_mapping``): a page that is written is never read from the cache before it is pooled
  again, whichever request, decode step or dense-routed prefill wrote it.
* The pooling kernel reads an entry for a complete block when its stamp ``s`` satisfies
  ``0 < s < step`` (written by an earlier step and not written to since); otherwise it pools the
  block from the KV cache and, for a complete block, stores the result and ``step``. Programs of
  one launch never read what another wrote in it, and two programs that write one entry in one
  step write the same values (the same block's pooled keys).

What it cannot see: pages written without a step of this builder (a KV connector loading pages
into the cache); the backend refuses the setting together with ``--kv-transfer-config``.

Memory: ``3 * head_dim * 4`` bytes per KV head per entry and layer plus a 4-byte stamp, i.e.
``3 / 64`` of a bf16 KV cache at ``block_size = page_size = 64`` (``3 / 16`` at 16-token pages,
where one entry in four is used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAMP_LIMIT = 2**31 - 2  # steps before the stamps are cleared and counting restarts


def entry_tokens(page_size: int, block_size: int) -> int:
    """KV-cache slots per entry index step: ``min(page_size, block_size)``; raises
    ``ValueError`` unless one of the two sizes divides the other."""
    if page_size <= 0 or block_size <= 0:
        raise ValueError(f"page_size {page_size} and block_size {block_size} must be positive")
    if page_size % block_size and block_size % page_size:
        raise ValueError(f"the pooled-key cache needs the KV page size ({page_size}) and the gate "
                         f"block size ({block_size}) to divide one another")
    return min(page_size, block_size)


def entry_index(block_table_row: torch.Tensor, kb: int, page_size: int, block_size: int,
                tokens: int) -> int:
    """Entry of key block ``kb`` (host): the slot of its last token over ``tokens``."""
    last = kb * block_size + block_size - 1
    page = int(block_table_row[last // page_size])
    return (page * page_size + last % page_size) // tokens


def slots_of(block_table_row: torch.Tensor, lo: int, hi: int, page_size: int) -> torch.Tensor:
    """The KV slots (``[hi - lo]`` int64, as vLLM's ``slot_mapping``) of positions ``lo .. hi -
    1`` of the request with this block-table row."""
    pos = torch.arange(lo, hi, device=block_table_row.device)
    return block_table_row[pos // page_size].long() * page_size + pos % page_size


def num_entries(num_slots: int, tokens: int) -> int:
    """Entries for ``num_slots`` KV slots, rounded up to a multiple of 16 so that every layer's
    view of the data and stamps starts 16-byte aligned (Triton specializes kernels on pointer
    alignment: one compiled variant, built by the start-up warm-up, serves every layer)."""
    return -(-(num_slots // tokens) // 16) * 16


def entry_bytes(num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one entry in one layer: the fp32 ``[max | min | avg]`` and an int32 stamp per
    KV head."""
    return num_kv_heads * (3 * head_dim * 4 + 4)


def bytes_per_slot(num_layers: int, page_size: int, block_size: int, num_kv_heads: int,
                   head_dim: int) -> float:
    """Cache bytes per KV-cache token slot (entries are ``min(page_size, block_size)`` slots)."""
    return num_layers * entry_bytes(num_kv_heads, head_dim) / entry_tokens(page_size, block_size)


def reserve_bytes(budget: int, kv_bytes_per_slot: float, cache_bytes_per_slot: float,
                  entry_row_bytes: int) -> int:
    """The share of ``budget`` bytes (what the KV cache and this cache will split) that the cache
    of a KV cache filling the rest needs: ``budget * c / (kv + c)``, plus 16 entries of
    ``entry_row_bytes`` (all layers and heads of one entry) for :func:`num_entries`' rounding,
    rounded up to 4 KiB."""
    share = budget * cache_bytes_per_slot / (kv_bytes_per_slot + cache_bytes_per_slot)
    return int(-(-(share + 16 * entry_row_bytes) // 4096) * 4096)


@dataclass
class LayerKeyCache:
    """One layer's view of a :class:`PooledKeyCache`, as the pooling kernels take it.

    Attributes:
        data: ``[E, Hkv, 3D]`` fp32 pooled keys.
        stamps: ``[E, Hkv]`` int32 steps (0 = invalid).
        step: this step's stamp (``>= 1``).
        entry_tokens: ``min(page_size, block_size)``.
    """

    data: torch.Tensor
    stamps: torch.Tensor
    step: int
    entry_tokens: int

    def check(self, num_pages: int, page_size: int, hkv: int, d: int, block_size: int,
              device: torch.device) -> None:
        """Raise ``ValueError`` unless this cache fits a ``[num_pages, page_size, hkv, d]`` KV
        cache and ``block_size``-token gate blocks."""
        e = self.data.shape[0]
        if (self.data.dtype != torch.float32 or tuple(self.data.shape[1:]) != (hkv, 3 * d)
                or not self.data.is_contiguous()):
            raise ValueError(f"key cache data {tuple(self.data.shape)} {self.data.dtype}: "
                             f"expected contiguous [E, {hkv}, {3 * d}] float32")
        if (self.stamps.dtype != torch.int32 or tuple(self.stamps.shape) != (e, hkv)
                or not self.stamps.is_contiguous()):
            raise ValueError(f"key cache stamps {tuple(self.stamps.shape)} {self.stamps.dtype}: "
                             f"expected contiguous [{e}, {hkv}] int32")
        if self.data.device != device or self.stamps.device != device:
            raise ValueError(f"key cache on {self.data.device}, the KV cache on {device}")
        if self.entry_tokens != entry_tokens(page_size, block_size):
            raise ValueError(f"key cache made for {self.entry_tokens}-slot entries, the KV cache "
                             f"has {page_size}-token pages and the gate {block_size}-token blocks")
        if e * self.entry_tokens < num_pages * page_size:
            raise ValueError(f"key cache has {e} entries of {self.entry_tokens} slots, the KV "
                             f"cache {num_pages} pages of {page_size}")
        if not 1 <= self.step <= STAMP_LIMIT:
            raise ValueError(f"key cache step {self.step}: begin_step was not called")


@dataclass
class PooledKeyCache:
    """Every sparse layer's pooled-key entries (see the module docstring).

    Attributes:
        data: ``[L, E, Hkv, 3D]`` fp32.
        stamps: ``[L, E, Hkv]`` int32.
        entry_tokens: ``min(page_size, block_size)``.
        step: the current step's stamp (0 before the first :meth:`begin_step`).
    """

    data: torch.Tensor
    stamps: torch.Tensor
    entry_tokens: int
    step: int = 0

    @classmethod
    def allocate(cls, num_layers: int, num_slots: int, page_size: int, block_size: int,
                 num_kv_heads: int, head_dim: int, device: torch.device | str) -> PooledKeyCache:
        """Entries for a KV cache of ``num_slots`` token slots (pages x page size), in memory of
        their own (every stamp 0: nothing valid)."""
        need = cls.bytes_for(num_layers, num_slots, page_size, block_size, num_kv_heads, head_dim)
        return cls.from_storage(torch.empty(need, dtype=torch.uint8, device=device), num_layers,
                                num_slots, page_size, block_size, num_kv_heads, head_dim)

    @classmethod
    def from_storage(cls, storage: torch.Tensor, num_layers: int, num_slots: int, page_size: int,
                     block_size: int, num_kv_heads: int, head_dim: int) -> PooledKeyCache:
        """The cache laid out in ``storage`` (flat ``uint8``, memory reserved earlier); raises
        ``RuntimeError`` naming both sizes when it is too small. Every stamp is zeroed."""
        if num_slots % page_size:
            raise ValueError(f"{num_slots} KV slots are not whole {page_size}-token pages")
        need = cls.bytes_for(num_layers, num_slots, page_size, block_size, num_kv_heads, head_dim)
        if storage.dtype != torch.uint8 or storage.dim() != 1 or need > storage.numel():
            raise RuntimeError(f"Seer backend: the pooled-key cache needs {need} bytes for "
                               f"{num_layers} layers x {num_slots} KV slots ({page_size}-token "
                               f"pages), {storage.numel()} bytes were reserved at start-up")
        tokens = entry_tokens(page_size, block_size)
        e = num_entries(num_slots, tokens)
        n_data = num_layers * e * num_kv_heads * 3 * head_dim
        data = storage[:4 * n_data].view(torch.float32).view(num_layers, e, num_kv_heads,
                                                             3 * head_dim)
        stamps = storage[4 * n_data:4 * n_data + 4 * num_layers * e * num_kv_heads]
        stamps = stamps.view(torch.int32).view(num_layers, e, num_kv_heads)
        stamps.zero_()
        return cls(data, stamps, tokens)

    @staticmethod
    def bytes_for(num_layers: int, num_slots: int, page_size: int, block_size: int,
                  num_kv_heads: int, head_dim: int) -> int:
        """Device memory :meth:`allocate` takes for these sizes."""
        e = num_entries(num_slots, entry_tokens(page_size, block_size))
        return num_layers * e * entry_bytes(num_kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.stamps.nbytes

    def begin_step(self, slot_mapping: torch.Tensor) -> None:
        """A new step writes K/V at ``slot_mapping`` (``[T]`` int, negative = padding): advance
        the stamp and invalidate the entries those slots fall in (every layer and head). No host
        synchronisation (on CUDA one Triton launch, :func:`paged_pool.triton.invalidate`)."""
        if self.step >= STAMP_LIMIT:  # int32 stamps: restart counting with nothing valid
            self.stamps.zero_()
            self.step = 0
        self.step += 1
        # padding slots (-1) count as slot 0: at worst one needless re-pooling
        if self.stamps.is_cuda:  # one launch (torch's clamp / div / index_fill_ take three)
            from vllm_seer.kernels.paged_pool.triton import invalidate

            invalidate(self.stamps, slot_mapping, self.entry_tokens)
        else:
            from vllm_seer.kernels.paged_pool.naive import invalidate_ref

            invalidate_ref(self.stamps, slot_mapping, self.entry_tokens)

    def layer(self, i: int) -> LayerKeyCache:
        """The view of local sparse layer ``i`` for this step."""
        return LayerKeyCache(self.data[i], self.stamps[i], self.step, self.entry_tokens)
