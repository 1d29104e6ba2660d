"""Plain-PyTorch reference of the pair planner (same signature as
:func:`vllm_seer.kernels.sparse_prefill.pairs.plan_pairs`) and the pair workspace.

Two adjacent local query blocks ``j = 2p`` and ``2p + 1`` of one (request, query head) form pair
``p``. A pair is *taken* when both rows exist this step, both lists are non-empty and at most
``list_cap`` long, and the union of their lists costs at most ``max_ratio`` times their own work::

    2 * |A u B| <= max_ratio * (|A| + |B|)      (fp32, as the kernel compares)

A taken pair runs as one 128-row tile over the union (:mod:`.pairs`), K/V loaded once for both
rows; its rows are skipped by the 64-row kernel and by the long-row split plan. Union entries are
encoded ``kb * 4 + flags`` (ascending ``kb``; flag bit 0: in A's list, bit 1: in B's list), so the
128-row tile masks the half whose row did not select a block.

Layouts (``P = B * Hq * MQP``, ``MQP = ceil(MQB / 2)``, pair id = ``(b * Hq + h) * MQP + p``):
``union`` ``[P, 2 * list_cap]`` int32 (the first ``union_count[pair]`` entries of a taken pair are
defined), ``union_count`` ``[P]`` int32 (0: not taken), ``paired`` ``[B * Hq * MQB]`` int32 (1: the
row runs in its pair's tile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairWork:
    """Workspace of the 128-row pair tiles (allocate per batch shape, reuse across layers).

    Attributes:
        union: ``[P, 2 * list_cap]`` int32 union lists (``kb * 4 + flags``).
        union_count: ``[P]`` int32 entries of each taken pair's union, 0 when not taken.
        paired: ``[R]`` int32 1 for rows that run in a pair tile (``R = B * Hq * MQB``).
        list_cap: longest list a pair may hold (a power of two: the planner's tile).
        max_ratio: work ratio ``2 |A u B| / (|A| + |B|)`` up to which a pair is taken.
    """

    union: torch.Tensor
    union_count: torch.Tensor
    paired: torch.Tensor
    list_cap: int
    max_ratio: float

    @classmethod
    def allocate(cls, heads: int, mqb: int, device: torch.device | str, list_cap: int = 256,
                 max_ratio: float = 1.25) -> PairWork:
        """``heads``: ``B * Hq``; ``mqb``: the batch's most local query blocks.
        ``heads * ceil(mqb / 2) * 2 * list_cap * 4`` bytes of union lists (at the defaults and
        Llama-3.1-8B's 32 query heads: 4 MiB for an 8k-token chunk, 64 MiB for a 128k prompt in
        one step)."""
        if list_cap < 2 or list_cap & (list_cap - 1):
            raise ValueError(f"list_cap={list_cap}; expected a power of two >= 2")
        if not max_ratio >= 1.0:
            raise ValueError(f"max_ratio={max_ratio}; expected >= 1.0 (1.0: identical lists only)")
        pairs = heads * -(-mqb // 2)
        i32 = dict(dtype=torch.int32, device=device)
        return cls(torch.empty(pairs, 2 * list_cap, **i32), torch.empty(pairs, **i32),
                   torch.empty(heads * mqb, **i32), list_cap, float(max_ratio))

    def check(self, heads: int, mqb: int) -> None:
        """Raise unless the workspace holds a ``[heads, mqb]`` batch."""
        pairs = heads * -(-mqb // 2)
        if self.union.shape[1] != 2 * self.list_cap:
            raise ValueError(f"PairWork union rows hold {self.union.shape[1]} entries; expected "
                             f"2 * list_cap = {2 * self.list_cap}")
        if (self.union_count.numel() < pairs or self.union.shape[0] < pairs
                or self.paired.numel() < heads * mqb):
            raise ValueError(f"PairWork holds {self.union_count.numel()} pairs / "
                             f"{self.paired.numel()} rows; the batch needs {pairs} / {heads * mqb}")


def plan_pairs_ref(block_index: torch.Tensor, block_count: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, work: PairWork,
                   block_size: int = 64) -> None:
    """Choose the pairs of ``block_index [B, Hq, MQB, MKB]`` / ``block_count [B, Hq, MQB]`` that
    run as 128-row tiles and write their union lists into ``work`` (see the module doc)."""
    bsz, hq, mqb, _ = block_index.shape
    work.check(bsz * hq, mqb)
    mqp = -(-mqb // 2)
    nqb = query_blocks(cu_seqlens_q.tolist(), seq_lens.tolist(), block_size)
    ratio = torch.tensor(work.max_ratio, dtype=torch.float32)
    paired = work.paired[:bsz * hq * mqb].view(bsz, hq, mqb)
    ucount = work.union_count[:bsz * hq * mqp].view(bsz, hq, mqp)
    union = work.union[:bsz * hq * mqp].view(bsz, hq, mqp, -1)
    for b in range(bsz):
        for h in range(hq):
            for p in range(mqp):
                ja, jb = 2 * p, 2 * p + 1
                ca = int(block_count[b, h, ja])
                cb = int(block_count[b, h, jb]) if jb < mqb else 0
                u = 0
                if jb < nqb[b] and 0 < ca <= work.list_cap and 0 < cb <= work.list_cap:
                    a = set(block_index[b, h, ja, :ca].tolist())
                    bb = set(block_index[b, h, jb, :cb].tolist())
                    both = sorted(a | bb)
                    cost = torch.tensor(2 * len(both), dtype=torch.float32)
                    if cost <= ratio * torch.tensor(ca + cb, dtype=torch.float32):
                        u = len(both)
                        codes = [kb * 4 + (kb in a) + 2 * (kb in bb) for kb in both]
                        union[b, h, p, :u] = torch.tensor(codes, dtype=torch.int32)
                ucount[b, h, p] = u
                paired[b, h, ja] = int(u > 0)
                if jb < mqb:
                    paired[b, h, jb] = int(u > 0)


def query_blocks(cu: list[int], lens: list[int], block_size: int) -> list[int]:
    """Local query blocks each request's rows touch this step (0 without rows)."""
    out = []
    for b, L in enumerate(lens):
        n = cu[b + 1] - cu[b]
        out.append((L - 1) // block_size - (L - n) // block_size + 1 if n else 0)
    return out
