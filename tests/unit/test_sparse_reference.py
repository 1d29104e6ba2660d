"""The PyTorch block-sparse prefill reference over a paged cache vs dense attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vllm_seer.kernels.sparse_prefill import masks_to_block_lists, sparse_prefill_paged_ref

BS = 64  # gate block


def make_paged(seqs, hkv, d, page, head_major, gen):
    """Scatter per-request K/V ``[L, Hkv, D]`` into a shuffled paged cache; return views."""
    n_pages = sum(-(-L // page) for L in seqs) + 3
    shape = (n_pages, hkv, page, d) if head_major else (n_pages, page, hkv, d)
    kc, vc = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    if head_major:  # CPU layout: view as [pages, page, Hkv, D]
        kc, vc = kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3)
    perm = torch.randperm(n_pages, generator=gen).tolist()
    max_pages = max(-(-L // page) for L in seqs)
    table = torch.zeros(len(seqs), max_pages, dtype=torch.int32)
    ks, vs = [], []
    for b, L in enumerate(seqs):
        k = torch.randn(L, hkv, d, generator=gen)
        v = torch.randn(L, hkv, d, generator=gen)
        for j in range(-(-L // page)):
            p = perm.pop()
            table[b, j] = p
            chunk = slice(j * page, min(L, (j + 1) * page))
            n = chunk.stop - chunk.start
            kc[p, :n], vc[p, :n] = k[chunk], v[chunk]
        ks.append(k)
        vs.append(v)
    return kc, vc, table, ks, vs


def dense_reference(q, ks, vs, cu, seqs, allowed_fn, scale):
    out = torch.empty_like(q)
    for b, L in enumerate(seqs):
        s, e = cu[b], cu[b + 1]
        n = e - s
        group = q.shape[1] // ks[b].shape[1]
        k = ks[b].repeat_interleave(group, 1).transpose(0, 1)
        v = vs[b].repeat_interleave(group, 1).transpose(0, 1)
        mask = allowed_fn(b, L, n)  # [Hq, n, L]
        out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k, v, attn_mask=mask,
                                                  scale=scale).transpose(0, 1)
    return out


CASES = [  # (query lens, seq lens, Hq, Hkv, page, head_major)
    pytest.param([130], [130], 2, 2, 16, False, id="one-request-partial-block-page16"),
    pytest.param([70, 200, 5], [70, 328, 69], 6, 2, 64, True, id="ragged-gqa3-cached-page64"),
    pytest.param([64, 100], [192, 100], 8, 1, 128, False, id="mqa-chunk-aligned-page128"),
    pytest.param([33], [300], 4, 4, 16, True, id="chunk-starts-mid-block"),
]


def run_reference(qlens, seqs, hq, hkv, page, head_major, seed, make_mask, scale):
    """Random paged K/V and queries, per-request block masks from ``make_mask``, the reference run.

    ``make_mask(gen, hq, nqb, nkb, qb0)`` returns a request's ``[Hq, nqb, nkb]`` bool mask.
    Returns (out, q, ks, vs, cu, masks).
    """
    gen = torch.Generator().manual_seed(seed)
    d = 32
    kc, vc, table, ks, vs = make_paged(seqs, hkv, d, page, head_major, gen)
    cu = [0, *torch.tensor(qlens).cumsum(0).tolist()]
    q = torch.randn(cu[-1], hq, d, generator=gen)
    masks = []
    for n, L in zip(qlens, seqs, strict=True):
        qb0, nkb = (L - n) // BS, -(-L // BS)
        masks.append(make_mask(gen, hq, (L - 1) // BS - qb0 + 1, nkb, qb0))
    index, count = masks_to_block_lists(masks)
    assert int((index >= 0).sum()) == int(count.sum()) == sum(int(m.sum()) for m in masks)
    out = torch.full_like(q, float("nan"))
    sparse_prefill_paged_ref(q, kc, vc, table, torch.tensor(cu, dtype=torch.int32),
                             torch.tensor(seqs, dtype=torch.int32), index, count, out, scale, BS)
    return out, q, ks, vs, cu, masks


@pytest.mark.parametrize(("qlens", "seqs", "hq", "hkv", "page", "head_major"), CASES)
def test_all_blocks_active_equals_sdpa_causal(qlens, seqs, hq, hkv, page, head_major):
    def full(gen, hq, nqb, nkb, qb0):
        return torch.ones(hq, nqb, nkb, dtype=torch.bool).tril(qb0)

    out, q, ks, vs, cu, _ = run_reference(qlens, seqs, hq, hkv, page, head_major, 1, full, 0.125)

    def causal(b, L, n):
        return (torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]).expand(hq, n, L)

    want = dense_reference(q, ks, vs, cu, seqs, causal, 0.125)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("qlens", "seqs", "hq", "hkv", "page", "head_major"), CASES)
def test_random_masks_equal_masked_dense(qlens, seqs, hq, hkv, page, head_major):
    def random_mask(gen, hq, nqb, nkb, qb0):
        m = torch.rand(hq, nqb, nkb, generator=gen) < 0.4
        qb = qb0 + torch.arange(nqb)
        m |= torch.arange(nkb)[None, :] == qb[:, None]  # diagonal (keeps every row finite)
        return m & (torch.arange(nkb)[None, :] <= qb[:, None])

    out, q, ks, vs, cu, masks = run_reference(qlens, seqs, hq, hkv, page, head_major, 2,
                                              random_mask, 0.2)

    def allowed(b, L, n):
        qpos, kpos = torch.arange(L - n, L), torch.arange(L)
        qb = qpos // BS - (L - n) // BS
        blk = masks[b][:, qb][:, :, kpos // BS]
        return blk & (kpos[None, None, :] <= qpos[None, :, None])

    want = dense_reference(q, ks, vs, cu, seqs, allowed, 0.2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(out).any()
