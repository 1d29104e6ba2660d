"""Exploration: other ways to spend the top-k block budget, from gate or oracle probabilities (CPU).

SmolLM2-135M-Instruct + the committed gates, offline path (:mod:`vllm_seer.eval.sparse`), fp32.
Every variant keeps, per layer, the same number of blocks as the per-row top-k at ``nz_ratio``
(the forced diagonal and dense last two rows included); it changes which blocks:

* ``layer``: the layer's most probable blocks over all rows and heads (one global budget);
* ``head``: the same per head;
* ``topp``: per row, the smallest prefix of its descending probabilities reaching a mass ``p``,
  ``p`` bisected per layer to the same budget (rows of spread-out attention get more blocks);
* ``s``: per-row top-k with block 0 ranked first (what the setting ``sink_blocks`` 1 does; the
  committed measurement of it is ``benchmarks/sink_blocks_cpu.py``);
* ``sl``: as ``s`` with the block before the diagonal also ranked first.

``--src seer`` ranks by the gate's probabilities, ``oracle`` by the true block max-pooled attention.
Windows: the first ``--windows`` held-out code documents of :func:`vllm_seer.eval.cli.heldout_windows`
and as many held-out prose ones. Results (resumable): ``{"L|window|label": [ppl, density]}``.
Run on 2026-12-07 (4096 tokens, nz 0.1, two windows per corpus, not every variant on every window:
``benchmarks/results/raw/selection-allocation-cpu-4k.json``)::

    .venv/bin/python benchmarks/selection_allocation_cpu.py 4096 0.1 2 OUT.json \\
        --variants seer:layer seer:head seer:topp oracle:layer oracle:topp seer:s seer:sl
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from vllm_seer.kernels.ground_truth import block_attn_ground_truth_ref

from vllm_seer.eval.cli import heldout_windows
from vllm_seer.eval.served import DEFAULT_GATES
from vllm_seer.eval.sparse import Selector
from vllm_seer.eval.suite_cli import load
from vllm_seer.eval.tasks import perplexity
from vllm_seer.gate import Selection, gate_scores_post, select
from vllm_seer.train.data import prose_root
from vllm_seer.train.prepare_model import prepare_model


@dataclass
class BudgetSel(Selector):
    """A variant of the top-k budget (see the module docstring)."""

    src: str = "seer"
    scope: str = "layer"

    @property
    def label(self) -> str:
        return f"{self.src}-{self.scope} nz={self.nz_ratio:g}"

    def mask(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b = self.block_size
        if self.src == "seer":
            p = torch.softmax(gate_scores_post(q, k, self.weights[layer], self.inv_freq, b)[0], -1)
        else:
            p = block_attn_ground_truth_ref(q, k, block_size=b)
        sel = Selection("nz_ratio", 0.0, self.nz_ratio, last_block_dense=True)
        topk = select(p, 0, sel)
        h, nq, nk = p.shape
        qb, kb = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        forced = ((kb == qb) | (qb >= nq - 2))[None].expand(h, nq, nk) & (kb <= qb)
        cand = (kb <= qb)[None].expand(h, nq, nk) & ~forced
        score = p.masked_fill(~cand, -1.0)
        if self.scope in ("s", "sl"):
            prior = (kb == 0) | ((qb - kb == 1) if self.scope == "sl" else False)
            return select(p.masked_fill(prior[None], 2.0), 0, sel)
        n = int(topk.sum() - forced.sum())
        if self.scope == "topp":
            sp, order = torch.sort(score, dim=-1, descending=True)
            sp = sp.clamp(min=0)
            before = torch.cumsum(sp, -1) - sp  # mass strictly before each sorted entry
            valid = torch.gather(cand, -1, order)
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                if int(((before < mid) & valid).sum()) > n:
                    hi = mid
                else:
                    lo = mid
            return torch.zeros_like(cand).scatter_(-1, order, (before < lo) & valid) | forced
        if self.scope == "layer":
            flat = score.flatten()
            m = torch.zeros_like(flat, dtype=torch.bool)
            m[torch.topk(flat, n).indices] = True
            return m.view(h, nq, nk) | forced
        out = forced.clone()
        for i in range(h):
            idx = torch.topk(score[i].flatten(), int(topk[i].sum() - forced[i].sum())).indices
            out[i].view(-1)[idx] = True
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("length", type=int)
    ap.add_argument("nz", type=float)
    ap.add_argument("windows", type=int, help="held-out windows per corpus")
    ap.add_argument("out", type=Path)
    ap.add_argument("--variants", nargs="+", default=["seer:layer", "seer:head", "seer:topp"],
                    help="SRC:SCOPE, SRC in seer / oracle, SCOPE in layer / head / topp / s / sl")
    a = ap.parse_args()
    model, tok, w, inv, bs = load(prepare_model(), DEFAULT_GATES, torch.device("cpu"),
                                  torch.float32)
    docs = heldout_windows(tok, a.length, a.windows) + [
        ("prose:" + name, ids) for name, ids in
        heldout_windows(tok, a.length, a.windows, root=prose_root(), suffixes=(".txt",))]
    sels = [Selector("dense"), Selector("seer", "nz_ratio", nz_ratio=a.nz, weights=w, inv_freq=inv),
            Selector("oracle", "nz_ratio", nz_ratio=a.nz)]
    for v in a.variants:
        src, scope = v.split(":")
        sels.append(BudgetSel("seer" if src == "seer" else "oracle", "nz_ratio", nz_ratio=a.nz,
                              weights=w if src == "seer" else None,
                              inv_freq=inv if src == "seer" else None, src=src, scope=scope))
    res = json.loads(a.out.read_text()) if a.out.exists() else {}
    for name, ids in docs:
        for sel in sels:
            key = f"{a.length}|{name}|{sel.label}"
            if key in res:
                continue
            t0 = time.perf_counter()
            ppl, dens = perplexity(model, ids, sel)
            res[key] = [ppl, dens]
            a.out.write_text(json.dumps(res, indent=1))
            print(key, round(ppl, 4), round(dens, 4), round(time.perf_counter() - t0, 1),
                  flush=True)


if __name__ == "__main__":
    main()
