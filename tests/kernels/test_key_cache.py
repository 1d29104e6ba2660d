"""The pooled-key cache across prefill steps (``pool_qk(..., key_cache=...)``) vs its reference.

A request is prefilled in chunks (a second one beside it): every step's pooled keys must be those
of pooling the whole context afresh, bit for bit (the cache holds what the pooling wrote), while
complete blocks of earlier steps are really read from the cache (shown by changing K in the KV
cache behind its back: the cached value comes out until a step writes those slots).
"""

from __future__ import annotations

import pytest
import torch
from _paged import DEVICE, make_batch
from vllm_seer.kernels.paged_pool.key_cache import (
    STAMP_LIMIT,
    PooledKeyCache,
    bytes_per_slot,
    entry_index,
    entry_tokens,
    reserve_bytes,
    slots_of,
)

from vllm_seer.gate import block_rope_table
from vllm_seer.rope import RopeSpec


def _slots(block_table: torch.Tensor, b: int, lo: int, hi: int, page: int) -> torch.Tensor:
    return slots_of(block_table[b], lo, hi, page)


def _pool(fn, batch, lens, n_new, inv, bs, table, kc=None):
    """One step's pooling of the requests at lengths ``lens`` with ``n_new`` new rows each."""
    hkv, d = batch.k_cache.shape[2], batch.k_cache.shape[3]
    mkb = max(-(-L // bs) for L in lens) + 1
    k_out = torch.full((len(lens), mkb, hkv, 3 * d), float("nan"), device=DEVICE)
    mqb = max(-(-n // bs) + 1 for n in n_new)  # query blocks a step's rows can touch
    q_out = torch.full((len(lens), mqb, batch.q.shape[1], d), float("nan"), device=DEVICE)
    cu = torch.tensor([0, *n_new], device=DEVICE).cumsum(0).to(torch.int32)
    q = batch.q[:int(cu[-1])]
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    fn(batch.k_cache, batch.block_table, q, cu, seq, inv, k_out, q_out, bs,
       rope_positions=table, key_cache=kc)
    return k_out


def _chunked(page: int, bs: int, hkv: int, d: int, total: list[int], chunk: int,
             dtype: torch.dtype = torch.float16) -> None:
    from vllm_seer.kernels.paged_pool import pool_qk, pool_qk_ref

    batch = make_batch(total, [chunk] * len(total), 2 * hkv, hkv, d, page, dtype, "token", DEVICE)
    inv = RopeSpec(d, 10000.0).inv_freq().to(DEVICE)
    table = block_rope_table(inv, max(total) + 1, 1)
    num_slots = batch.k_cache.shape[0] * page
    cache = PooledKeyCache.allocate(1, num_slots, page, bs, hkv, d, DEVICE)
    ref = PooledKeyCache.allocate(1, num_slots, page, bs, hkv, d, DEVICE)
    done = [0] * len(total)
    poisoned, poison_at = None, 2  # the step after which K changes behind the cache's back
    step, checked = 0, False
    while any(dn < t for dn, t in zip(done, total, strict=True)):
        n_new = [min(chunk, t - dn) for dn, t in zip(done, total, strict=True)]
        lens = [dn + n for dn, n in zip(done, n_new, strict=True)]
        slots = torch.cat([_slots(batch.block_table, b, done[b], lens[b], page)
                           for b in range(len(total))])
        cache.begin_step(slots)
        ref.begin_step(slots)
        fresh = _pool(pool_qk, batch, lens, n_new, inv, bs, table)
        got = _pool(pool_qk, batch, lens, n_new, inv, bs, table, cache.layer(0))
        want = _pool(pool_qk_ref, batch, lens, n_new, inv, bs, table, ref.layer(0))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
        if poisoned is None:
            torch.testing.assert_close(got, fresh, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(want, _pool(pool_qk_ref, batch, lens, n_new, inv, bs,
                                                   table), rtol=0, atol=0, equal_nan=True)
        else:  # the cached value of the poisoned block, not the changed keys
            page_id, saved, old = poisoned
            torch.testing.assert_close(got[0, 0], old, rtol=0, atol=0)
            assert not torch.equal(fresh[0, 0], old)
            got[0, 0] = fresh[0, 0]
            torch.testing.assert_close(got, fresh, rtol=0, atol=0, equal_nan=True)
            batch.k_cache[page_id, 0] = saved  # as it was: cached and KV cache agree again
            poisoned, checked = None, True
        assert torch.equal(cache.stamps > 0, ref.stamps > 0)
        valid = cache.stamps[0] > 0
        torch.testing.assert_close(cache.data[0][valid], ref.data[0][valid], rtol=1e-4, atol=1e-4)
        # every complete block of every request is held after its step
        for b, L in enumerate(lens):
            for kb in range(L // bs):
                e = entry_index(batch.block_table[b], kb, page, bs, cache.entry_tokens)
                assert (cache.stamps[0, e] > 0).all(), (b, kb)
        step += 1
        if step == poison_at:
            # change request 0's first block in the KV cache without a step that writes it
            page_id = int(batch.block_table[0, 0])
            saved = batch.k_cache[page_id, 0].clone()
            batch.k_cache[page_id, 0] += 1.0
            poisoned = (page_id, saved, got[0, 0].clone())
        done = lens
    assert checked, "the prefill ended before the cache was read after K changed"
    # a step that writes a block's slots (a page reused by another request, or written by a
    # decode step) invalidates its entry: pooled afresh from the new keys
    lens, n_new = total, [1] * len(total)
    held = _pool(pool_qk, batch, lens, n_new, inv, bs, table, cache.layer(0))
    # (the slot of the block's last token: with pages smaller than a block, vLLM's prefix cache
    # shares a block's earlier pages wherever it shares the page that ends it)
    last = bs - 1
    batch.k_cache[int(batch.block_table[1, last // page]), last % page] += 1.0
    cache.begin_step(_slots(batch.block_table, 1, last, bs, page))
    got = _pool(pool_qk, batch, lens, n_new, inv, bs, table, cache.layer(0))
    fresh = _pool(pool_qk, batch, lens, n_new, inv, bs, table)
    torch.testing.assert_close(got, fresh, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(got[1, 0], held[1, 0])


@pytest.mark.parametrize("page,bs", [(16, 64), (64, 64), (128, 64), (16, 32)])
def test_key_cache_chunked_prefill(page: int, bs: int) -> None:
    _chunked(page, bs, 2, 64, [5 * bs + 7, 3 * bs], 2 * bs - 24)


def test_key_cache_bf16_three_requests() -> None:
    _chunked(32, 64, 1, 64, [300, 130, 65], 70, torch.bfloat16)


def test_key_cache_refuses_misfits() -> None:
    from vllm_seer.kernels.paged_pool import pool_qk

    with pytest.raises(ValueError, match="divide one another"):
        entry_tokens(48, 64)
    with pytest.raises(ValueError, match="whole 16-token pages"):
        PooledKeyCache.allocate(1, 100, 16, 64, 1, 64, DEVICE)
    batch = make_batch([400], [40], 2, 1, 64, 16, torch.float16, "token", DEVICE)
    small = PooledKeyCache.allocate(1, 16 * 2, 16, 64, 1, 64, DEVICE)  # 16 entries of 28 pages
    small.begin_step(torch.zeros(0, dtype=torch.int64, device=DEVICE))
    k = torch.empty(1, 8, 1, 192, device=DEVICE)
    q = torch.empty(1, 2, 2, 64, device=DEVICE)
    args = (batch.k_cache, batch.block_table, batch.q, batch.cu_seqlens_q, batch.seq_lens, None,
            k, q)
    with pytest.raises(ValueError, match="entries of 16 slots"):
        pool_qk(*args, key_cache=small.layer(0))
    unstarted = PooledKeyCache.allocate(1, batch.k_cache.shape[0] * 16, 16, 64, 1, 64, DEVICE)
    with pytest.raises(ValueError, match="begin_step was not called"):
        pool_qk(*args, key_cache=unstarted.layer(0))
    other = PooledKeyCache.allocate(1, batch.k_cache.shape[0] * 16, 16, 64, 2, 64, DEVICE)
    other.begin_step(torch.zeros(0, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"expected contiguous \[E, 1, 192\] float32"):
        pool_qk(*args, key_cache=other.layer(0))


def test_key_cache_reserve_covers_the_kv_cache_vllm_sizes_after_it() -> None:
    """The profiling run reserves the cache's share of the budget left; whatever KV cache vLLM
    then fits into the rest (at most that budget), the cache laid out for it fits the reserve."""
    kv = 32 * 2 * 8 * 128 * 2  # Llama-3.1-8B bf16 bytes per token, all layers
    c = bytes_per_slot(32, 16, 64, 8, 128)  # the smallest page the server may get
    assert c == 32 * 8 * (3 * 128 * 4 + 4) / 16
    budget = 60 * 2**30
    size = reserve_bytes(budget, kv, c, 32 * 8 * (3 * 128 * 4 + 4))
    slots = (budget - size) // kv  # the KV cache vLLM sizes from what is left
    assert PooledKeyCache.bytes_for(32, slots // 16 * 16, 16, 64, 8, 128) <= size
    storage = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    cache = PooledKeyCache.from_storage(storage, 32, slots // 16 * 16, 16, 64, 8, 128)
    assert cache.data.shape == (32, -(-(slots // 16) // 16) * 16, 8, 384)  # 16-entry multiple
    assert not cache.stamps.any()
    assert cache.data.data_ptr() == storage.data_ptr()
    with pytest.raises(RuntimeError, match=r"needs \d+ bytes .* were reserved at start-up"):
        PooledKeyCache.from_storage(storage[:4096], 32, slots // 16 * 16, 16, 64, 8, 128)


def test_backend_lays_the_cache_out_in_the_reserve() -> None:
    from types import SimpleNamespace

    from vllm_seer.backend import pooled_keys
    from vllm_seer.config import SeerConfigError

    with pytest.raises(SeerConfigError, match="'pooled_key_cache': .*page size \\(48\\)"):
        pooled_keys.check_pages([16, 48], 64)
    pooled_keys.check_pages([16, 64, 128], 64)
    k_cache = torch.zeros(10, 64, 2, 64, device=DEVICE)
    rt = SimpleNamespace(key_cache=None, key_cache_reserve=None, sparse_layers=(0, 2),
                         block_size=64, num_kv_heads=2, head_dim=64)
    pooled_keys.ensure(rt, k_cache)  # no reserve (setting off): nothing
    assert rt.key_cache is None
    rt.key_cache_reserve = torch.full((2**20,), 7, dtype=torch.uint8, device=DEVICE)
    pooled_keys.ensure(rt, k_cache)
    assert rt.key_cache.data.shape == (2, 16, 2, 192) and rt.key_cache.step == 1  # 10 -> 16
    assert not rt.key_cache.stamps.any()  # nothing valid before a kernel stores it


def test_key_cache_steps_restart_before_int32_overflow() -> None:
    cache = PooledKeyCache.allocate(2, 256, 64, 64, 1, 8, DEVICE)
    cache.stamps.fill_(7)
    cache.step = STAMP_LIMIT
    cache.begin_step(torch.tensor([-1, 70], device=DEVICE))
    assert cache.step == 1
    assert not cache.stamps.any()  # nothing from before the restart counts as valid
    cache.stamps.fill_(1)
    cache.begin_step(torch.tensor([-1, 70, 200], device=DEVICE))  # padding slot -> entry 0
    assert cache.stamps[:, [0, 1, 3]].eq(0).all() and cache.stamps[:, 2].eq(1).all()
    assert cache.nbytes == PooledKeyCache.bytes_for(2, 256, 64, 64, 1, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 64])
def test_key_cache_gpu(page: int) -> None:
    # Llama-3.1-8B KV shapes, two requests prefilled in 2k chunks
    _chunked(page, 64, 8, 128, [9000, 4160], 2048, torch.bfloat16)


@pytest.mark.parametrize("hkv,tokens", [(8, 64), (3, 16)])
def test_invalidate_kernel_matches_reference(hkv: int, tokens: int) -> None:
    from vllm_seer.kernels.paged_pool.naive import invalidate_ref
    from vllm_seer.kernels.paged_pool.triton import invalidate

    stamps = torch.randint(1, 50, (3, 40, hkv), dtype=torch.int32, device=DEVICE)
    slots = torch.randint(0, 40 * tokens, (150,), device=DEVICE)
    slots[::17] = -1  # padding
    want = stamps.clone()
    invalidate_ref(want, slots, tokens)
    invalidate(stamps, slots.to(torch.int32), tokens)
    assert torch.equal(stamps, want) and (want == 0).any() and (want > 0).any()
    invalidate(stamps, slots[:0], tokens)  # an empty step: nothing
    assert torch.equal(stamps, want)
    with pytest.raises(ValueError, match=r"expected contiguous \[L, E, Hkv\] int32"):
        invalidate(stamps.transpose(0, 1), slots, tokens)


@pytest.mark.parametrize("page", [16, 64])
def test_key_cache_prefix_shared_pages(page: int) -> None:
    """Request 1 shares request 0's first two blocks' pages (a prefix-cache hit): in one step
    both pool and store those entries (the same values), in the next request 1 reads them; layer
    1 of a two-layer cache, layer 0 untouched."""
    from vllm_seer.kernels.paged_pool import pool_qk

    bs, hkv, d = 64, 2, 64
    batch = make_batch([300, 260], [300, 260], 4, hkv, d, page, torch.float16, "token", DEVICE)
    shared = 2 * bs // page
    batch.block_table[1, :shared] = batch.block_table[0, :shared]
    inv = RopeSpec(d, 10000.0).inv_freq().to(DEVICE)
    table = block_rope_table(inv, 301, 1)
    cache = PooledKeyCache.allocate(2, batch.k_cache.shape[0] * page, page, bs, hkv, d, DEVICE)
    # step 1: request 0 whole, request 1 up to its third block (both store blocks 0-1)
    cache.begin_step(torch.cat([_slots(batch.block_table, 0, 0, 300, page),
                                _slots(batch.block_table, 1, 2 * bs, 200, page)]))
    got = _pool(pool_qk, batch, [300, 200], [300, 72], inv, bs, table, cache.layer(1))
    fresh = _pool(pool_qk, batch, [300, 200], [300, 72], inv, bs, table)
    torch.testing.assert_close(got, fresh, rtol=0, atol=0, equal_nan=True)
    assert not cache.stamps[0].any()
    for kb in range(2):
        e0 = entry_index(batch.block_table[0], kb, page, bs, cache.entry_tokens)
        assert e0 == entry_index(batch.block_table[1], kb, page, bs, cache.entry_tokens)
        assert (cache.stamps[1, e0] == 1).all()
    # step 2: request 1 goes on and reads the shared entries (K there changed behind the cache:
    # the cached values come out, as a prefix hit must not re-pool)
    saved = batch.k_cache[int(batch.block_table[0, 0]), 0].clone()
    batch.k_cache[int(batch.block_table[0, 0]), 0] += 1.0
    cache.begin_step(_slots(batch.block_table, 1, 200, 260, page))
    got = _pool(pool_qk, batch, [0, 260], [0, 60], inv, bs, table, cache.layer(1))
    torch.testing.assert_close(got[1, 0], fresh[1, 0], rtol=0, atol=0)
    batch.k_cache[int(batch.block_table[0, 0]), 0] = saved
    torch.testing.assert_close(got[1, :5], _pool(pool_qk, batch, [0, 260], [0, 60], inv, bs,
                                                  table)[1, :5], rtol=0, atol=0, equal_nan=True)
