"""RoPE and the gate math against hand-computed cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_seer.gate import (
    Selection,
    gate_mask,
    gate_probs,
    gate_scores,
    pool_k,
    pool_q,
    select,
    select_scores,
)
from vllm_seer.rope import RopeSpec, rotate


def test_inverse_rope_round_trip():
    spec = RopeSpec(64, 10000.0)
    x = torch.randn(37, 3, 64)
    pos = torch.arange(100, 137)
    y = rotate(x, pos, spec.inv_freq())
    assert not torch.allclose(y, x)
    torch.testing.assert_close(rotate(y, pos, spec.inv_freq(), inverse=True), x,
                               atol=1e-5, rtol=1e-5)


def test_rope_neox_hand_case():
    # D=2: one frequency (1.0); position 1 rotates (x1, x2) by 1 radian
    x = torch.tensor([[[1.0, 0.0]]])
    y = rotate(x, torch.tensor([1]), torch.tensor([1.0]))
    torch.testing.assert_close(y, torch.tensor([[[math.cos(1.0), math.sin(1.0)]]]))


def test_rope_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                      rope_scaling=scaling, max_position_embeddings=131072)
    ours = RopeSpec.from_hf_config(cfg, 128)
    assert ours.rope_type == "llama3"
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(ours.inv_freq(), theirs.float(), rtol=1e-6, atol=0)


def test_rope_refuses_unknown_variant():
    cfg = SimpleNamespace(rope_theta=1e4, rope_scaling={"rope_type": "su", "factor": 4.0})
    with pytest.raises(ValueError, match="'su' is not supported"):
        RopeSpec.from_hf_config(cfg, 64)


def test_pool_k_partial_block_hand_case():
    k = torch.arange(5, dtype=torch.float32).view(5, 1, 1)  # values 0..4, block size 4
    pooled = pool_k(k, 4)
    assert pooled.shape == (2, 1, 3)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([3.0, 0.0, 1.5]))  # max|min|avg
    torch.testing.assert_close(pooled[1, 0], torch.tensor([4.0, 4.0, 4.0]))  # 1 real token


def test_pool_q_straddling_chunk_start():
    q = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)  # positions 3, 4, 5 with block size 4
    pooled, qb0 = pool_q(q, start=3, block_size=4)
    assert qb0 == 0
    torch.testing.assert_close(pooled.flatten(), torch.tensor([10.0, 25.0]))


def test_gate_probs_hand_case():
    # one head, D=2, no rotation (inv_freq 0), identity-like projection picks the avg channels
    k_pooled = torch.tensor([[[0, 0, 0, 0, 1.0, 0.0]], [[0, 0, 0, 0, 0.0, 1.0]]])  # [2, 1, 6]
    w = torch.zeros(1, 6, 2)
    w[0, 4, 0] = w[0, 5, 1] = 1.0
    q = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # [2 blocks, 1 head, 2]
    p = gate_probs(q, 0, k_pooled, w, torch.zeros(1), block_size=4)
    assert p.shape == (1, 2, 2)
    torch.testing.assert_close(p[0, 0], torch.tensor([1.0, 0.0]))  # causal: only block 0
    s = 2.0 / math.sqrt(2)
    torch.testing.assert_close(p[0, 1], torch.softmax(torch.tensor([0.0, s]), 0))


def test_select_threshold_topk_diag_last_rows():
    probs = torch.tensor([[[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.5, 0.45, 0.05, 0],
                           [0.7, 0.1, 0.1, 0.1]]])
    m = select(probs, 0, Selection("threshold", 0.2, 0.1, False))
    assert m[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    m = select(probs, 0, Selection("threshold", 0.2, 0.1, True))
    assert m[0, 2:].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]  # last two rows dense
    # top-k: k = max(1, int((1 - sqrt(1 - 0.5)) * 4)) = 1, plus the diagonal
    m = select(probs, 0, Selection("nz_ratio", 0.1, 0.5, False))
    assert m[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]


def test_select_scores_topk_ranks_logits_where_probs_underflow():
    """Upstream ranks the masked logits: a row whose softmax underflows to one-hot still keeps its
    ``k`` largest causal blocks (ranking probabilities would tie them with non-causal zeros)."""
    inf = float("-inf")
    # one head, query block 3 of 8 key blocks; k = int((1 - sqrt(0.5)) * 8) = 2
    scores = torch.tensor([[[-3000.0, -1000.0, -2000.0, 0.0, inf, inf, inf, inf]]])
    assert torch.softmax(scores, -1)[0, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    sel = Selection("nz_ratio", 0.0, 0.5, False)
    assert select_scores(scores, 3, sel)[0, 0].int().tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
    # non-causal entries are ignored whatever they hold
    loud = scores.clone()
    loud[..., 4:] = 1e4
    assert torch.equal(select_scores(loud, 3, sel), select_scores(scores, 3, sel))
    # threshold still compares the softmax
    thr = select_scores(scores, 3, Selection("threshold", 1e-3, 0.0, False))
    assert thr[0, 0].int().tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


def test_select_sink_blocks_hand_case():
    """``sink_blocks``: under top-k the first blocks take places of the row's k;
    under threshold they are added whatever their probability; the diagonal stays forced."""
    inf = float("-inf")
    # one head, query blocks 3 and 4 of 8 key blocks; k = int((1 - sqrt(0.5)) * 8) = 2
    scores = torch.tensor([[[-9.0, -8.0, 5.0, 4.0, inf, inf, inf, inf],
                            [-9.0, 1.0, 5.0, 4.0, 3.0, inf, inf, inf]]])
    top = Selection("nz_ratio", 0.0, 0.5, False)
    sink1 = Selection("nz_ratio", 0.0, 0.5, False, sink_blocks=1)
    assert select_scores(scores, 3, top)[0].int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 0],
                                                               [0, 0, 1, 1, 1, 0, 0, 0]]
    # block 0 first, then the best other one; rows still hold k = 2 (+ the diagonal)
    assert select_scores(scores, 3, sink1)[0].int().tolist() == [[1, 0, 1, 1, 0, 0, 0, 0],
                                                                 [1, 0, 1, 0, 1, 0, 0, 0]]
    # more sink blocks than k: all of them are active, nothing else but the diagonal
    sink3 = Selection("nz_ratio", 0.0, 0.5, False, sink_blocks=3)
    assert select_scores(scores, 3, sink3)[0].int().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0],
                                                                 [1, 1, 1, 0, 1, 0, 0, 0]]
    thr = Selection("threshold", 0.2, 0.0, False, sink_blocks=1)
    probs = torch.tensor([[[0.0, 0.0, 0.7, 0.3, 0, 0, 0, 0]]])
    assert select(probs, 3, thr)[0, 0].int().tolist() == [1, 0, 1, 1, 0, 0, 0, 0]
    # threshold on logits: the softmax of the original scores decides, the sink is added after
    # (row 0: p = softmax(-9, -8, 5, 4) -> only blocks 2 and 3 pass 0.2; block 0 forced)
    assert select_scores(scores, 3, thr)[0].int().tolist() == [[1, 0, 1, 1, 0, 0, 0, 0],
                                                               [1, 0, 1, 1, 1, 0, 0, 0]]
    assert torch.equal(select_scores(scores, 3, Selection("threshold", 0.2, 0.0, False)) |
                       (torch.arange(8) == 0), select_scores(scores, 3, thr))
    # never past the causal boundary: query block 0 keeps only itself even with 3 sink blocks
    first = torch.tensor([[[0.0, inf, inf, inf]]])
    assert select_scores(first, 0, Selection("nz_ratio", 0.0, 0.5, False, sink_blocks=3)
                         )[0, 0].int().tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_selection_refuses_bad_sink_blocks(bad):
    with pytest.raises(ValueError, match="sink_blocks must be an integer >= 0"):
        Selection("nz_ratio", 0.0, 0.1, True, sink_blocks=bad)


def test_select_topk_ties_take_lowest_index():
    """Equal scores: the lowest block indices win (the Triton select kernel's rule), in both
    :func:`select_scores` and :func:`select` (whose causal zeros beat the non-causal ones)."""
    sel = Selection("nz_ratio", 0.0, 0.5, False)  # k = 2 of 8 key blocks
    scores = torch.full((3, 1, 8), -5.0)
    m = select_scores(scores, 5, sel)
    assert m[:, 0].int().tolist() == [[1, 1, 0, 0, 0, 1, 0, 0]] * 3  # blocks 0, 1 + diagonal 5
    probs = torch.zeros(1, 1, 8)
    probs[0, 0, 3] = 1.0
    assert select(probs, 3, sel)[0, 0].int().tolist() == [1, 0, 0, 1, 0, 0, 0, 0]


def test_gate_probs_is_softmax_of_gate_scores():
    q = torch.randn(3, 2, 8)
    k_pooled = torch.randn(5, 1, 24)
    w = torch.randn(2, 24, 8)
    inv = RopeSpec(8, 10000.0).inv_freq()
    s = gate_scores(q, 2, k_pooled, w, inv, block_size=4)
    assert torch.isinf(s[:, 0, 3:]).all() and torch.isfinite(s[:, 2]).all()
    assert torch.equal(gate_probs(q, 2, k_pooled, w, inv, block_size=4), torch.softmax(s, -1))


def test_select_density_one_is_full_triangle():
    probs = torch.softmax(torch.randn(3, 5, 9), -1)
    m = select(probs, 4, Selection("nz_ratio", 0.1, 1.0, False))
    want = torch.arange(9)[None, :] <= (4 + torch.arange(5))[:, None]
    assert torch.equal(m, want.expand(3, -1, -1))


def test_gate_mask_row_local_under_chunking():
    """threshold selection of a query block does not depend on where the step's chunk started."""
    torch.manual_seed(0)
    inv = RopeSpec(16, 1e4).inv_freq()
    k = torch.randn(256, 2, 16)
    q = torch.randn(256, 4, 16)
    w = torch.randn(4, 48, 16)
    sel = Selection("threshold", 0.2, 0.1, False)
    full, _ = gate_mask(q, k, w, inv, 32, sel)
    tail, qb0 = gate_mask(q[128:], k, w, inv, 32, sel)
    assert qb0 == 4
    assert torch.equal(full[:, 4:], tail)
