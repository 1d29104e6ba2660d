"""The evaluation through a real ``vllm serve`` with the Seer backend, beside the offline one.

``vllm-seer eval --served [MODEL] --gates DIR`` serves ``MODEL`` once per setting (``dense`` = vLLM's own
attention backend, ``nz=R`` / ``thr=T`` = the Seer backend with those settings) and measures, on the
same held-out windows and pass-key prompts as :mod:`vllm_seer.eval.cli`:

* perplexity from vLLM's prompt log-probabilities (completions API, ``prompt`` as token ids,
  ``prompt_logprobs: 0``, ``max_tokens: 1``);
* pass-key retrieval two ways: *teacher-forced* (prompt + answer as one prefill; success iff every
  answer token has rank 1, which is exactly the offline metric) and *greedy* (prompt only, greedy
  completion; success iff it starts with the answer tokens);
* the prefill density from the server's ``/metrics`` (blocks computed / causal blocks, all layers,
  the same definition as the offline :data:`vllm_seer.eval.sparse.STATE`).

With ``--offline`` the offline evaluation runs in-process at the same settings (fp32, CPU) and the
report puts both side by side. Comparability: the server runs fp32 (``--dtype float32``), one request
at a time, prefix caching off and ``--max-num-batched-tokens`` ≥ the longest prompt, so every prompt
is one prefill step and ``last_block_dense`` / ``nz_ratio`` mean the same as offline;
``min_prefill_tokens`` is 0 so every prefill takes the Seer path.

Entry point for the CLI: :func:`eval_served_main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_seer.testing import SeerServer, metric_sum, parse_metrics

log = logging.getLogger(__name__)
DEFAULT_GATES = Path(__file__).resolve().parent.parent / "assets" / "gates" / "smollm2-135m"


class ServedEvalError(RuntimeError):
    """The served evaluation got an answer it cannot use (missing prompt log-probs, bad setting)."""


@dataclass(frozen=True)
class Setting:
    """One served configuration: ``dense`` (vLLM's own backend) or Seer ``nz_ratio``/``threshold``."""

    kind: str  # dense | nz_ratio | threshold
    value: float = 0.0
    sink_blocks: int = 0  # Seer setting sink_blocks

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``dense``, ``nz=0.3`` or ``thr=2e-3``, optionally ``+sink=N`` (``nz=0.1+sink=1``)."""
        if text == "dense":
            return cls("dense")
        main, plus, extra = text.partition("+")
        name, _, val = main.partition("=")
        kinds = {"nz": "nz_ratio", "thr": "threshold"}
        sink = re.fullmatch(r"sink=([1-9][0-9]*)", extra, flags=re.ASCII) if plus else None
        if name not in kinds or not val or (plus and sink is None):
            raise ServedEvalError(f"setting {text!r}: expected dense, nz=R or thr=T, optionally "
                                  "followed by +sink=N (N >= 1)")
        return cls(kinds[name], float(val), int(sink.group(1)) if sink else 0)

    @property
    def label(self) -> str:
        """The offline selector's label (``dense``, ``seer nz=0.3``, ``seer thr=0.002``,
        ``seer+sink nz=0.1``)."""
        return self.selector({}, None).label

    def seer_config(self, gates: Path, min_prefill_tokens: int = 0) -> dict[str, Any] | None:
        """The ``--additional-config`` dict (``None`` for dense: vLLM's own backend)."""
        if self.kind == "dense":
            return None
        cfg = {"gates": str(gates), "sparsity_method": self.kind, self.kind: self.value,
               "last_block_dense": True, "min_prefill_tokens": min_prefill_tokens}
        if self.sink_blocks:
            cfg["sink_blocks"] = self.sink_blocks
        return {"seer": cfg}

    def selector(self, weights: dict[int, torch.Tensor], inv_freq: torch.Tensor,
                 block_size: int = 64) -> Any:
        """The offline :class:`vllm_seer.eval.sparse.Selector` with the same semantics."""
        from vllm_seer.eval.sparse import Selector

        if self.kind == "dense":
            return Selector("dense", block_size=block_size)
        kw = {"nz_ratio": self.value} if self.kind == "nz_ratio" else {"threshold": self.value}
        return Selector("seer", self.kind, block_size=block_size, weights=weights,
                        inv_freq=inv_freq, sink_blocks=self.sink_blocks, **kw)


def server_flags(max_prompt_tokens: int) -> list[str]:
    """fp32, eager, every prompt one prefill step, no prefix caching, deterministic sampling."""
    n = int(max_prompt_tokens) + 64
    return ["--enforce-eager", "--dtype", "float32", "--max-model-len", str(n),
            "--max-num-batched-tokens", str(n), "--max-num-seqs", "4",
            "--no-enable-prefix-caching", "--seed", "0"]


def _density_counters(srv: SeerServer) -> tuple[float, float]:
    samples = parse_metrics(srv.metrics_text())
    return (metric_sum(samples, "vllm:seer_blocks_computed_total"),
            metric_sum(samples, "vllm:seer_blocks_possible_total"))


class ServedSession:
    """Requests against one running server, each with the prefill density it achieved."""

    def __init__(self, srv: SeerServer, sparse: bool) -> None:
        self.srv = srv
        self.sparse = sparse

    def _measure(self, body: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
        """(first choice, prefill density from ``/metrics``; ``None`` if no Seer blocks showed)."""
        before = _density_counters(self.srv) if self.sparse else (0.0, 0.0)
        choice = self.srv.post("/v1/completions", {"model": self.srv.model_name, "temperature": 0.0,
                                                   "return_token_ids": True, **body})["choices"][0]
        if not self.sparse:
            return choice, 1.0
        after = _density_counters(self.srv)
        possible = after[1] - before[1]
        if possible <= 0:
            log.warning("no Seer blocks appeared on /metrics for this request: either the prefill "
                        "did not take the Seer path or the server's Seer metrics are broken "
                        "(server log: %s)", self.srv.log_path)
            return choice, None
        return choice, (after[0] - before[0]) / possible

    def prompt_logprobs(self, ids: list[int]) -> tuple[list[float], list[int], float | None]:
        """(log p(ids[i] | ids[:i]) and its rank for i = 1..T-1, prefill density)."""
        choice, dens = self._measure({"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})
        plp = choice.get("prompt_logprobs")
        if not plp or len(plp) != len(ids):
            raise ServedEvalError(f"expected {len(ids)} prompt log-probs, got "
                                  f"{None if plp is None else len(plp)}")
        lps, ranks = [], []
        for i in range(1, len(ids)):
            entry = plp[i].get(str(ids[i])) if plp[i] else None
            if entry is None:
                raise ServedEvalError(f"no log-prob for prompt token {ids[i]} at position {i}")
            lps.append(float(entry["logprob"]))
            ranks.append(int(entry["rank"]))
        return lps, ranks, dens

    def perplexity(self, ids: list[int]) -> tuple[float, float | None]:
        """(perplexity over positions 1..T-1, prefill density)."""
        lps, _, dens = self.prompt_logprobs(ids)
        return math.exp(-sum(lps) / len(lps)), dens

    def passkey_teacher_forced(self, ids: list[int], start: int) -> tuple[bool, float | None]:
        """Prompt + answer in one prefill: every answer token ranked first (the offline metric)."""
        _, ranks, dens = self.prompt_logprobs(ids)
        return all(r == 1 for r in ranks[start - 1:]), dens

    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], float | None]:
        """Greedy completion token ids of ``prompt`` and the prefill density."""
        choice, dens = self._measure({"prompt": prompt, "max_tokens": max_tokens})
        return list(choice.get("token_ids") or []), dens


def offline_passkey_tokens(model: Any, ids: torch.Tensor, start: int, selector: Any
                           ) -> tuple[list[int], float]:
    """Offline teacher-forced argmax tokens at the answer positions and the density."""
    from vllm_seer.eval.sparse import STATE
    from vllm_seer.eval.tasks import _logits

    STATE.reset(selector)
    logits = _logits(model, ids, slice(start - 1, ids.shape[0] - 1))
    return logits.argmax(-1).cpu().tolist(), STATE.density


def load_offline(model_dir: Path, gates: Path) -> tuple[Any, Any, Any]:
    """(fp32 CPU transformers model with the ``seer_eval`` attention, gate weights, inv_freq)."""
    from transformers import AutoModelForCausalLM

    from vllm_seer.checkpoint import load_gates
    from vllm_seer.eval.sparse import register
    from vllm_seer.rope import RopeSpec

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=register()).eval()
    ckpt = load_gates(gates)
    ckpt.check_against(num_layers=model.config.num_hidden_layers,
                       num_q_heads=model.config.num_attention_heads,
                       num_kv_heads=model.config.num_key_value_heads, head_dim=ckpt.head_dim)
    inv = RopeSpec.from_hf_config(model.config, ckpt.head_dim).inv_freq()
    weights = {i: w.to(torch.float32) for i, w in ckpt.weights.items()}
    return model, weights, inv


def run(model_dir: Path, gates: Path, settings: list[Setting], lengths: list[int], ppl_docs: int,
        depths: list[float], passkey_seeds: int, offline: bool, teacher_forced: bool = True,
        startup_timeout: float = 600.0) -> dict[str, Any]:
    """Served (and optionally offline) results for every setting; see the module docstring.

    Returns ``{"ppl": {key: {...}}, "passkey": {key: {...}}, "meta": {...}}`` with keys
    ``length|doc|label`` / ``length|depth|seed|label`` as in the offline results file.
    ``teacher_forced=False`` skips the served teacher-forced pass-key request (one prefill less).
    """
    from transformers import AutoTokenizer

    from vllm_seer.eval.cli import heldout_windows
    from vllm_seer.eval.tasks import passkey_prompt, perplexity

    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = {n: heldout_windows(tok, n, ppl_docs) for n in lengths}
    keys = {n: [(d, s, *passkey_prompt(tok, n, d, seed=s * 7919 + n + int(d * 100)))
                for d in depths for s in range(passkey_seeds)] for n in lengths}
    longest = max([ids.shape[0] for n in lengths for _, ids in docs[n]]
                  + [p[2].shape[0] for n in lengths for p in keys[n]])
    res: dict[str, Any] = {"ppl": {}, "passkey": {}}
    for st in settings:
        cfg = st.seer_config(gates)
        log.info("serving %s with %s", model_dir, st.label)
        with SeerServer(model_dir, cfg, server_flags(longest),
                        startup_timeout=startup_timeout) as srv:
            sess = ServedSession(srv, sparse=cfg is not None)
            for n in lengths:
                for name, ids in docs[n]:
                    ppl, dens = sess.perplexity(ids.tolist())
                    res["ppl"][f"{n}|{name}|{st.label}"] = {"served_ppl": ppl,
                                                             "served_density": dens}
                for depth, seed, ids, start, key in keys[n]:
                    want = ids[start:].tolist()
                    got, g_dens = sess.greedy(ids[:start].tolist(), len(want))
                    entry = {"key": key, "answer_tokens": want, "served_greedy_tokens": got,
                             "served_greedy_ok": got[:len(want)] == want,
                             "served_greedy_text": tok.decode(got),
                             "served_greedy_density": g_dens}
                    if teacher_forced:
                        tf_ok, tf_dens = sess.passkey_teacher_forced(ids.tolist(), start)
                        entry.update(served_tf_ok=tf_ok, served_tf_density=tf_dens)
                    res["passkey"][f"{n}|{depth}|{seed}|{st.label}"] = entry
    if offline:
        model, weights, inv = load_offline(model_dir, gates)
        for st in settings:
            sel = st.selector(weights, inv)
            for n in lengths:
                for name, ids in docs[n]:
                    ppl, dens = perplexity(model, ids, sel)
                    res["ppl"][f"{n}|{name}|{st.label}"].update(offline_ppl=ppl,
                                                                 offline_density=dens)
                for depth, seed, ids, start, _ in keys[n]:
                    pred, dens = offline_passkey_tokens(model, ids, start, sel)
                    res["passkey"][f"{n}|{depth}|{seed}|{st.label}"].update(
                        offline_ok=pred == ids[start:].tolist(), offline_tokens=pred,
                        offline_text=tok.decode(pred), offline_density=dens)
    res["meta"] = {"model": str(model_dir), "gates": str(gates), "dtype": "float32",
                   "settings": [s.label for s in settings], "lengths": lengths,
                   "ppl_docs": ppl_docs, "depths": depths, "passkey_seeds": passkey_seeds,
                   "server_flags": server_flags(longest), "min_prefill_tokens": 0}
    return res


def _ok(v: bool | None) -> str:
    return "-" if v is None else ("ok" if v else "miss")


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(res: dict[str, Any]) -> str:
    """Per-document perplexity and per-prompt pass-key tables, served beside offline."""
    lines = ["### Perplexity per held-out window (served = vLLM prompt log-probs)", "",
             "| length | document | setting | served ppl | offline ppl | rel. diff | "
             "served density | offline density |", "|---|---|---|---|---|---|---|---|"]
    for key, v in res["ppl"].items():
        n, doc, label = key.split("|", 2)
        off = v.get("offline_ppl")
        rel = None if off is None else abs(v["served_ppl"] - off) / off
        lines.append(f"| {n} | `{doc}` | {label} | {v['served_ppl']:.6f} | {_f(off, '.6f')} | "
                     f"{_f(rel, '.1e')} | {_f(v['served_density'], '.6f')} | "
                     f"{_f(v.get('offline_density'), '.6f')} |")
    lines += ["", "### Pass-key retrieval per prompt (teacher-forced = prompt + answer in one "
              "prefill, answer tokens argmax; greedy = served completion of the prompt)", "",
              "| length | depth | seed | setting | key | offline teacher-forced | served "
              "teacher-forced | served greedy | offline density | served density (tf / greedy) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in res["passkey"].items():
        n, depth, seed, label = key.split("|", 3)
        lines.append(
            f"| {n} | {depth} | {seed} | {label} | {v['key']} | "
            f"`{v.get('offline_text', '').strip()}` ({_ok(v.get('offline_ok'))}) | "
            f"{_ok(v.get('served_tf_ok'))} | `{v['served_greedy_text'].strip()}` "
            f"({_ok(v['served_greedy_ok'])}) | {_f(v.get('offline_density'), '.6f')} | "
            f"{_f(v.get('served_tf_density'), '.6f')} / {_f(v['served_greedy_density'], '.6f')} |")
    return "\n".join(lines) + "\n"


def eval_served_main(argv: list[str] | None = None) -> int:
    """``vllm-seer eval --served``; returns the exit status."""
    p = argparse.ArgumentParser(prog="vllm-seer eval --served", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None,
                   help="local HF model folder (default: the prepared SmolLM2)")
    p.add_argument("--gates", type=Path, default=DEFAULT_GATES)
    p.add_argument("--settings", nargs="+", default=["dense", "nz=0.3"],
                   help="dense, nz=R, thr=T, optionally +sink=N (one server each)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048])
    p.add_argument("--ppl-docs", type=int, default=2)
    p.add_argument("--depths", type=float, nargs="+", default=[0.5])
    p.add_argument("--passkey-seeds", type=int, default=1)
    p.add_argument("--offline", action="store_true", help="also run the offline eval (fp32 CPU)")
    p.add_argument("--results", type=Path, default=Path("eval-served.json"))
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="server start-up timeout (s)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = [Setting.parse(s) for s in a.settings]
    except ServedEvalError as e:
        p.error(str(e))
    if a.model is None:
        from vllm_seer.train.prepare_model import default_model_dir, is_prepared

        model_dir = default_model_dir()
        if not is_prepared(model_dir):
            log.error("no model given and %s is not prepared: run `vllm-seer prepare-model`",
                      model_dir)
            return 2
    else:
        model_dir = Path(a.model)
    res = run(model_dir, a.gates, settings, a.lengths, a.ppl_docs, a.depths, a.passkey_seeds,
              a.offline, a.timeout)
    a.results.write_text(json.dumps(res, indent=1))
    if a.md is not None:
        a.md.write_text(markdown(res))
    return 0
