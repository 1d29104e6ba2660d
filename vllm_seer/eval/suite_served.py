"""The accuracy suite through a real ``vllm serve`` with the Seer backend, beside the offline run.

For each served :class:`vllm_seer.eval.served.Setting` (``dense`` = vLLM's own backend, ``nz=R`` /
``thr=T`` = Seer) one server runs the suite's cells: perplexity from prompt log-probabilities and
every pass-key / RULER-style sample as a greedy completion of the prompt token ids, scored on the
decoded text exactly like the offline run; the prefill density comes from ``/metrics``. The server
settings of :func:`vllm_seer.eval.served.server_flags` (one prefill step per prompt, no prefix
cache, ``min_prefill_tokens`` 0) make its cells comparable with the offline ones of the same label.

Results go to ``results["served"]["ppl" | "gen"]`` under the offline keys, so a re-run skips what
is done; :func:`compare` sets ``results["served_summary"]``: per setting, how far served and offline
are apart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_seer.eval.ruler import score
from vllm_seer.eval.served import ServedSession, Setting, server_flags
from vllm_seer.eval.suite import CORPORA, Suite, corpus_windows, gen_samples
from vllm_seer.testing import SeerServer

log = logging.getLogger(__name__)


def run_served(suite: Suite, model_dir: Path, gates: Path, settings: list[Setting],
               dtype: str = "float32", startup_timeout: float = 600.0) -> None:
    """Fill ``suite.results["served"]`` for every setting (see the module docstring)."""
    s = suite.size
    tok = suite.tok
    windows = {(c, n): corpus_windows(tok, c, n, s.ppl_windows)
               for c in CORPORA for n in s.ppl_lengths}
    samples = gen_samples(tok, s)
    excluded = set(suite.results.get("meta", {}).get("excluded_cells", []))
    longest = max([len(x.prompt) + x.max_new_tokens for x in samples]
                  + [int(ids.shape[0]) for w in windows.values() for _, ids in w])
    flags = server_flags(longest)
    flags[flags.index("--dtype") + 1] = dtype
    served = suite.results.setdefault("served", {"ppl": {}, "gen": {}})
    suite.results["meta"]["served_flags"] = flags
    for st in settings:
        ppl_todo = [(f"{c}|{n}|{wid}|{st.label}", ids) for (c, n), w in windows.items()
                    for wid, ids in w if f"{c}|{n}|{wid}|{st.label}" not in served["ppl"]]
        gen_todo = [x for x in samples if f"{x.key}|{st.label}" not in served["gen"]
                    and (st.kind == "dense" or f"{x.task}|{x.length}" not in excluded)]
        if not ppl_todo and not gen_todo:
            continue
        cfg = st.seer_config(gates)
        log.info("serving %s with %s", model_dir, st.label)
        # an 8192-token window + the one generated token exceeds SmolLM2's 8192 positions: let
        # --max-model-len go past it (the extra position only feeds the unused generated token)
        with SeerServer(model_dir, cfg, flags, startup_timeout=startup_timeout,
                        env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}) as srv:
            sess = ServedSession(srv, sparse=cfg is not None)
            for key, ids in tqdm(ppl_todo, desc=f"served ppl {st.label}"):
                ppl, dens = sess.perplexity(ids.tolist())
                served["ppl"][key] = {"ppl": ppl, "density": dens}
            suite.save()
            for x in tqdm(gen_todo, desc=f"served generation {st.label}"):
                toks, dens = sess.greedy(list(x.prompt), x.max_new_tokens)
                text = tok.decode(toks, skip_special_tokens=True)
                served["gen"][f"{x.key}|{st.label}"] = {
                    "text": text, "tokens": toks, "score": score(x.task, text, x.answers),
                    "density": dens}
                suite.save()
    compare(suite.results)
    suite.save()


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """Per served setting: cells, max perplexity relative difference, max density difference,
    and how many generation cells score the same / decode to the same text as offline."""
    served = results.get("served", {})
    out: dict[str, Any] = {}
    for part in ("ppl", "gen"):
        for key, v in served.get(part, {}).items():
            label = key.rsplit("|", 1)[1]
            off = results.get(part, {}).get(key)
            o = out.setdefault(label, {"cells": 0, "max_ppl_rel_diff": None,
                                       "max_density_diff": None, "gen": 0, "same_score": 0,
                                       "same_text": 0})
            o["cells"] += 1
            if off is None:
                continue
            if v.get("density") is not None:
                d = abs(v["density"] - off["density"])
                o["max_density_diff"] = max(o["max_density_diff"] or 0.0, d)
            if part == "ppl":
                r = abs(v["ppl"] - off["ppl"]) / off["ppl"]
                o["max_ppl_rel_diff"] = max(o["max_ppl_rel_diff"] or 0.0, r)
            else:
                o["gen"] += 1
                o["same_score"] += v["score"] == off["score"]
                o["same_text"] += v["text"].strip() == off["text"].strip()
    for o in out.values():
        o["score_agree"] = f"{o['same_score']}/{o['gen']} scores, {o['same_text']}/{o['gen']} texts"
    results["served_summary"] = out
    return out
