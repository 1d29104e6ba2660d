"""``vllm-seer eval MODEL --gates DIR``: accuracy of Seer vs dense, A-shape, oracle, vertical-slash.

Runs held-out perplexity and pass-key retrieval at several lengths for every selector in
:func:`default_selectors`, stores results incrementally in a JSON file (re-running skips what is
done), then writes a markdown report and a perplexity-vs-density plot.

Entry point for the CLI: :func:`eval_main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_seer.checkpoint import load_gates
from vllm_seer.eval.report import write_report
from vllm_seer.eval.sparse import Selector, register
from vllm_seer.eval.tasks import passkey, perplexity
from vllm_seer.rope import RopeSpec
from vllm_seer.train.data import document_windows, list_documents

log = logging.getLogger(__name__)
DEFAULT_GATES = Path(__file__).resolve().parent.parent / "assets" / "gates" / "smollm2-135m"
NZ_RATIOS = (0.5, 0.3, 0.1)
THRESHOLDS = (5e-4, 2e-3)


def default_selectors(weights: dict[int, torch.Tensor], inv_freq: torch.Tensor,
                      block_size: int = 64) -> list[Selector]:
    """dense; Seer at nz_ratio 0.5/0.3/0.1 and threshold 5e-4/2e-3; A-shape, oracle top-k and
    MInference vertical-slash at the same nz_ratios."""
    sels = [Selector("dense", block_size=block_size)]
    for r in NZ_RATIOS:
        sels.append(Selector("seer", "nz_ratio", nz_ratio=r, block_size=block_size,
                             weights=weights, inv_freq=inv_freq))
    for th in THRESHOLDS:
        sels.append(Selector("seer", "threshold", threshold=th, block_size=block_size,
                             weights=weights, inv_freq=inv_freq))
    for kind in ("ashape", "oracle", "vslash"):
        sels += [Selector(kind, "nz_ratio", nz_ratio=r, block_size=block_size) for r in NZ_RATIOS]
    return sels


def heldout_windows(tok: Any, length: int, count: int, root: Path | None = None,
                    suffixes: tuple[str, ...] = (".py",)) -> list[tuple[str, torch.Tensor]]:
    """The first ``length`` tokens of the first ``count`` long-enough held-out documents (of the
    stdlib code corpus, or of ``root`` with ``suffixes``, e.g. the prose corpus)."""
    out = []
    for doc in list_documents("heldout", root=root, min_bytes=length * 2, suffixes=suffixes):
        w = document_windows(tok, doc, length, max_windows=1)
        if w:
            out.append((doc.name, w[0]))
        if len(out) == count:
            break
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-seer eval", description=__doc__.split("\n")[0])
    p.add_argument("model", help="local HF model folder")
    p.add_argument("--gates", type=Path, default=DEFAULT_GATES)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--ppl-docs", type=int, default=4)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--passkey-seeds", type=int, default=2)
    p.add_argument("--results", type=Path, default=Path("eval-results.json"))
    p.add_argument("--md", type=Path, default=None, help="markdown report to write")
    p.add_argument("--plot", type=Path, default=None, help="png plot to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-passkey", action="store_true")
    p.add_argument("--served", action="store_true",
                   help="evaluate through a real vLLM server instead (see `eval --served --help`)")
    return p.parse_args(argv)


def eval_main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status. ``--served`` runs :mod:`vllm_seer.eval.served` instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--served" in argv:
        from vllm_seer.eval.served import eval_served_main

        argv.remove("--served")
        return eval_served_main(argv)
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype,
                                                 attn_implementation=register())
    model = model.to(device).eval()
    ckpt = load_gates(a.gates)
    hd = ckpt.head_dim
    ckpt.check_against(num_layers=model.config.num_hidden_layers,
                       num_q_heads=model.config.num_attention_heads,
                       num_kv_heads=model.config.num_key_value_heads, head_dim=hd)
    inv = RopeSpec.from_hf_config(model.config, hd).inv_freq().to(device)
    weights = {i: w.to(device, torch.float32) for i, w in ckpt.weights.items()}
    sels = default_selectors(weights, inv, ckpt.block_size)
    results: dict[str, Any] = json.loads(a.results.read_text()) if a.results.is_file() else {}
    results.setdefault("ppl", {})
    results.setdefault("passkey", {})
    for length in a.lengths:
        docs = heldout_windows(tok, length, a.ppl_docs)
        for name, ids in tqdm(docs, desc=f"ppl@{length}"):
            for sel in sels:
                key = f"{length}|{name}|{sel.label}"
                if key not in results["ppl"]:
                    ppl, dens = perplexity(model, ids, sel)
                    results["ppl"][key] = {"ppl": ppl, "density": dens}
            a.results.write_text(json.dumps(results, indent=1))
    for length in [] if a.skip_passkey else a.lengths:
        for depth in tqdm(a.depths, desc=f"passkey@{length}"):
            for seed in range(a.passkey_seeds):
                for sel in sels:
                    key = f"{length}|{depth}|{seed}|{sel.label}"
                    if key not in results["passkey"]:
                        ok, dens = passkey(model, tok, length, depth, sel,
                                           seed=seed * 7919 + length + int(depth * 100))
                        results["passkey"][key] = {"ok": ok, "density": dens}
            a.results.write_text(json.dumps(results, indent=1))
    results["meta"] = {"model": str(a.model), "gates": str(a.gates), "device": str(device),
                       "dtype": str(dtype), "ppl_docs": a.ppl_docs, "depths": a.depths,
                       "passkey_seeds": a.passkey_seeds}
    a.results.write_text(json.dumps(results, indent=1))
    if a.md is not None or a.plot is not None:
        write_report(results, a.md, a.plot)
    return 0
