"""Result tables of ``bench_e2e_ttft.py``: per-request JSON records pooled per backend and length,
rendered as markdown (the goals and the concurrent workloads: :mod:`e2e_goals`)."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from e2e_model import ARCH_DESCRIPTIONS


def page_variant(spec: str) -> tuple[str, int | None]:
    """A backend spec with an optional KV page size: ``"FLASH_ATTN/p64"`` → ``("FLASH_ATTN", 64)``
    (served with ``--block-size 64``; a run of its own in the tables, so the page sizes of the
    two backends can be swapped in one invocation), ``"seer@0.1"`` → ``("seer@0.1", None)``."""
    base, sep, page = spec.partition("/p")
    if not sep:
        return spec, None
    if not page.isdigit() or int(page) <= 0 or int(page) % 16:
        raise ValueError(f"{spec}: the page size after /p must be a positive multiple of 16")
    return base, int(page)


def parse_backend(spec: str) -> tuple[str, float | None]:
    """``"seer@0.1"`` → ``("seer", 0.1)``; ``"FLASH_ATTN"`` → ``("FLASH_ATTN", None)``; a page
    suffix (:func:`page_variant`) is ignored here."""
    spec = page_variant(spec)[0]
    if spec.lower().startswith("seer@"):
        density = float(spec.split("@", 1)[1])
        if not 0 < density <= 1:
            raise ValueError(f"{spec}: density must be in (0, 1]")
        return "seer", density
    if spec.lower() == "seer":
        raise ValueError("name the density: seer@0.1")
    return spec, None


def length_label(n: int) -> str:
    return f"{round(n / 1024)}k" if n >= 1024 else str(n)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{backend: {label: stats}}`` pooled over every run of that backend.

    TTFT: minimum over repeats (``n`` = how many); ITL: median of the per-request medians / p90s;
    density and time shares: sums over the requests (share = Seer seconds / client TTFT)."""
    pooled: dict[str, dict[str, list[dict[str, Any]]]] = {}
    lengths: dict[str, int] = {}
    for run in runs:
        for req in run.get("requests", []):
            pooled.setdefault(run["backend"], {}).setdefault(req["label"], []).append(req)
            lengths[req["label"]] = req["length"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for backend, by_label in pooled.items():
        for label, reqs in by_label.items():
            s: dict[str, Any] = {"length": lengths[label], "n": len(reqs),
                                 "ttft_s": min(r["ttft_s"] for r in reqs)}
            itl = [r["itl_median_s"] for r in reqs if "itl_median_s" in r]
            if itl:
                s["itl_median_s"] = statistics.median(itl)
                s["itl_p90_s"] = statistics.median(r["itl_p90_s"] for r in reqs if "itl_p90_s" in r)
            vt = [r["vllm_ttft_s"] for r in reqs if "vllm_ttft_s" in r]
            if vt:
                s["vllm_ttft_s"] = min(vt)
            vi = [r["vllm_itl_s"] for r in reqs if "vllm_itl_s" in r]
            if vi:
                s["vllm_itl_s"] = statistics.median(vi)
            possible = sum(r.get("blocks_possible", 0.0) for r in reqs)
            if possible > 0:
                s["density"] = sum(r.get("blocks_computed", 0.0) for r in reqs) / possible
                ttft_sum = sum(r["ttft_s"] for r in reqs)
                s["gate_share"] = sum(r.get("gate_s", 0.0) for r in reqs) / ttft_sum
                s["attn_share"] = sum(r.get("sparse_attn_s", 0.0) for r in reqs) / ttft_sum
            s["cache_hits"] = sum(r.get("prefix_cache_hits", 0.0) for r in reqs)
            out.setdefault(backend, {})[label] = s
    return out


def _backend_order(backends: Iterable[str]) -> list[str]:
    """FLASH_ATTN, TRITON_ATTN, other dense backends, then Seer by decreasing density."""
    rank = {"FLASH_ATTN": 0, "TRITON_ATTN": 1}

    def key(b: str) -> tuple[int, float, str]:
        name, density = parse_backend(b)
        if name == "seer":
            return (3, -(density or 0.0), b)
        return (rank.get(b, 2), 0.0, b)

    return sorted(set(backends), key=key)


def common_flags(flags: list[str]) -> list[str]:
    """The server flags without ``--attention-backend X`` (what every backend's server shares)."""
    out: list[str] = []
    skip = False
    for f in flags:
        if skip:
            skip = False
        elif f == "--attention-backend":
            skip = True
        else:
            out.append(f)
    return out


def _skip_what(s: dict[str, Any]) -> str:
    return s.get("what") or f"{length_label(s['length'])} rep {s.get('repeat', 0)}"


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def render_report(runs: list[dict[str, Any]], title: str = "End-to-end TTFT and decode ITL") -> str:
    """Markdown: environment, TTFT per backend, Seer speedups / density / time shares, ITL, goals."""
    agg = aggregate(runs)
    backends = _backend_order(agg)
    dense = [b for b in backends if parse_backend(b)[0] != "seer"]
    seer = [b for b in backends if parse_backend(b)[0] == "seer"]
    length_of = {lab: s["length"] for b in agg.values() for lab, s in b.items()}
    labels = sorted(length_of, key=length_of.__getitem__)
    primary = "FLASH_ATTN" if "FLASH_ATTN" in dense else (dense[0] if dense else None)
    lines = [f"# {title}", ""]
    envs: dict[str, list[str]] = {}
    for run in runs:
        e = run.get("env", {})
        desc = (f"{e.get('gpu', '?')}; vLLM {e.get('vllm', '?')}, torch {e.get('torch', '?')}, "
                f"triton {e.get('triton', '?')}, transformers {e.get('transformers', '?')}, "
                f"vllm-seer {e.get('vllm_seer', '?')} (script {e.get('script_commit', '?')})")
        envs.setdefault(desc, []).append(f"{run['backend']} ({str(e.get('date', '?'))[:16]})")
    lines.append("Environment" + (" (runs differ: compare with care)" if len(envs) > 1 else "") + ":")
    lines += [f"- {desc}: {', '.join(which)}" for desc, which in envs.items()]
    flags = common_flags(next((r["settings"]["flags"] for r in runs if r.get("settings")), []))
    chunks = sorted({m.group(1) for r in runs for ln in r.get("server", {}).get("log_lines", [])
                     if (m := re.search(r"max_num_batched_tokens=(\d+)", ln))})
    max_tokens = next((r["settings"]["max_tokens"] for r in runs if r.get("settings")), "?")
    hits = sum(s["cache_hits"] for b in agg.values() for s in b.values())
    dry = any(r.get("settings", {}).get("dry_run") for r in runs)
    arch = next((r["settings"].get("arch", "llama31-8b") for r in runs), "llama31-8b")
    full = ARCH_DESCRIPTIONS[arch]
    model_desc = (f"CPU dry run: a 2-layer model of the same kind ({full})" if dry else full)
    lines += ["", f"Server: `vllm serve <model> {' '.join(flags)}` (+ `--attention-backend X`, or "
              "`--attention-backend seer --additional-config '{\"seer\": {\"sparsity_method\": \"nz_ratio\", "
              "\"nz_ratio\": d, ...}}'`), default chunked prefill, prefix caching on. "
              f"{model_desc}, dummy weights (`--load-format dummy`), random gates (top-k). Prompts: random "
              "token ids, unique per "
              f"request (prefix-cache hits in all: {hits:.0f}); "
              f"streaming completions, `max_tokens` {max_tokens}, `ignore_eos`. TTFT = client-side time "
              "to the first streamed token, minimum over the repeats (n); ITL = median gap between later "
              "tokens, median over the repeats."
              + (f" Prefill chunk (`max_num_batched_tokens`, server log): {', '.join(chunks)}."
                 if chunks else ""), ""]
    if backends:
        lines += _tables(agg, backends, dense, seer, labels, primary)
    else:
        lines += ["No single-request (ttft phase) measurements in these runs."]
    skipped = [(r["backend"], s) for r in runs for s in r.get("skipped", [])]
    errors = [(r["backend"], r["error"]) for r in runs if r.get("error")]
    if skipped or errors:
        lines += ["", "## Skipped / errors", ""]
        lines += [f"- {b}: skipped {_skip_what(s)}: {s['why']}" for b, s in skipped]
        lines += [f"- {b}: error: {e}" for b, e in errors]
    return "\n".join(lines) + "\n"


def _tables(agg: dict[str, dict[str, dict[str, Any]]], backends: list[str], dense: list[str],
            seer: list[str], labels: list[str], primary: str | None) -> list[str]:
    """The TTFT, Seer-detail and decode-ITL tables of :func:`render_report`."""
    lines: list[str] = []
    # TTFT per backend
    lines += ["## TTFT (s)", "", "| prompt | " + " | ".join(f"{b} (n)" for b in backends) + " |",
              "|---|" + "---|" * len(backends)]
    for lab in labels:
        cells = [f"{agg[b][lab]['ttft_s']:.3f} ({agg[b][lab]['n']})" if lab in agg[b] else "–"
                 for b in backends]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    vt = [b for b in backends if any("vllm_ttft_s" in s for s in agg[b].values())]
    if vt:
        lines += ["", "vLLM's own `vllm:time_to_first_token_seconds` (server side, min over repeats, s): "
                  + "; ".join(f"{b}: " + ", ".join(f"{lab} {agg[b][lab]['vllm_ttft_s']:.3f}"
                                                    for lab in labels if "vllm_ttft_s" in agg[b].get(lab, {}))
                              for b in vt)]
    # Seer detail
    if seer:
        head = ["prompt", "Seer", "TTFT (s)", *[f"x {b}" for b in dense], "achieved density",
                "gate share", "sparse-attn share"]
        lines += ["", "## Seer: speedup, achieved density, share of TTFT", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lab in labels:
            for b in seer:
                s = agg[b].get(lab)
                if s is None:
                    continue
                ups = [_fmt(_ratio(agg[d].get(lab, {}).get("ttft_s"), s["ttft_s"]), ".2f", "x")
                       for d in dense]
                lines.append(f"| {lab} | {b} | {s['ttft_s']:.3f} | " + " | ".join(ups) + " | "
                             f"{_fmt(s.get('density'), '.3f')} | {_fmt(s.get('gate_share'), '.1%')} | "
                             f"{_fmt(s.get('attn_share'), '.1%')} |")
        lines += ["", "Shares: Seer gate / sparse-attention seconds (CUDA events, all layers, from "
                  "`vllm:seer_gate_seconds` / `vllm:seer_sparse_attention_seconds`) over the client TTFT. "
                  "Achieved density: `vllm:seer_blocks_computed_total / vllm:seer_blocks_possible_total` "
                  "(includes the dense last query-block rows of each prefill step)."]
    # ITL
    head = ["prompt", *[f"{b} ms (p90)" for b in backends]]
    if primary:
        head += [f"{b} vs {primary}" for b in backends if b != primary]
    lines += ["", "## Decode inter-token latency", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    for lab in labels:
        cells = []
        for b in backends:
            s = agg[b].get(lab, {})
            cells.append(f"{s['itl_median_s'] * 1e3:.2f} ({s['itl_p90_s'] * 1e3:.2f})"
                         if "itl_median_s" in s else "–")
        if primary:
            p = agg[primary].get(lab, {}).get("itl_median_s")
            cells += [_fmt(_ratio(p, agg[b].get(lab, {}).get("itl_median_s")), ".3f", "x")
                      for b in backends if b != primary]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    if primary:
        lines += ["", f"Ratio = {primary} ITL / backend ITL (> 1: faster decode than {primary})."]
    vi = [b for b in backends if any("vllm_itl_s" in s for s in agg[b].values())]
    if vi:
        lines += ["", "vLLM's own `vllm:inter_token_latency_seconds` (server side, mean per request, median "
                  "over repeats, ms): " + "; ".join(
                      f"{b}: " + ", ".join(f"{lab} {agg[b][lab]['vllm_itl_s'] * 1e3:.2f}"
                                           for lab in labels if "vllm_itl_s" in agg[b].get(lab, {}))
                      for b in vi)]
    return lines

def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """The run records of result files; a missing or malformed file is refused by name."""
    runs: list[dict[str, Any]] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise SystemExit(f"result file {path}: no such file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"result file {path}: not JSON ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise SystemExit(f"result file {path}: expected an object with a list 'runs' "
                             "(written by bench_e2e_ttft.py)")
        runs += data["runs"]
    return runs
