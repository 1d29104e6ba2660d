"""Gate scores + selection kernel vs the reference (selections compared as sets)."""

from __future__ import annotations

import math

import pytest
import torch
from _paged import DEVICE
from vllm_seer.kernels.block_select import block_select_ref

from vllm_seer.gate import Selection, gate_probs, gate_scores
from vllm_seer.rope import RopeSpec

# (seq_lens, n_new, Hq, Hkv, D, selection)
TOPK = Selection("nz_ratio", 0.0, 0.3, True)
CPU_CASES = {
    "topk-ragged-gqa4": ([700, 130, 64], [300, 130, 1], 4, 1, 64, TOPK),
    "topk-no-last-dense-gqa3": ([1000, 260], [1000, 7], 3, 1, 64,
                                Selection("nz_ratio", 0.0, 0.1, False)),
    "threshold-mha-empty-req": ([640, 90, 200], [640, 0, 150], 2, 2, 64,
                                Selection("threshold", 2e-2, 0.0, True)),
    "threshold-d128": ([500], [200], 2, 1, 128, Selection("threshold", 5e-3, 0.0, False)),
    "topk-sink2-ragged": ([700, 130, 64], [300, 130, 1], 4, 1, 64,
                          Selection("nz_ratio", 0.0, 0.3, True, sink_blocks=2)),
    # k = int((1 - sqrt(0.7)) * 16) = 2 for the 1000-token request: the sink takes one of two places
    "topk-sink1-k2": ([1000, 900], [400, 900], 2, 1, 64,
                      Selection("nz_ratio", 0.0, 0.3, True, sink_blocks=1)),
    "threshold-sink1-chunk": ([640, 200], [100, 150], 2, 2, 64,
                              Selection("threshold", 2e-1, 0.0, False, sink_blocks=1)),
}
GPU_CASES = {
    "llama-32k-topk0.1": ([32768], [32768], 32, 8, 128, Selection("nz_ratio", 0.0, 0.1, True)),
    "llama-chunk-threshold": ([20000, 3000], [4096, 3000], 32, 8, 128,
                              Selection("threshold", 5e-4, 0.0, True)),
    "smollm-ragged-topk0.5": ([8192, 777, 64], [2048, 300, 1], 9, 3, 64,
                              Selection("nz_ratio", 0.0, 0.5, True)),
    "llama-chunk-topk0.1-sink1": ([32768, 5000], [8192, 5000], 32, 8, 128,
                                  Selection("nz_ratio", 0.0, 0.1, True, sink_blocks=1)),
}


def _inputs(lens: list[int], n_new: list[int], hq: int, hkv: int, d: int, bs: int = 64):
    mkb = max(-(-L // bs) for L in lens)
    mqb = max(((L - 1) // bs - (L - n) // bs + 1) if n else 0 for L, n in zip(lens, n_new,
                                                                             strict=True))
    q_pooled = torch.randn(len(lens), mqb, hq, d, device=DEVICE)
    k_pooled = torch.randn(len(lens), mkb + 1, hkv, 3 * d, device=DEVICE)
    weight = torch.randn(hq, 3 * d, d, device=DEVICE) * (2.0 / math.sqrt(3 * d))
    cu = torch.tensor([0] + n_new, device=DEVICE).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    inv = RopeSpec(d, 10000.0).inv_freq().to(DEVICE)
    return q_pooled, k_pooled, weight, inv, cu, seq_lens, mqb, mkb


def _as_masks(index: torch.Tensor, count: torch.Tensor, mkb: int) -> torch.Tensor:
    slot = torch.arange(index.shape[-1], device=index.device)
    live = slot < count[..., None]
    assert (index[~live] == -1).all(), "padding must be -1"
    ids = torch.where(live, index.long(), mkb)
    m = torch.zeros(*index.shape[:-1], mkb + 1, dtype=torch.bool, device=index.device)
    return m.scatter_(-1, ids, True)[..., :mkb]


def _run(case: tuple) -> None:
    from vllm_seer.kernels.block_select import block_select

    lens, n_new, hq, hkv, d, sel = case
    q_pooled, k_pooled, weight, inv, cu, seq_lens, mqb, mkb = _inputs(lens, n_new, hq, hkv, d)
    shape = (len(lens), hq, mqb, mkb)
    outs = []
    for fn in (block_select_ref, block_select):
        index = torch.full(shape, -7, dtype=torch.int32, device=DEVICE)
        count = torch.full(shape[:3], -7, dtype=torch.int32, device=DEVICE)
        fn(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count)
        assert (count >= 0).all() and (index >= -1).all(), "every element must be written"
        sorted_ok = (index[..., 1:] > index[..., :-1]) | (index[..., 1:] == -1)
        assert sorted_ok.all(), "lists must be ascending"
        outs.append((_as_masks(index, count, mkb), count))
    (m_ref, c_ref), (m_got, c_got) = outs
    if sel.method == "nz_ratio":
        torch.testing.assert_close(c_got, c_ref)
    for b, (L, n) in enumerate(zip(lens, n_new, strict=True)):
        if n == 0:
            assert (c_got[b] == 0).all()
            continue
        qb0, nkb = (L - n) // 64, -(-L // 64)
        nqb = (L - 1) // 64 - qb0 + 1
        for m in (m_ref, m_got):  # the sink blocks are in every row (where causal)
            qb = qb0 + torch.arange(nqb, device=m.device)
            want = torch.arange(nkb, device=m.device)[None, :] <= torch.minimum(
                qb, torch.full_like(qb, sel.sink_blocks - 1))[:, None]
            assert (m[b, :, :nqb, :nkb] | ~want).all()
        probs = gate_probs(q_pooled[b, :nqb], qb0, k_pooled[b, :nkb], weight, inv, 64)
        diff = m_ref[b, :, :nqb, :nkb] ^ m_got[b, :, :nqb, :nkb]
        if sel.method == "threshold":  # flips only where the probability sits on the threshold
            assert (probs[diff] - sel.threshold).abs().le(1e-5).all()
        else:  # same number of blocks, same selected probabilities (ties resolved by score)
            p_ref = torch.where(m_ref[b, :, :nqb, :nkb], probs, 0).sort(-1).values
            p_got = torch.where(m_got[b, :, :nqb, :nkb], probs, 0).sort(-1).values
            torch.testing.assert_close(p_got, p_ref, rtol=1e-4, atol=1e-6)
        assert (c_got[b, :, nqb:] == 0).all()


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_block_select_matches_reference(case: tuple) -> None:
    _run(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_block_select_gpu(case: tuple) -> None:
    _run(case)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("neg", [False, True], ids=["zero-scores", "negative-scores"])
def test_block_select_topk_ties_take_lowest_blocks(neg: bool, impl: str) -> None:
    """Every causal score tied (zero gate weight, or one negative constant): the single-warp radix
    select, and the reference, keep exactly the ``k`` lowest causal block indices, plus the
    forced diagonal."""
    from vllm_seer.kernels.block_select import block_select as triton_select

    block_select = triton_select if impl == "triton" else block_select_ref

    lens, n_new, hq, hkv, d = [900, 400], [500, 400], 2, 1, 64
    q_pooled, k_pooled, weight, inv, cu, seq_lens, mqb, mkb = _inputs(lens, n_new, hq, hkv, d)
    weight.zero_()
    if neg:  # scores = -c for every block: a constant pooled query against a constant key
        weight[:, 0, 0] = 1.0
        k_pooled.fill_(1.0)
        q_pooled.fill_(0.0)
        q_pooled[..., 0] = -2.0  # RoPE at block starts rotates pairs: keep the angle-0 pair only
        inv = torch.zeros_like(inv)
    sel = Selection("nz_ratio", 0.0, 0.3, False)
    index = torch.full((len(lens), hq, mqb, mkb), -7, dtype=torch.int32, device=DEVICE)
    count = torch.full((len(lens), hq, mqb), -7, dtype=torch.int32, device=DEVICE)
    block_select(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count)
    got = _as_masks(index, count, mkb)
    for b, (L, n) in enumerate(zip(lens, n_new, strict=True)):
        nkb = -(-L // 64)
        k = max(1, int((1.0 - math.sqrt(1.0 - 0.3)) * nkb))
        qb0 = (L - n) // 64
        for j in range(mqb):
            qb = qb0 + j
            want = torch.zeros(mkb, dtype=torch.bool, device=DEVICE)
            if j <= (L - 1) // 64 - qb0:
                want[:min(k, qb + 1)] = True
                want[qb] = True
            assert (got[b, :, j] == want).all(), (b, j)



@pytest.mark.parametrize("levels", [3, 6, 12])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_block_select_topk_tie_levels_exact(levels: int, impl: str) -> None:
    """Scores on a few integer levels, so each row's k-th score is sometimes tied and sometimes the
    last of a level that ends exactly at rank k (where the kernel's radix passes stop early): the
    masks equal a stable top-k (highest score first, ties to the lowest block index) element for
    element, plus the forced diagonal."""
    from vllm_seer.kernels.block_select import block_select as triton_select

    block_select = triton_select if impl == "triton" else block_select_ref
    lens, n_new, hq, hkv, d = [1900, 700], [1900, 300], 2, 1, 64
    q_pooled, k_pooled, weight, inv, cu, seq_lens, mqb, mkb = _inputs(lens, n_new, hq, hkv, d)
    gen = torch.Generator().manual_seed(levels)
    weight.zero_()
    weight[:, 0, 0] = 1.0  # score = q[0] * k_max[0] / sqrt(G): no RoPE (inv_freq 0), no mixing
    inv = torch.zeros_like(inv)
    level = torch.randint(0, levels, k_pooled.shape[:3], generator=gen).float()
    k_pooled.zero_()
    k_pooled[..., 0] = level.to(DEVICE)
    q_pooled.zero_()
    q_pooled[..., 0] = torch.randint(1, 4, q_pooled.shape[:3], generator=gen).float().to(DEVICE)
    sel = Selection("nz_ratio", 0.0, 0.3, False)
    index = torch.full((len(lens), hq, mqb, mkb), -7, dtype=torch.int32, device=DEVICE)
    count = torch.full((len(lens), hq, mqb), -7, dtype=torch.int32, device=DEVICE)
    block_select(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count)
    got = _as_masks(index, count, mkb).cpu()
    exact_ends = ties = 0
    for b, (L, n) in enumerate(zip(lens, n_new, strict=True)):
        nkb = -(-L // 64)
        k = max(1, int((1.0 - math.sqrt(1.0 - 0.3)) * nkb))
        qb0 = (L - n) // 64
        for h in range(hq):
            for j in range((L - 1) // 64 - qb0 + 1):
                qb = qb0 + j
                s = level[b, : qb + 1, 0] * float(q_pooled[b, j, h, 0])
                # stable descending sort: equal scores keep ascending block order
                order = torch.sort(-s, stable=True).indices[:k]
                want = torch.zeros(mkb, dtype=torch.bool)
                want[order] = True
                want[qb] = True
                assert torch.equal(got[b, h, j], want), (b, h, j)
                if qb + 1 > k:
                    kth = s.sort(descending=True).values[k - 1]
                    exact_ends += int((s >= kth).sum() == k)
                    ties += int((s >= kth).sum() > k)
    assert exact_ends > 0 and ties > 0, "both the early stop and the tie rule must be exercised"


@pytest.mark.parametrize("scale", [60.0, 400.0])
def test_block_select_topk_large_scores_keep_k_causal_blocks(scale: float) -> None:
    """Large-magnitude pooled queries: the softmax of most rows underflows to one-hot. Ranking the
    masked logits (upstream, the Triton kernel and the reference) still keeps ``min(k, qb + 1)``
    causal blocks per row, and kernel and reference select the same blocks (same counts, same
    selected scores)."""
    from vllm_seer.kernels.block_select import block_select

    lens, n_new, hq, hkv, d = [1500, 700], [1500, 300], 2, 1, 64
    q_pooled, k_pooled, weight, inv, cu, seq_lens, mqb, mkb = _inputs(lens, n_new, hq, hkv, d)
    q_pooled *= scale
    sel = Selection("nz_ratio", 0.0, 0.3, False)
    outs = []
    for fn in (block_select_ref, block_select):
        index = torch.full((len(lens), hq, mqb, mkb), -7, dtype=torch.int32, device=DEVICE)
        count = torch.full((len(lens), hq, mqb), -7, dtype=torch.int32, device=DEVICE)
        fn(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count)
        outs.append((_as_masks(index, count, mkb), count))
    (m_ref, c_ref), (m_got, c_got) = outs
    torch.testing.assert_close(c_got, c_ref)
    underflow = 0
    for b, (L, n) in enumerate(zip(lens, n_new, strict=True)):
        qb0, nkb = (L - n) // 64, -(-L // 64)
        nqb = (L - 1) // 64 - qb0 + 1
        for m in (m_ref, m_got):  # the sink blocks are in every row (where causal)
            qb = qb0 + torch.arange(nqb, device=m.device)
            want = torch.arange(nkb, device=m.device)[None, :] <= torch.minimum(
                qb, torch.full_like(qb, sel.sink_blocks - 1))[:, None]
            assert (m[b, :, :nqb, :nkb] | ~want).all()
        k = max(1, int((1.0 - math.sqrt(1.0 - 0.3)) * nkb))
        s = gate_scores(q_pooled[b, :nqb], qb0, k_pooled[b, :nkb], weight, inv, 64)
        probs = torch.softmax(s, -1)
        underflow += int(((probs > 0).sum(-1) < k).sum())
        want = torch.clamp(qb0 + torch.arange(nqb, device=DEVICE) + 1, max=k)
        assert (c_ref[b, :, :nqb] >= want).all() and (c_ref[b, :, :nqb] <= want + 1).all()
        for m in (m_ref, m_got):
            assert not (m[b, :, :nqb, :nkb] & torch.isinf(s)).any(), "non-causal block selected"
        s_ref = torch.where(m_ref[b, :, :nqb, :nkb], s, 0).sort(-1).values
        s_got = torch.where(m_got[b, :, :nqb, :nkb], s, 0).sort(-1).values
        torch.testing.assert_close(s_got, s_ref, rtol=1e-4, atol=1e-3)
    assert underflow > 0, "the inputs must make probabilities underflow for the test to mean anything"


def test_block_select_precomputed_topk() -> None:
    """A per-request ``k`` precomputed on the host (``SeerBuffers.set_topk``) selects exactly what
    the per-call device computation does; the reference refuses a ``k`` that is not
    ``topk_count`` of the request's length."""
    from vllm_seer.kernels.block_select import block_select
    from vllm_seer.kernels.planning import SeerBuffers, plan_batch

    lens, n_new, hq, hkv, d, sel = CPU_CASES["topk-ragged-gqa4"]
    q_pooled, k_pooled, weight, inv, cu, seq_lens, mqb, mkb = _inputs(lens, n_new, hq, hkv, d)
    bufs = SeerBuffers.allocate(plan_batch(cu.tolist(), lens), hq, hkv, d, DEVICE)
    bufs.set_topk(lens, sel)
    assert bufs.topk is not None
    res = []
    for topk in (None, bufs.topk):
        index = torch.full((len(lens), hq, mqb, mkb), -7, dtype=torch.int32, device=DEVICE)
        count = torch.full((len(lens), hq, mqb), -7, dtype=torch.int32, device=DEVICE)
        block_select(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count, topk=topk)
        res.append((index, count))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    index = torch.empty_like(res[0][0])
    count = torch.empty_like(res[0][1])
    with pytest.raises(ValueError, match="topk_count"):
        block_select_ref(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count,
                         topk=bufs.topk + 1)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_block_select_startup_tables(impl: str) -> None:
    """The start-up tables (block-start RoPE cos / sin, KV-grouped weight) select exactly what the
    per-call ones do, with a table longer than the batch needs; a table of other frequencies,
    one too short, or a weight of another layer is refused by the reference, and a table of the
    wrong shape by both."""
    from vllm_seer.kernels.block_select import block_select as triton_select

    from vllm_seer.gate import block_rope_table, group_gate_weight

    fn = triton_select if impl == "triton" else block_select_ref
    lens, n_new, hq, hkv, d, sel = CPU_CASES["topk-ragged-gqa4"]
    q_pooled, k_pooled, weight, inv, cu, seq_lens, mqb, mkb = _inputs(lens, n_new, hq, hkv, d)
    table = block_rope_table(inv, mkb + 5, 64)
    grouped = group_gate_weight(weight, hkv)
    res = []
    for tab, gw in ((None, None), (table, grouped)):
        index = torch.full((len(lens), hq, mqb, mkb), -7, dtype=torch.int32, device=DEVICE)
        count = torch.full((len(lens), hq, mqb), -7, dtype=torch.int32, device=DEVICE)
        fn(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count,
           rope_table=tab, grouped_weight=gw)
        res.append((index, count))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    index, count = torch.empty_like(res[0][0]), torch.empty_like(res[0][1])
    with pytest.raises(ValueError, match="rope_table"):
        fn(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count,
           rope_table=table[:, :, :-1])
    if impl == "reference":
        bad = [dict(rope_table=block_rope_table(inv * 2, mkb, 64)),
               dict(rope_table=table[:mkb - 1]),
               dict(grouped_weight=group_gate_weight(weight * 2, hkv))]
        for kwargs in bad:
            with pytest.raises(ValueError):
                fn(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count, **kwargs)


def test_group_gate_weight_layout() -> None:
    """Column block ``i`` of KV group ``h`` is query head ``h * group + i``'s projection."""
    from vllm_seer.gate import group_gate_weight

    w = torch.randn(6, 12, 4)
    g = group_gate_weight(w, 2)
    assert g.shape == (2, 12, 12) and g.is_contiguous()
    for h in range(6):
        torch.testing.assert_close(g[h // 3, :, (h % 3) * 4:(h % 3 + 1) * 4], w[h])
    with pytest.raises(ValueError, match="KV heads"):
        group_gate_weight(w, 4)


@pytest.mark.parametrize("warps", [1] + [pytest.param(w, marks=pytest.mark.gpu) for w in (2, 4, 8)])
@pytest.mark.parametrize("levels", [4, 0], ids=["tied-levels", "random"])
def test_select_kernel_configs_agree(levels: int, warps: int) -> None:
    """Every autotune config of the selection kernel (warps per row) writes the same lists,
    element for element, from the same scores; rows with tied k-th scores and rows whose radix
    passes stop early both occur."""
    import triton
    from vllm_seer.kernels.block_select import block_select
    from vllm_seer.kernels.block_select import triton as bsel

    # a 40k-token context: 625 key blocks, a 1024-wide row as long prompts give (the widths where
    # the autotuner picks more than one warp)
    lens, n_new, hq, hkv, d = [40000, 2500], [300, 1200], 2, 1, 64
    q_pooled, k_pooled, weight, inv, cu, seq_lens, mqb, mkb = _inputs(lens, n_new, hq, hkv, d)
    if levels:  # integer score levels (see test_block_select_topk_tie_levels_exact)
        gen = torch.Generator().manual_seed(1)
        weight.zero_()
        weight[:, 0, 0] = 1.0
        inv = torch.zeros_like(inv)
        k_pooled.zero_()
        k_pooled[..., 0] = torch.randint(0, levels, k_pooled.shape[:3], generator=gen).float()
    sel = Selection("nz_ratio", 0.0, 0.3, True)
    shape = (len(lens), hq, mqb, mkb)
    work = torch.empty(len(lens) * hq * mqb * mkb, dtype=torch.float32, device=DEVICE)
    index = torch.full(shape, -7, dtype=torch.int32, device=DEVICE)
    count = torch.full(shape[:3], -7, dtype=torch.int32, device=DEVICE)
    block_select_ref(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count)
    ref = _as_masks(index, count, mkb)
    block_select(q_pooled, k_pooled, weight, inv, cu, seq_lens, sel, index, count, workspace=work)
    nkb = (seq_lens.long() + 63) // 64
    topk = torch.clamp(((1.0 - math.sqrt(0.7)) * nkb.double()).floor(), min=1).to(torch.int32)
    idx2 = torch.full(shape, -7, dtype=torch.int32, device=DEVICE)
    cnt2 = torch.full(shape[:3], -7, dtype=torch.int32, device=DEVICE)
    bsel._select_kernel.fn[(mqb, len(lens), hq)](
        work, topk, idx2, cnt2, cu, seq_lens, 0.0, mqb, mkb, 0, HQ=hq, BLOCK=64,
        BLOCK_K=triton.next_power_of_2(mkb), TOPK=True, LAST_DENSE=True, num_warps=warps)
    assert torch.equal(idx2, index) and torch.equal(cnt2, count)
    if levels:  # integer levels: exact scores, so the reference's ties resolve the same way
        assert torch.equal(_as_masks(idx2, cnt2, mkb), ref)
        # both ways out of the radix loop occur: exactly k keys >= the k-th (early stop) and a
        # tied k-th score (the tie-breaking scan)
        scores = work.view(shape).cpu()  # written for causal blocks only
        stops = ties = 0
        for b, (L, n) in enumerate(zip(lens, n_new, strict=True)):
            k, qb0 = int(topk[b]), (L - n) // 64
            for j in range((L - 1) // 64 - qb0 + 1):
                if qb0 + j + 1 > k:  # more causal blocks than k
                    row = scores[b, :, j, : qb0 + j + 1]
                    n_ge = (row >= row.sort(-1, descending=True).values[:, k - 1:k]).sum(-1)
                    stops += int((n_ge == k).sum())
                    ties += int((n_ge > k).sum())
        assert stops > 0 and ties > 0, (stops, ties)
