"""FlexAttention at the same block mask as Seer, in several tile configurations (the fair baseline).

Seer's selection is a ``[B, Hq, MQB, MKB]`` list of 64x64 blocks. FlexAttention tiles of
``q_block x kv_block`` (multiples of 64) get a BlockMask at that granularity: a coarse block is
*full* when every 64x64 block in it is selected and it lies entirely below the causal diagonal,
*partial* when some are selected (the element-level ``mask_mod`` then applies the exact 64x64
selection and causality), absent otherwise. So every configuration computes the same function as
Seer's kernel; only the tiling differs.
"""

from __future__ import annotations

import torch

# (BLOCK_M, BLOCK_N, num_warps, num_stages): Flex's own sm_90 default for 64x64 tiles, and wider
# tiles. Also tried on the H200 (2026-12-02) and dropped: 128x128 (8 warps, 3 stages) exceeds
# shared memory at d=128; 128x64 with 4 warps / 2 stages was slower than 64x64 at 8k-32k and ran
# out of memory at 128k (Flex materialised a dense mask)
FLEX_CONFIGS = ((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3))


def block_mask_dense(index: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, MQB, MKB]`` bool from Seer block lists."""
    b, h, mqb, mkb = index.shape
    live = torch.arange(mkb, device=index.device) < count[..., None]
    dense = torch.zeros(b, h, mqb, mkb + 1, dtype=torch.bool, device=index.device)
    dense.scatter_(-1, torch.where(live, index.long(), mkb), True)
    return dense[..., :mkb]


def flex_block_mask(fine: torch.Tensor, L: int, q_block: int, kv_block: int, bs: int = 64):
    """BlockMask at ``q_block x kv_block`` computing exactly the 64x64 selection ``fine``."""
    from torch.nn.attention.flex_attention import BlockMask, _dense_to_ordered

    b, h, mqb, mkb = fine.shape
    fq, fk = q_block // bs, kv_block // bs
    pq, pk = -mqb % fq, -mkb % fk
    padded = torch.nn.functional.pad(fine, (0, pk, 0, pq))
    cq, ck = (mqb + pq) // fq, (mkb + pk) // fk
    tiles = padded.view(b, h, cq, fq, ck, fk)
    any_ = tiles.any(dim=5).any(dim=3)
    all_ = tiles.all(dim=5).all(dim=3)
    qi = torch.arange(cq, device=fine.device)[:, None]
    ki = torch.arange(ck, device=fine.device)[None, :]
    below = (ki + 1) * kv_block - 1 <= qi * q_block  # every key before every query of the tile
    full = all_ & below
    partial = any_ & ~full
    part_cnt, part_idx = _dense_to_ordered(partial)
    full_cnt, full_idx = _dense_to_ordered(full)
    sel = fine

    def mask_mod(b_, h_, q, k):
        return sel[b_, h_, q // bs, k // bs] & (q >= k)

    return BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx,
                                    BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
                                    seq_lengths=(L, L))


def time_flex_configs(flex, bench, qt, kt, vt, fine: torch.Tensor, L: int, scale: float,
                      rep: int, configs=FLEX_CONFIGS) -> dict[str, float]:
    """ms of each configuration (NaN where it fails to compile or run), keyed
    ``"BMxBN-wW-sS"``. ``qt`` ``[1, Hq, L, D]``, ``kt``/``vt`` ``[1, Hkv, L, D]`` (GQA)."""
    res = {}
    for bm, bn, w, s in configs:
        name = f"{bm}x{bn}-w{w}-s{s}"
        try:
            mask = flex_block_mask(fine, L, bm, bn)
            opts = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}

            def fn(mask=mask, opts=opts):
                return flex(qt, kt, vt, block_mask=mask, scale=scale, enable_gqa=True,
                            kernel_options=opts)

            res[name] = bench(fn, rep)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
            res[name] = float("nan")
            print(f"flex {name} L={L}: {type(e).__name__}: {e}"[:300], flush=True)
    return res
