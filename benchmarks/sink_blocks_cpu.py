"""Perplexity with and without the setting ``sink_blocks`` at matched top-k budgets (CPU, fp32).

SmolLM2-135M-Instruct (``vllm-seer prepare-model``) with the committed distilled gates through the
offline evaluation path (:mod:`vllm_seer.eval.sparse`, the accuracy suite's selectors): per held-out
window (the suite's round-robin windows of code and prose, :func:`vllm_seer.eval.suite.corpus_windows`)
and top-k budget ``nz_ratio``: ``dense``, ``seer`` (upstream's selection), ``seer+sink``
(``sink_blocks`` 1: block 0 first in every row's top-k, inside the row's ``k``) and, with
``--oracle``, the oracle top-k of the true block max-pooled attention. Writes a JSON of every
window (resumable: cells already there are skipped) and a markdown table of per-window values and
of the geometric-mean ratios seer+sink / seer and seer / oracle.

Usage (the numbers in ``docs/accuracy-suite.md``, "Sink blocks")::

    .venv/bin/python benchmarks/sink_blocks_cpu.py --lengths 4096 --nz 0.1 0.3 --windows 2 \\
        --oracle --out benchmarks/results/sink-blocks-cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch

from vllm_seer.eval.served import DEFAULT_GATES
from vllm_seer.eval.sparse import Selector
from vllm_seer.eval.suite import CORPORA, corpus_windows
from vllm_seer.eval.suite_cli import load
from vllm_seer.eval.tasks import perplexity
from vllm_seer.train.prepare_model import prepare_model


def selectors(nz: float, weights: dict, inv: torch.Tensor, bs: int, oracle: bool) -> list[Selector]:
    sels = [Selector("seer", "nz_ratio", nz_ratio=nz, block_size=bs, weights=weights,
                     inv_freq=inv),
            Selector("seer", "nz_ratio", nz_ratio=nz, block_size=bs, weights=weights,
                     inv_freq=inv, sink_blocks=1)]
    if oracle:
        sels.append(Selector("oracle", "nz_ratio", nz_ratio=nz, block_size=bs))
    return sels


def geo_ratio(res: dict, length: int, num: str, den: str) -> float | None:
    """Geometric mean over windows of ``ppl(num) / ppl(den)`` at ``length`` (windows with both)."""
    logs = []
    for key, v in res.items():
        n, win, lab = key.split("|", 2)
        other = res.get(f"{n}|{win}|{den}")
        if int(n) == length and lab == num and other is not None:
            logs.append(math.log(v["ppl"] / other["ppl"]))
    return math.exp(sum(logs) / len(logs)) if logs else None


def markdown(res: dict, meta: dict) -> str:
    lines = [f"# `sink_blocks` on SmolLM2-135M (CPU, fp32), {meta['date']}", "",
             f"`benchmarks/sink_blocks_cpu.py`; {meta['device']}, torch {meta['torch']}; gates "
             f"`{meta['gates']}`. Perplexity per held-out window (achieved density).", "",
             "| length | window | selector | perplexity | density |", "|---|---|---|---|---|"]
    for key in sorted(res, key=lambda k: (int(k.split("|")[0]), k)):
        n, win, lab = key.split("|", 2)
        lines.append(f"| {n} | {win} | {lab} | {res[key]['ppl']:.4f} | {res[key]['density']:.4f} |")
    lines += ["", "| length | budget | seer+sink / seer | seer / oracle | seer+sink / oracle |",
              "|---|---|---|---|---|"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    for n in meta["lengths"]:
        for nz in meta["nz"]:
            s, ss, o = f"seer nz={nz:g}", f"seer+sink nz={nz:g}", f"oracle nz={nz:g}"
            lines.append(f"| {n} | nz={nz:g} | {fmt(geo_ratio(res, n, ss, s))} | "
                         f"{fmt(geo_ratio(res, n, s, o))} | {fmt(geo_ratio(res, n, ss, o))} |")
    lines += ["", "(ratios: geometric mean over the windows of the per-window perplexity ratio)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--nz", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--windows", type=int, default=2, help="held-out windows per corpus")
    ap.add_argument("--oracle", action="store_true", help="also the oracle top-k (slow)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, required=True, help="prefix of OUT.json / OUT.md")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, weights, inv, bs = load(prepare_model(), DEFAULT_GATES, torch.device("cpu"),
                                        torch.float32)
    path = a.out.with_suffix(".json")
    saved = json.loads(path.read_text()) if path.is_file() else {}
    res: dict = saved.get("windows", {})
    for n in a.lengths:
        wins = [(f"{c}:{name}", ids) for c in CORPORA
                for name, ids in corpus_windows(tok, c, n, a.windows)]
        for name, ids in wins:
            todo = [Selector("dense")] + [s for nz in a.nz
                                          for s in selectors(nz, weights, inv, bs, a.oracle)]
            for sel in todo:
                key = f"{n}|{name}|{sel.label}"
                if key in res:
                    continue
                t0 = time.perf_counter()
                ppl, dens = perplexity(model, ids, sel)
                res[key] = {"ppl": ppl, "density": dens, "seconds": time.perf_counter() - t0}
                print(f"{key}: {ppl:.4f} (density {dens:.4f})", flush=True)
                path.write_text(json.dumps({"windows": res}, indent=1))
    meta = {"date": datetime.date.today().isoformat(), "device": platform.processor() or "cpu",
            "torch": torch.__version__, "gates": str(DEFAULT_GATES), "lengths": a.lengths,
            "nz": a.nz, "windows_per_corpus": a.windows, "dtype": "float32",
            "threads": torch.get_num_threads()}
    ratios = {f"{n}|nz={nz:g}": {
        "sink_over_seer": geo_ratio(res, n, f"seer+sink nz={nz:g}", f"seer nz={nz:g}"),
        "seer_over_oracle": geo_ratio(res, n, f"seer nz={nz:g}", f"oracle nz={nz:g}"),
        "sink_over_oracle": geo_ratio(res, n, f"seer+sink nz={nz:g}", f"oracle nz={nz:g}")}
        for n in a.lengths for nz in a.nz}
    path.write_text(json.dumps({"meta": meta, "ratios": ratios, "windows": res}, indent=1))
    a.out.with_suffix(".md").write_text(markdown(res, meta))


if __name__ == "__main__":
    main()
