"""MInference's vertical-slash pattern, estimated from the last query block, at block granularity.

MInference (Jiang et al. 2024, arXiv 2407.02490, ``vertical_slash`` pattern) estimates a head's
sparse pattern from the attention of the last ``last_q = 64`` queries over all keys:

* ``a = softmax(q_last k^T * scale)`` ``[H, 64, T]``, causal inside the last 64 columns;
* vertical scores: ``a`` summed over the 64 queries, per key column ``[H, T]``; the first 30
  columns are always kept (set to ``inf``);
* slash scores: ``a`` summed along each diagonal, per offset ``o = q_pos - k_pos`` ``[H, T]``; the
  100 most recent diagonals (``o < 100``) are always kept;
* keep the ``vertical_size`` best columns and the ``slash_size`` best diagonals; the sparse kernel
  attends, for every query, to the kept columns and to the keys on the kept diagonals.

What this module does the same: the last-64-query estimate, the softmax, the two score
definitions and the two forced sets (first 30 keys, offsets below 100). What differs, and why:

* **Blocks, not tokens.** Every selector in :mod:`vllm_seer.eval.sparse` is compared on the same
  64 x 64 block grid. A vertical block's score is the sum of its 64 column scores; block
  diagonal ``d = qb - kb`` scores the token offsets ``d * B .. (d + 1) * B - 1``. A kept vertical
  block ``kb`` is active in every row ``qb >= kb``, a kept block diagonal ``d`` in every row
  ``qb >= d``. (MInference's token-level slash covers parts of two adjacent block diagonals.)
* **One budget instead of two tuned sizes.** MInference takes ``vertical_size`` / ``slash_size``
  per head from an offline search. Here both kinds are merged into one ranking by score (both are
  attention mass of the same 64 queries, so they compare), the forced ones first, and taken in that
  order while the blocks they add to the union (overlaps counted once) keep the total within the
  top-k budget of the other selectors, ``sum over rows of min(k, qb + 1)`` with
  ``k = topk_count(nkb, nz_ratio)`` over the rows below the two dense last ones; an item that does
  not fit is skipped and smaller ones after it may still fit. The block diagonal comes first (every
  selector keeps it). So the forced sets are forced only within the budget: at 2k tokens and
  ``nz_ratio`` 0.1 (``k`` = 1) the budget is the diagonal alone, and without this rule the sink
  column and the second block diagonal alone would take the selector to 1.4x the others' density.
* **Every head uses vertical-slash.** MInference assigns each head one of three patterns offline
  (A-shape, vertical-slash, block-sparse); vertical-slash is its general one.
* Like the other selectors the diagonal block is always active and the last two query-block rows
  are dense.
"""

from __future__ import annotations

import torch

from vllm_seer.gate import topk_count

LAST_Q = 64
SINK_TOKENS = 30
LOCAL_OFFSETS = 100


def last_block_scores(q: torch.Tensor, k: torch.Tensor, scale: float,
                      last_q: int = LAST_Q) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash scores of the last ``last_q`` queries (MInference's estimate).

    Args:
        q: ``[T, Hq, D]`` post-RoPE queries; k: ``[T, Hkv, D]`` post-RoPE keys.
    Returns:
        (``[Hq, T]`` vertical score per key position, ``[Hq, T]`` slash score per offset
        ``q_pos - k_pos``), fp32, forced entries not yet applied.
    """
    t, hq, _ = q.shape
    n = min(last_q, t)
    rep = hq // k.shape[1]
    qf = q[t - n:].to(torch.float32).transpose(0, 1)  # [Hq, n, D]
    kf = k.to(torch.float32).repeat_interleave(rep, dim=1).transpose(0, 1)  # [Hq, T, D]
    q_pos = torch.arange(t - n, t, device=q.device)
    offset = q_pos[:, None] - torch.arange(t, device=q.device)[None, :]  # [n, T]
    s = torch.matmul(qf, kf.transpose(1, 2)) * scale
    a = torch.softmax(s.masked_fill(offset < 0, float("-inf")), dim=-1)  # [Hq, n, T]
    vertical = a.sum(dim=1)
    slash = torch.zeros(hq, t, dtype=torch.float32, device=q.device)
    idx = offset.clamp(min=0).expand(hq, n, t).reshape(hq, -1)
    slash.scatter_add_(1, idx, a.reshape(hq, -1))  # masked entries add 0 at offset 0
    return vertical, slash


def vertical_slash_mask(q: torch.Tensor, k: torch.Tensor, nz_ratio: float, block_size: int = 64,
                        scale: float | None = None) -> torch.Tensor:
    """Block mask from the vertical-slash estimate at the top-k budget of ``nz_ratio``.

    Args:
        q: ``[T, Hq, D]``; k: ``[T, Hkv, D]`` (post-RoPE, positions ``0 .. T-1``).
        scale: softmax scale of the estimate (``1 / sqrt(D)`` when ``None``).
    Returns:
        ``[Hq, nb, nb]`` bool, causal, diagonal and the last two rows active.
    """
    t, hq, d = q.shape
    b = block_size
    nb = -(-t // b)
    vertical, slash = last_block_scores(q, k, d ** -0.5 if scale is None else scale)
    pad = nb * b - t
    v_blk = torch.nn.functional.pad(vertical, (0, pad)).view(hq, nb, b).sum(-1)
    s_blk = torch.nn.functional.pad(slash, (0, pad)).view(hq, nb, b).sum(-1)
    blk = torch.arange(nb, device=q.device)
    v_blk[:, blk * b < SINK_TOKENS] = float("inf")
    s_blk[:, blk * b < LOCAL_OFFSETS] = float("inf")
    # items: nb verticals then nb block diagonals, forced ones (inf) first, then by score
    score = torch.cat((v_blk, s_blk), dim=1)  # [Hq, 2 nb]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    budget = int(torch.clamp(blk[: max(nb - 2, 0)] + 1, max=topk_count(nb, nz_ratio)).sum())
    qb, kb = blk[:, None], blk[None, :]
    mask = _budgeted_union(order, nb, budget) | (qb >= nb - 2)  # the diagonal is in the union
    return mask & (kb <= qb)


def _budgeted_union(order: torch.Tensor, nb: int, budget: int) -> torch.Tensor:
    """Union of the items of ``order`` taken greedily while it stays within ``budget`` blocks.

    Args:
        order: ``[H, 2 nb]`` item ids by rank (``i < nb``: vertical block column ``i``, active in
            rows ``qb >= i``; else block diagonal ``d = i - nb``, active at ``(qb, qb - d)``).
        budget: blocks allowed in the rows ``qb < nb - 2`` (the diagonal included, which is taken
            first).
    Returns:
        ``[H, nb, nb]`` bool union of the taken items (rows ``qb >= nb - 2`` not set).
    """
    h = order.shape[0]
    dev = order.device
    blk = torch.arange(nb, device=dev)
    qb, kb = blk[None, :, None], blk[None, None, :]
    counted = (qb < nb - 2) & (kb <= qb)  # [1, nb, nb]
    cur = (qb == kb) & counted
    cur = cur.expand(h, nb, nb).clone()
    used = cur.sum(dim=(1, 2))  # [H]
    for j in range(order.shape[1]):
        if bool((used >= budget).all()):
            break
        item = order[:, j][:, None, None]  # [H, 1, 1]
        vertical = item < nb
        idx = torch.where(vertical, item, item - nb)
        cover = torch.where(vertical, kb == idx, (qb - kb) == idx) & counted
        new = cover & ~cur
        gain = new.sum(dim=(1, 2))
        take = (used + gain) <= budget
        cur |= new & take[:, None, None]
        used += gain * take
    return cur
