"""Row classification of the metadata builders: which requests of a batch take the Seer path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_seer.backend import compat
from vllm_seer.backend.common import plan_sparse

# (query tokens, seq_len) per request: a decode, a verification row of 1 + 3 drafts, a whole prompt,
# a 3-token prefill tail on a long context, a short prompt
BATCH = [(1, 1000), (4, 1000), (600, 600), (3, 900), (50, 50)]


def _plan(decode_max_query_len: int):
    qsl = [0]
    for n, _ in BATCH:
        qsl.append(qsl[-1] + n)
    seq_lens = [L for _, L in BATCH]
    block_table = torch.arange(len(BATCH) * 20, dtype=torch.int32).reshape(len(BATCH), 20)
    return plan_sparse(qsl, seq_lens, block_table, min_prefill_tokens=128, block_size=64,
                       num_heads=2, causal=True, decode_max_query_len=decode_max_query_len), qsl


def test_without_speculation_every_multi_token_row_on_a_long_context_is_sparse():
    (plan, dense), _ = _plan(1)
    assert plan is not None
    assert plan.req_ids == [1, 2, 3] and dense == [0, 4]


def test_verification_rows_are_decodes_under_speculation():
    (plan, dense), qsl = _plan(4)
    assert plan is not None
    assert plan.req_ids == [2] and dense == [0, 1, 3, 4]  # the 3-token tail is dense too
    assert plan.token_rows.tolist() == list(range(qsl[2], qsl[3]))
    assert plan.cu_seqlens_q.tolist() == [0, 600]
    assert plan.context_lens == [0] and plan.query_lens == [600]
    assert plan.possible == [2 * sum(range(1, 11))]  # 10 causal query-block rows, 2 heads
    assert plan.block_table.tolist() == [list(range(40, 60))]


def test_no_sparse_row_gives_no_plan():
    plan, dense = plan_sparse([0, 1, 5], [700, 700], torch.zeros(2, 4, dtype=torch.int32), 128,
                              64, 2, True, decode_max_query_len=4)
    assert plan is None and dense == [0, 1]


def _config(k: int | None, parallel: bool = False):
    spec = None if k is None else SimpleNamespace(num_speculative_tokens=k,
                                                  parallel_drafting=parallel)
    return SimpleNamespace(speculative_config=spec, use_v2_model_runner=False)


@pytest.mark.parametrize(("k", "parallel", "want"),
                         [(None, False, 1), (3, False, 4), (3, True, 7), (1, False, 2)])
def test_max_decode_query_len(k, parallel, want):
    assert compat.max_decode_query_len(_config(k, parallel)) == want


@pytest.mark.parametrize(("k", "parallel", "want"), [(None, False, 1), (3, False, 4), (3, True, 7)])
def test_max_decode_query_len_without_vllms_helper(monkeypatch, k, parallel, want):
    """vLLM 0.26 has no ``max_decode_query_len``: the builder-base rule of that release applies."""
    import vllm.v1.attention.backend as backend

    monkeypatch.delattr(backend, "max_decode_query_len")
    assert compat.max_decode_query_len(_config(k, parallel)) == want


def test_row_span_of_one_run_of_seer_rows():
    """Requests 1-3 are adjacent: their rows are one run, read and written in place on CUDA."""
    (plan, _), qsl = _plan(1)
    assert plan is not None
    assert plan.row_span == (qsl[1], qsl[4])
    assert plan.token_rows.tolist() == list(range(*plan.row_span))


def test_no_row_span_when_a_dense_request_sits_between():
    # a prompt, a decode, a prompt: the Seer rows are two runs (gathered and scattered back)
    qsl, lens = [0, 300, 301, 801], [300, 900, 500]
    plan, dense = plan_sparse(qsl, lens, torch.zeros(3, 16, dtype=torch.int32), 128, 64, 2, True)
    assert plan is not None and dense == [1]
    assert plan.row_span is None
    assert plan.token_rows.tolist() == [*range(0, 300), *range(301, 801)]
