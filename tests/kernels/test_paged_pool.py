"""Gate pooling kernels (K from the paged cache, Q from packed rows) vs the references."""

from __future__ import annotations

import itertools

import pytest
import torch
from _paged import DEVICE, make_batch
from vllm_seer.kernels.paged_pool import pool_k_paged_ref, pool_q_varlen_ref

from vllm_seer.gate import block_rope_table
from vllm_seer.rope import RopeSpec

LLAMA3 = RopeSpec(64, 500000.0, "llama3", (("factor", 8.0), ("high_freq_factor", 4.0),
                                           ("low_freq_factor", 1.0),
                                           ("original_max_position_embeddings", 8192)))

# (seq_lens, n_new, Hq, Hkv, D, page_size, layout, rope)
CPU_CASES = {
    "ragged-p16-token": ([150, 64, 1], [40, 64, 1], 4, 2, 64, 16, "token", "default"),
    "p32-head-major-llama3": ([200, 129], [1, 70], 3, 1, 64, 32, "head", "llama3"),
    "p64-kv-view-no-rope": ([128, 60, 90], [128, 5, 0], 2, 2, 64, 64, "kv", None),
    "p128-d128": ([190], [130], 2, 1, 128, 128, "token", "default"),
}

GPU_CASES = {
    "llama-32k-chunk": ([32768, 5000], [4096, 5000], 32, 8, 128, 16, "token", "llama3"),
    "smollm-ragged-head": ([4100, 777, 64], [4100, 300, 1], 9, 3, 64, 32, "head", "default"),
    "p128-kv-view": ([9000], [100], 8, 2, 128, 128, "kv", "default"),
}


def _inv_freq(rope: str | None, d: int) -> torch.Tensor | None:
    if rope is None:
        return None
    spec = RopeSpec(d, 10000.0) if rope == "default" else RopeSpec(d, 500000.0, "llama3",
                                                                      LLAMA3.scaling)
    return spec.inv_freq().to(DEVICE)


def _run(case: tuple, dtype: torch.dtype = torch.float16, bs: int = 64) -> None:
    from vllm_seer.kernels.paged_pool import pool_k_paged, pool_q_varlen

    lens, n_new, hq, hkv, d, page, layout, rope = case
    batch = make_batch(lens, n_new, hq, hkv, d, page, dtype, layout, DEVICE)
    inv = _inv_freq(rope, d)
    mkb = max(-(-L // bs) for L in lens) + 1
    k_ref = torch.full((len(lens), mkb, hkv, 3 * d), float("nan"), device=DEVICE)
    k_out = k_ref.clone()
    pool_k_paged_ref(batch.k_cache, batch.block_table, batch.seq_lens, inv, k_ref, bs)
    pool_k_paged(batch.k_cache, batch.block_table, batch.seq_lens, inv, k_out, bs)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-4, atol=1e-4, equal_nan=True)
    for b, L in enumerate(lens):  # every real block written, padding untouched
        assert torch.isfinite(k_out[b, :-(-L // bs)]).all()
        assert torch.isnan(k_out[b, -(-L // bs):]).all()

    mqb = max(((L - 1) // bs - (L - n) // bs + 1) if n else 0 for L, n in zip(lens, n_new,
                                                                              strict=True))
    q_ref = torch.full((len(lens), mqb, hq, d), float("nan"), device=DEVICE)
    q_out = q_ref.clone()
    pool_q_varlen_ref(batch.q, batch.cu_seqlens_q, batch.seq_lens, inv, q_ref, bs)
    pool_q_varlen(batch.q, batch.cu_seqlens_q, batch.seq_lens, inv, q_out, bs)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-4, atol=1e-4, equal_nan=True)
    # both in one launch (the gate's pooling step; its own autotuned warps, so the sums may
    # round in another order) against the references, and the reference of both exactly
    from vllm_seer.kernels.paged_pool import pool_qk, pool_qk_ref

    # with RoPE, also with the start-up per-position cos/sin table (read instead of computed)
    tables = [None] if inv is None else [None, block_rope_table(inv, max(lens) + 3, 1)]
    for (fn, tol), table in itertools.product(((pool_qk, 1e-4), (pool_qk_ref, 0.0)), tables):
        k2, q2 = torch.full_like(k_ref, float("nan")), torch.full_like(q_ref, float("nan"))
        fn(batch.k_cache, batch.block_table, batch.q, batch.cu_seqlens_q, batch.seq_lens, inv,
           k2, q2, bs, rope_positions=table)
        torch.testing.assert_close(k2, k_ref, rtol=tol, atol=tol, equal_nan=True)
        torch.testing.assert_close(q2, q_ref, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_pool_matches_reference(case: tuple) -> None:
    _run(case)


def test_pool_qk_refuses_a_wrong_position_table() -> None:
    from vllm_seer.kernels.paged_pool import pool_qk, pool_qk_ref

    b = make_batch([100], [40], 2, 1, 64, 16, torch.float16, "token", DEVICE)
    inv = _inv_freq("default", 64)
    k = torch.empty(1, 2, 1, 192, device=DEVICE)
    q = torch.empty(1, 1, 2, 64, device=DEVICE)
    args = (b.k_cache, b.block_table, b.q, b.cu_seqlens_q, b.seq_lens, inv, k, q)
    with pytest.raises(ValueError, match="expected contiguous"):
        pool_qk(*args, rope_positions=torch.zeros(128, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="not block_rope_table"):
        pool_qk_ref(*args, rope_positions=block_rope_table(inv * 2, 128, 1))
    with pytest.raises(ValueError, match="covers 64 positions"):
        pool_qk_ref(*args, rope_positions=block_rope_table(inv, 64, 1))


def test_pool_bf16_small_blocks() -> None:
    _run(([70, 33], [70, 2], 2, 1, 64, 16, "token", "default"), torch.bfloat16, bs=32)


def test_pool_q_straddling_block_uses_present_rows() -> None:
    # 10 rows at positions 60..69: block 0 averages 4 rows, block 1 six rows
    from vllm_seer.kernels.paged_pool import pool_q_varlen

    q = torch.randn(10, 1, 64, device=DEVICE)
    out = torch.full((1, 2, 1, 64), float("nan"), device=DEVICE)
    cu = torch.tensor([0, 10], dtype=torch.int32, device=DEVICE)
    pool_q_varlen(q, cu, torch.tensor([70], dtype=torch.int32, device=DEVICE), None, out)
    torch.testing.assert_close(out[0, 0, 0], q[:4, 0].mean(0))
    torch.testing.assert_close(out[0, 1, 0], q[4:, 0].mean(0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_pool_gpu(case: tuple, dtype: torch.dtype) -> None:
    _run(case, dtype)
