"""GPU: after the start-up warm-up no request compiles or autotunes a Seer kernel (issue 12.2).

The CUDA backend calls :func:`vllm_seer.kernels.planning.warm_up` in vLLM's profiling run. A
request that met a kernel variant the warm-up did not build would compile it (a second or more on
the H200) inside its time to first token. Here: warm up as the backend does, then run the whole
gate + sparse path on batches of other shapes (short and long rows, ragged requests, cached
context, every power of two of key blocks up to the longest request) and count the compiled
variants and autotune entries of every Seer kernel before and after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from _paged import fp8_batch, make_batch

from vllm_seer.gate import Selection, block_rope_table, group_gate_weight
from vllm_seer.rope import RopeSpec

pytestmark = pytest.mark.gpu

HQ, HKV, D, BS = 32, 8, 128, 64
PAIR_RATIO = 1.25  # the opt-in pair tiles (setting pair_max_ratio), so their kernels count too
# and the opt-in pooled-key cache (setting pooled_key_cache): its pooling variant too
MAX_BLOCKS = 2048  # a 128k-token max_model_len


def _jit_functions() -> list:
    from vllm_seer.kernels.block_select import triton as bsel
    from vllm_seer.kernels.paged_pool import triton as pool
    from vllm_seer.kernels.sparse_prefill import pairs, split
    from vllm_seer.kernels.sparse_prefill import triton as sp

    return [bsel._scores_kernel, bsel._select_kernel, pool._pool_qk_kernel, pool._invalidate_kernel,
            sp._sparse_prefill_kernel, split._plan_kernel, split._combine_kernel,
            pairs._pair_plan_kernel, pairs._pair_kernel]


def _unwrap(fn):
    """The JITFunction under Heuristics / Autotuner wrappers, and the autotuners on the way."""
    tuners = []
    while not hasattr(fn, "device_caches"):
        if hasattr(fn, "cache") and isinstance(fn.cache, dict):
            tuners.append(fn)
        fn = fn.fn
    return fn, tuners


def _forget_compiled() -> None:
    """Start from no compiled variant and no autotune result in this process (earlier GPU tests
    compiled some), as a fresh server does; Triton's disk cache keeps recompiling fast."""
    for fn in _jit_functions():
        f, tuners = _unwrap(fn)
        f.device_caches.clear()
        for t in tuners:
            t.cache.clear()


def _counts() -> dict[str, tuple[int, int]]:
    """Per kernel: (compiled variants, autotune cache entries)."""
    out = {}
    for fn in _jit_functions():
        f, tuners = _unwrap(fn)
        tuned = sum(len(t.cache) for t in tuners)
        compiled = sum(len(entry[0]) for entry in f.device_caches.values())
        out[f.__name__] = (compiled, tuned)
    return out


def _run(lens: list[int], news: list[int], page: int, sel: Selection, weight: torch.Tensor,
         inv: torch.Tensor, table: torch.Tensor, grouped: torch.Tensor, fp8: bool = False,
         layout: str = "token", positions: torch.Tensor | None = None,
         key_cache: bool = False) -> None:
    """``fp8``: an FP8 cache and query (as vLLM's FlashAttention FP8 path hands them);
    ``layout`` of the cache (``nhd``: vLLM's packed K|V rows, the query then a strided view of a
    wider QKV-like tensor as vLLM hands it); ``key_cache``: through a pooled-key cache (setting
    ``pooled_key_cache``), one step that stores and one that reads."""
    from vllm_seer.kernels.paged_pool.key_cache import PooledKeyCache, slots_of
    from vllm_seer.kernels.planning import SeerBuffers, plan_batch, seer_gate
    from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged

    dev = "cuda"
    b = make_batch(lens, news, HQ, HKV, D, page, dtype=torch.bfloat16, layout=layout, device=dev)
    if layout == "nhd":
        qkv = torch.randn(b.q.shape[0], HQ + 2 * HKV, D, dtype=b.q.dtype, device=dev)
        qkv[:, :HQ] = b.q
        b = dataclasses.replace(b, q=qkv[:, :HQ])
    scales: dict[str, torch.Tensor] = {}
    if fp8:
        b = fp8_batch(b, 0.03, 0.03, 0.03)
        scales = {f"{n}_scale": torch.tensor(0.03, device=dev) for n in "qkv"}
    bufs = SeerBuffers.allocate(plan_batch(b.cu_seqlens_q.tolist(), lens, BS), HQ, HKV, D, dev,
                                pair_max_ratio=PAIR_RATIO)
    bufs.set_topk(lens, sel)
    kc = PooledKeyCache.allocate(1, b.k_cache.shape[0] * page, page, BS, HKV, D, dev) if (
        key_cache) else None
    for _ in range(2 if key_cache else 1):
        if kc is not None:  # vLLM's int64 slot mapping of this step's new tokens
            kc.begin_step(torch.cat([slots_of(b.block_table[r], L - n, L, page)
                                     for r, (L, n) in enumerate(zip(lens, news, strict=True))]))
        seer_gate(b.q, b.k_cache, b.block_table, b.cu_seqlens_q, b.seq_lens, weight, inv, sel,
                  bufs, table, grouped, q_scale=scales.get("q_scale"),
                  k_scale=scales.get("k_scale"), rope_positions=positions,
                  key_cache=kc.layer(0) if kc else None)
    out = torch.full(b.q.shape, float("nan"), dtype=torch.bfloat16, device=dev)
    sparse_prefill_paged(b.q, b.k_cache, b.v_cache, b.block_table, b.cu_seqlens_q, b.seq_lens,
                         bufs.block_index, bufs.block_count, out, 1.0 / math.sqrt(D), BS,
                         bufs.split, pairs=bufs.pairs, **scales)
    torch.cuda.synchronize()
    assert not out.isnan().any(), (lens, news)


def _gate_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    inv = RopeSpec(D, 500000.0).inv_freq().to("cuda")
    weight = torch.randn(HQ, 3 * D, D, device="cuda") / math.sqrt(3 * D)
    return weight, inv, block_rope_table(inv, MAX_BLOCKS, BS), group_gate_weight(weight, HKV)


def _vllm_config(needed: bool) -> contextlib.AbstractContextManager:
    """vLLM's current-config context, as the engine holds it around the backend's warm-up: its
    FlashAttention backend reads the cache layout setting from it (``get_kv_cache_stride_order``
    in 0.26). Without it the test passed only where an earlier test of the same process had set a
    config and vLLM's cached layout answer outlived it (``--jobs`` changes which files share one)."""
    if not needed:
        return contextlib.nullcontext()
    from vllm.config import VllmConfig, set_current_vllm_config

    return set_current_vllm_config(VllmConfig())


@pytest.mark.parametrize("sel", [Selection("nz_ratio", 0.0, 0.1, True),
                                 Selection("threshold", 5e-4, 0.0, False)], ids=["topk", "threshold"])
@pytest.mark.parametrize("page,fp8,layout", [(16, False, "token"), (64, False, "token"),
                                             (64, True, "token"), (64, False, "nhd"),
                                             (64, True, "nhd")],
                         ids=["p16", "p64", "p64-fp8", "p64-vllm-layout", "p64-fp8-vllm-layout"])
def test_no_compile_after_warm_up(page: int, fp8: bool, layout: str, sel: Selection) -> None:
    """``nhd``: the warm-up as the CUDA backend runs it, on a synthetic cache in the layout vLLM
    allocates (its FlashAttention backend's shape and stride order), and requests on such caches."""
    from vllm_seer.kernels.planning import warm_up

    weight, inv, table, grouped = _gate_inputs()
    _forget_compiled()
    f8 = torch.float8_e4m3fn
    views = positions = None
    if layout == "nhd":  # and the per-position cos/sin table of the backend's runtime
        positions = block_rope_table(inv, MAX_BLOCKS * BS, 1)
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

        from vllm_seer.backend import compat

        def views(pages: int) -> tuple[torch.Tensor, torch.Tensor]:
            cache = compat.synthetic_kv_cache(FlashAttentionBackend, pages, page, HKV, D,
                                              f8 if fp8 else torch.bfloat16, "cuda")
            return compat.cuda_kv_views(cache, D, f8 if fp8 else None)

    with _vllm_config(layout == "nhd"):
        warm_up(f8 if fp8 else torch.bfloat16, HQ, HKV, D, page, weight, inv, sel, MAX_BLOCKS,
                "cuda", BS, 16384, table, grouped, kv_dtype=f8 if fp8 else None,
                out_dtype=torch.bfloat16, kv_views=views, rope_positions=positions,
                pair_max_ratio=PAIR_RATIO, key_cache=True)
    torch.cuda.synchronize()
    before = _counts()
    assert all(c > 0 for c, _ in before.values()), f"the warm-up left kernels unbuilt: {before}"
    cases = [([1000], [1000]), ([20000, 3000], [4096, 3000]), ([70001, 65], [777, 65]),
             ([131072], [8192]), ([40000, 9000, 130], [40000, 1, 130])]
    for i, (lens, news) in enumerate(cases):  # every other batch through a pooled-key cache
        _run(lens, news, page, sel, weight, inv, table, grouped, fp8, layout, positions,
             key_cache=i % 2 == 1)
        after = _counts()
        grown = {k: (before[k], v) for k, v in after.items() if v != before[k]}
        assert not grown, f"batch {lens}/{news} compiled or autotuned after the warm-up: {grown}"


def test_counter_sees_an_unwarmed_variant() -> None:
    """Control: a warm-up for 256 key blocks only leaves the 128k request's selection width
    unbuilt, and the counts above see that request compile it."""
    from vllm_seer.kernels.planning import warm_up

    sel = Selection("nz_ratio", 0.0, 0.1, True)
    weight, inv, table, grouped = _gate_inputs()
    _forget_compiled()
    warm_up(torch.bfloat16, HQ, HKV, D, 64, weight, inv, sel, 256, "cuda", BS, 16384, table,
            grouped, pair_max_ratio=PAIR_RATIO)
    torch.cuda.synchronize()
    before = _counts()
    _run([131072], [8192], 64, sel, weight, inv, table, grouped)
    after = _counts()
    assert after["_select_kernel"][0] > before["_select_kernel"][0]
