"""MInference vertical-slash selector on constructed attention patterns."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_seer.eval.sparse import Selector
from vllm_seer.eval.vslash import last_block_scores, vertical_slash_mask
from vllm_seer.gate import topk_count

B = 64


def _pattern(t: int, col_block: int, offset: int, heads: int = 2) -> tuple[torch.Tensor, ...]:
    """q/k whose scores (scale 1) are ``c`` on the diagonal ``q_pos - k_pos == offset``, ``c2`` on
    every key of column block ``col_block`` and 0 elsewhere: ``q_i = c e_{i - offset} + c2 e_t``,
    ``k_j = e_j + [j in col_block] e_t``, ``D = t + 1``. ``c - c2 = ln 64`` splits each query's
    attention about evenly between the 64 column keys and its one diagonal key."""
    c2 = 20.0
    c = c2 + math.log(B)
    d = t + 1
    q = torch.zeros(t, heads, d)
    k = torch.zeros(t, 1, d)
    pos = torch.arange(t)
    src = pos - offset
    ok = src >= 0
    q[pos[ok], :, src[ok]] = c
    q[:, :, t] = c2
    k[pos, 0, pos] = 1.0
    k[col_block * B:(col_block + 1) * B, 0, t] = 1.0
    return q, k


def test_scores_find_the_column_and_the_diagonal():
    t, col, off = 1024, 3, 200
    q, k = _pattern(t, col, off)
    vertical, slash = last_block_scores(q, k, scale=1.0)
    assert vertical.shape == slash.shape == (2, t)
    torch.testing.assert_close(vertical.sum(-1), torch.full((2,), 64.0))  # 64 softmax rows
    torch.testing.assert_close(slash.sum(-1), torch.full((2,), 64.0))
    col_mass = vertical[:, col * B:(col + 1) * B].sum(-1)
    assert (col_mass > 25).all() and (slash[:, off] > 25).all()
    assert (slash[:, off] / slash.sum(-1) > 0.4).all()


@pytest.mark.parametrize("col,off", [(3, 200), (9, 460)], ids=["col3-diag3", "col9-diag7"])
def test_mask_keeps_the_obvious_blocks(col: int, off: int):
    t, nz = 1024, 0.7
    nb = t // B
    q, k = _pattern(t, col, off)
    m = vertical_slash_mask(q, k, nz, B, scale=1.0)
    assert m.shape == (2, nb, nb) and not m.triu(1).any()
    qb = torch.arange(nb)
    d = off // B
    assert m[:, qb >= col, col].all(), "the hot column block is a vertical"
    rows = qb[qb >= d]
    assert m[:, rows, rows - d].all(), "the hot diagonal is a slash"
    assert m[:, :, 0].all() and m.diagonal(dim1=1, dim2=2).all()  # sink vertical, diagonal
    assert m[:, 1:, :].diagonal(dim1=1, dim2=2).all()  # offsets < 100 reach block diagonal 1
    # the budget: top-k's blocks per row summed over the rows below the two dense ones; the
    # forced items (sink column, block diagonals 0 and 1) and the two hot ones fit within it
    k_row = topk_count(nb, nz)
    budget = int(torch.clamp(qb[: nb - 2] + 1, max=k_row).sum())
    active = m[:, : nb - 2].sum(dim=(1, 2))
    assert (active <= budget).all()
    # and an unrelated pattern does not get the same blocks
    other = vertical_slash_mask(*_pattern(t, 12, 700), nz, B, scale=1.0)
    assert not torch.equal(other, m)


def test_selector_kind_and_density_falls_with_nz_ratio():
    torch.manual_seed(0)
    t = 4096
    q, k = torch.randn(t, 4, 16), torch.randn(t, 2, 16)
    dens = []
    for r in (0.9, 0.5, 0.2):
        m = Selector("vslash", nz_ratio=r, block_size=B).mask(0, q, k)
        nb = -(-t // B)
        assert m.shape == (4, nb, nb)
        dens.append(float(m.sum()) / (4 * nb * (nb + 1) / 2))
    assert dens[0] > dens[1] > dens[2]
    with pytest.raises(ValueError, match="nz_ratio only"):
        Selector("vslash", "threshold").mask(0, q, k)
    with pytest.raises(ValueError, match="expected one of"):
        Selector("nope").mask(0, q, k)


@pytest.mark.parametrize("t", [2048, 4096, 8192])
@pytest.mark.parametrize("nz", [0.1, 0.3, 0.5])
def test_density_within_the_topk_budget(t: int, nz: float):
    """Matched density: the union of the taken items (overlaps counted once) never exceeds the
    top-k budget of the other selectors, and fills it to within one item (at most ``nb`` blocks)."""
    torch.manual_seed(t)
    q, k = torch.randn(t, 3, 16), torch.randn(t, 1, 16)
    nb = t // B
    m = vertical_slash_mask(q, k, nz, B)
    qb = torch.arange(nb)
    budget = int(torch.clamp(qb[: nb - 2] + 1, max=topk_count(nb, nz)).sum())
    active = m[:, : nb - 2].sum(dim=(1, 2))
    assert (active <= budget).all() and (active > budget - nb).all(), (active, budget)
    assert m[:, nb - 2:].sum() == 3 * (2 * nb - 1)  # the last two rows dense


def test_forced_sets_only_within_the_budget():
    """At 2k tokens and nz_ratio 0.1 top-k keeps one block per row: the diagonal alone. The sink
    column and the second block diagonal (MInference's forced first 30 keys / 100 offsets) do not
    fit and are not taken, so the selector does not get 1.4x the others' density."""
    t = 2048
    nb = t // B
    assert topk_count(nb, 0.1) == 1
    q, k = torch.randn(t, 2, 16), torch.randn(t, 1, 16)
    m = vertical_slash_mask(q, k, 0.1, B)
    qb = torch.arange(nb)
    want = (qb[:, None] == qb[None, :]) | ((qb[:, None] >= nb - 2) & (qb[None, :] <= qb[:, None]))
    assert torch.equal(m, want.expand(2, nb, nb))
