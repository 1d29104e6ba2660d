"""Diagnostic: per layer, how often the gate's / the oracle's top-k holds the sink block, and the true
attention mass inside the selected blocks (dense q/k of one held-out 4k window, CPU fp32).

Usage: ``.venv/bin/python benchmarks/sink_diagnostic_cpu.py 4096 0.1 prose`` (or ``code``); output
of 2026-12-07: ``benchmarks/results/raw/sink-diagnostic-cpu-4k.txt``. The mean mass recall hides
what matters for perplexity (rows that lose the sink lose most of their mass); see
``docs/accuracy-suite.md``, "Sink blocks".
"""
import sys

import torch
from vllm_seer.kernels.ground_truth import block_attn_ground_truth_ref

from vllm_seer.eval.cli import heldout_windows
from vllm_seer.eval.served import DEFAULT_GATES
from vllm_seer.eval.sparse import STATE, Selector
from vllm_seer.eval.suite_cli import load
from vllm_seer.gate import Selection, gate_scores_post, select
from vllm_seer.train.data import prose_root
from vllm_seer.train.prepare_model import prepare_model


def window(tok, length: int, kind: str) -> tuple[str, torch.Tensor]:
    """The first held-out window of ``kind`` (code / prose), as the other CPU scripts pick it."""
    if kind == "code":
        return heldout_windows(tok, length, 1)[0]
    return heldout_windows(tok, length, 1, root=prose_root(), suffixes=(".txt",))[0]


def mass(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float, bs: int) -> float:
    """True attention mass inside ``mask`` per query row, averaged over heads and the rows before
    the two dense last query blocks (``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``mask [Hq, nb, nb]``)."""
    t, hq, _ = q.shape
    qf = q.transpose(0, 1)
    kf = k.repeat_interleave(hq // k.shape[1], 1).transpose(0, 1)
    tot, n = 0.0, 0
    for r0 in range(0, t - 2 * bs, 512):
        r1 = min(r0 + 512, t - 2 * bs)
        s = (qf[:, r0:r1] @ kf[:, :r1].transpose(1, 2)) * scale
        future = torch.arange(r1)[None] > torch.arange(r0, r1)[:, None]
        a = torch.softmax(s.masked_fill(future, float("-inf")), -1)
        tm = mask[:, r0 // bs:r1 // bs, :r1 // bs].repeat_interleave(bs, 1).repeat_interleave(bs, 2)
        tot += float((a * tm).sum(-1).sum())
        n += a.shape[0] * a.shape[1]
    return tot / n


def main() -> None:
    length, nz, kind = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    model, tok, w, inv, bs = load(prepare_model(), DEFAULT_GATES, torch.device("cpu"),
                                  torch.float32)
    name, ids = window(tok, length, kind)
    cap: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(self: Selector, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        cap[layer] = (q.clone(), k.clone())  # dense run: record each layer's q / k

    orig = Selector.mask
    Selector.mask = grab
    STATE.reset(Selector("seer"))
    with torch.no_grad():
        model.model(input_ids=ids[None], use_cache=False)
    Selector.mask = orig
    sel = Selection("nz_ratio", 0.0, nz, last_block_dense=True)
    sink = Selection("nz_ratio", 0.0, nz, last_block_dense=True, sink_blocks=1)
    print(name)
    print("layer sink_or sink_seer recall_seer recall_seer+sink recall_oracle")
    agg = [0.0, 0.0, 0.0]
    rows = slice(1, length // bs - 2)
    for layer in range(len(cap)):
        q, k = cap[layer]
        p = torch.softmax(gate_scores_post(q, k, w[layer], inv, bs)[0], -1)
        m_seer = select(p, 0, sel)
        m_oracle = select(block_attn_ground_truth_ref(q, k, block_size=bs), 0, sel)
        m_sink = select(p, 0, sink)
        r = [mass(q, k, m, q.shape[-1] ** -0.5, bs) for m in (m_seer, m_sink, m_oracle)]
        agg = [a + x for a, x in zip(agg, r, strict=True)]
        print(layer, round(float(m_oracle[:, rows, 0].float().mean()), 3),
              round(float(m_seer[:, rows, 0].float().mean()), 3), *[round(x, 4) for x in r],
              flush=True)
    print("mean", *[round(x / len(cap), 4) for x in agg])


if __name__ == "__main__":
    main()
