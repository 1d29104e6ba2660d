"""Pass-key and RULER-style retrieval at 4k on the CPU: dense vs Seer (with and without the sink).

The accuracy suite's generation cells (:class:`vllm_seer.eval.suite.Suite.run_gen`: dense first,
sparse selectors only on the task/length cells dense passes, answers scored on the decoded text)
at a size a 2-core CPU finishes in well under an hour: SmolLM2-135M-Instruct (``vllm-seer
prepare-model``) in fp32 with the committed distilled gates, one length, the pass key at
``--depths`` relative depths x ``--seeds`` seeds and ``--ruler-samples`` samples of each RULER-style
task; selectors ``dense``, ``seer nz=R`` and ``seer+sink nz=R`` (setting ``sink_blocks`` 1). The
full suite (2k / 4k / 8k, 3 seeds, 10 samples, every selector) is the GPU run of
``scripts/fidelity_gpu.sh``; this is the CPU measurement of its two retrieval goals
(``passkey_d03_minus_dense``, ``ruler_d03_minus_dense``) at one length.

Usage (the numbers in ``benchmarks/results/retrieval-cpu-4k.md``)::

    .venv/bin/python benchmarks/retrieval_cpu.py --length 4096 --nz 0.3 \\
        --out benchmarks/results/retrieval-cpu-4k

Resumable: the raw results (``OUT-raw.json``) keep every finished sample.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from vllm_seer.eval.ruler import RULER_TASKS
from vllm_seer.eval.served import DEFAULT_GATES
from vllm_seer.eval.sparse import Selector
from vllm_seer.eval.suite import Suite, SuiteSize
from vllm_seer.eval.suite_cli import load
from vllm_seer.eval.suite_report import _acc_diff, gen_cells
from vllm_seer.train.prepare_model import prepare_model


def size(length: int, depths: int, seeds: int, samples: int, nz: float) -> SuiteSize:
    """Generation cells only (no perplexity windows, no heatmap)."""
    return SuiteSize((), 0, (length,), tuple(round(i / (depths - 1), 3) for i in range(depths)),
                     seeds, (length,), samples, RULER_TASKS, (nz,), (), length, 0)


def markdown(results: dict, meta: dict, labels: list[str]) -> str:
    cells = gen_cells(results)
    excluded = set(results["meta"].get("excluded_cells", []))
    lines = [f"# Retrieval at {meta['length']} tokens on the CPU, {meta['date']}", "",
             f"`benchmarks/retrieval_cpu.py`; {meta['device']}, torch {meta['torch']}, fp32; "
             f"SmolLM2-135M-Instruct, gates `{meta['gates']}`. Mean score (95 % bootstrap "
             "interval, n samples; achieved prefill density). Sparse selectors run only where "
             f"dense scores >= {results['meta']['dense_pass']} (excluded: "
             f"{', '.join(sorted(excluded)) or 'none'}).", "",
             "| task | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for task in ("passkey", *RULER_TASKS):
        row = []
        for lab in labels:
            c = cells.get((task, meta["length"], lab))
            row.append("–" if c is None else
                       f"{c['mean']:.2f} ({c['lo']:.2f}-{c['hi']:.2f}, n {c['n']}; "
                       f"{c['density']:.3f})")
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    lines += ["", "| selector | pass key - dense (points) | RULER-style - dense (points) |",
              "|---|---|---|"]
    for lab in labels[1:]:
        pk = meta["diffs"][lab]["passkey"]
        ru = meta["diffs"][lab]["ruler"]
        fmt = lambda x: "n/a" if x is None else f"{x:+.1f}"  # noqa: E731
        lines.append(f"| {lab} | {fmt(pk)} | {fmt(ru)} |")
    lines += ["", "(differences: mean over the counted samples of selector score - dense score on "
              "the same prompt, in points)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--nz", type=float, default=0.3)
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ruler-samples", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="prefix of OUT.md / OUT.json")
    a = ap.parse_args()
    if a.depths < 2:
        ap.error("--depths must be at least 2 (0 and 1 are always among them)")
    model, tok, weights, inv, bs = load(prepare_model(), DEFAULT_GATES, torch.device("cpu"),
                                        torch.float32)
    sels = [Selector("dense", block_size=bs),
            Selector("seer", "nz_ratio", nz_ratio=a.nz, block_size=bs, weights=weights,
                     inv_freq=inv),
            Selector("seer", "nz_ratio", nz_ratio=a.nz, block_size=bs, weights=weights,
                     inv_freq=inv, sink_blocks=1)]
    raw = a.out.parent / f"{a.out.name}-raw.json"
    gates = str(DEFAULT_GATES.relative_to(Path.cwd())) if DEFAULT_GATES.is_relative_to(
        Path.cwd()) else str(DEFAULT_GATES)
    suite = Suite(model, tok, sels, size(a.length, a.depths, a.seeds, a.ruler_samples, a.nz), raw,
                  meta={"gates": gates, "device": "cpu", "dtype": "float32"})
    suite.run_gen()
    labels = [s.label for s in sels]
    diffs = {lab: {"passkey": _acc_diff(suite.results, {"passkey"}, lab),
                   "ruler": _acc_diff(suite.results, set(RULER_TASKS), lab)}
             for lab in labels[1:]}
    meta = {"date": datetime.date.today().isoformat(),
            "device": f"cpu ({platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "gates": gates, "length": a.length,
            "nz": a.nz, "depths": a.depths, "seeds": a.seeds, "ruler_samples": a.ruler_samples,
            "dense_pass": suite.results["meta"]["dense_pass"],
            "excluded_cells": suite.results["meta"].get("excluded_cells", []), "diffs": diffs}
    cells = {f"{t}|{n}|{lab}": v for (t, n, lab), v in gen_cells(suite.results).items()}
    a.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    a.out.with_suffix(".md").write_text(markdown(suite.results, meta, labels))


if __name__ == "__main__":
    main()
