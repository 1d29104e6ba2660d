"""The issue's goals from ``bench_e2e_ttft.py`` records: ratios to FLASH_ATTN in the same runs.

:func:`summary` gives the JSON written to ``benchmarks/results/e2e-ttft-<device>.json``::

    {"device", "date", "versions", "mode", "goals": {key: value or null}, "targets", "met",
     "details": {"first_request_penalty", "crossover", "densities", ...}}

Every ``*_x`` goal is FLASH_ATTN's figure over Seer's (> 1: Seer better) except the throughputs,
which are Seer's over FLASH_ATTN's (> 1: Seer better too); ``first_request_penalty`` is the TTFT of
the first 128k request of a Seer server over that of the second (same length, same server).
"""

from __future__ import annotations

from typing import Any

from e2e_report import aggregate, parse_backend

GOAL_DENSITY = 0.1
SEER = f"seer@{GOAL_DENSITY}"
# key: (target, True when higher is better, description)
TARGETS: dict[str, tuple[float, bool, str]] = {
    "ttft_x_d01_128k": (2.4, True, "TTFT ≥ 2.4x FLASH_ATTN at 128k, density 0.1"),
    "ttft_x_d01_64k": (1.6, True, "TTFT ≥ 1.6x FLASH_ATTN at 64k, density 0.1"),
    "ttft_x_d01_32k": (1.35, True, "TTFT ≥ 1.35x FLASH_ATTN at 32k, density 0.1"),
    "ttft_x_d01_16k": (1.1, True, "TTFT ≥ 1.1x FLASH_ATTN at 16k, density 0.1"),
    "itl_x_batch1_32k": (0.99, True, "decode ITL ≥ 0.99x FLASH_ATTN at 32k, batch 1"),
    "itl_x_batch32_32k": (0.99, True, "decode ITL ≥ 0.99x FLASH_ATTN at 32k, 32 streams"),
    "short_throughput_x": (1.0, True, "short-request throughput ≥ 1.0x FLASH_ATTN"),
    "mixed_throughput_x": (1.0, True, "mixed-load request throughput ≥ 1.0x FLASH_ATTN"),
    "first_request_penalty": (1.05, False, "first / second 128k TTFT ≤ 1.05 (Seer, density 0.1)"),
}
VERSION_KEYS = ("vllm", "torch", "triton", "transformers", "vllm_seer", "script_commit")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def first_request_penalty(runs: list[dict[str, Any]], backend: str,
                          label: str = "128k") -> float | None:
    """TTFT of the first ``label`` request of a server over the second's (the lowest ratio over
    that backend's runs with both; ``None`` when none has two)."""
    out = []
    for run in runs:
        if run.get("backend") != backend:
            continue
        reqs = sorted((r for r in run.get("requests", []) if r["label"] == label),
                      key=lambda r: r["repeat"])
        if len(reqs) >= 2:
            out.append(reqs[0]["ttft_s"] / reqs[1]["ttft_s"])
    return min(out) if out else None


def workload(runs: list[dict[str, Any]], backend: str, name: str) -> dict[str, Any] | None:
    """The last recorded ``name`` workload summary of ``backend`` (``batch``, ``short``, ``mixed``)."""
    found = [r["workloads"][name] for r in runs
             if r.get("backend") == backend and name in r.get("workloads", {})]
    return found[-1] if found else None


def _stream_itl(w: dict[str, Any] | None) -> float | None:
    if w is None:
        return None
    return w.get("classes", {}).get("stream", {}).get("itl_s", {}).get("p50")


def _throughput(w: dict[str, Any] | None) -> float | None:
    return None if w is None else w.get("requests_per_s")


def crossover(runs: list[dict[str, Any]]) -> dict[str, int | None]:
    """Per Seer backend: the shortest swept prompt length from which Seer's TTFT is at most
    FLASH_ATTN's at that and every longer swept length (``None``: never)."""
    def best(backend: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for run in runs:
            if run.get("backend") == backend:
                for r in run.get("sweep", []):
                    out[r["length"]] = min(out.get(r["length"], float("inf")), r["ttft_s"])
        return out

    fa = best("FLASH_ATTN")
    res: dict[str, int | None] = {}
    for b in sorted({r["backend"] for r in runs if parse_backend(r["backend"])[0] == "seer"}):
        seer = best(b)
        lengths = sorted(set(seer) & set(fa))
        if not lengths:
            continue
        at: int | None = None
        for n in reversed(lengths):
            if seer[n] > fa[n]:
                break
            at = n
        res[b] = at
    return res


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals JSON of a set of runs (see the module docstring)."""
    agg = aggregate(runs)
    fa, seer = agg.get("FLASH_ATTN", {}), agg.get(SEER, {})
    goals: dict[str, float | None] = {}
    for label in ("128k", "64k", "32k", "16k"):
        goals[f"ttft_x_d01_{label}"] = _ratio(fa.get(label, {}).get("ttft_s"),
                                              seer.get(label, {}).get("ttft_s"))
    goals["itl_x_batch1_32k"] = _ratio(fa.get("32k", {}).get("itl_median_s"),
                                       seer.get("32k", {}).get("itl_median_s"))
    goals["itl_x_batch32_32k"] = _ratio(_stream_itl(workload(runs, "FLASH_ATTN", "batch")),
                                        _stream_itl(workload(runs, SEER, "batch")))
    goals["short_throughput_x"] = _ratio(_throughput(workload(runs, SEER, "short")),
                                         _throughput(workload(runs, "FLASH_ATTN", "short")))
    goals["mixed_throughput_x"] = _ratio(_throughput(workload(runs, SEER, "mixed")),
                                         _throughput(workload(runs, "FLASH_ATTN", "mixed")))
    goals["first_request_penalty"] = first_request_penalty(runs, SEER)
    met = {k: None if v is None else (v >= TARGETS[k][0] if TARGETS[k][1] else v <= TARGETS[k][0])
           for k, v in goals.items()}
    envs = [r.get("env", {}) for r in runs]
    modes = sorted({r.get("settings", {}).get("mode", "eager") for r in runs})
    backends = sorted({r["backend"] for r in runs})
    return {
        "device": next((e["gpu"] for e in envs if e.get("gpu")), "unknown"),
        "date": max((str(e.get("date", "")) for e in envs), default="")[:10],
        "versions": {k: sorted({str(e[k]) for e in envs if k in e}) for k in VERSION_KEYS},
        "mode": modes[0] if len(modes) == 1 else "mixed: " + ",".join(modes),
        "goals": goals,
        "targets": {k: {"value": t, "higher_is_better": hi} for k, (t, hi, _) in TARGETS.items()},
        "met": met,
        "details": {
            "first_request_penalty": {b: first_request_penalty(runs, b) for b in backends},
            "crossover": crossover(runs),
            "densities": {b: {lab: s.get("density") for lab, s in agg[b].items()}
                          for b in agg if parse_backend(b)[0] == "seer"},
            "never_slower": _never_slower(agg),
        },
    }


def _never_slower(agg: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The worst Seer TTFT ratio to FLASH_ATTN over every density and length (goal: ≥ 1.0)."""
    fa = agg.get("FLASH_ATTN", {})
    ratios = [(fa[lab]["ttft_s"] / s["ttft_s"], b, lab) for b in agg
              if parse_backend(b)[0] == "seer" for lab, s in agg[b].items() if lab in fa]
    if not ratios:
        return None
    worst = min(ratios)
    return {"ratio": worst[0], "backend": worst[1], "length": worst[2]}


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e3:.1f}"


def workloads_markdown(runs: list[dict[str, Any]]) -> str:
    """Markdown of the concurrent workloads (batch / short / mixed), the first-request TTFTs and
    the short-prompt sweep; empty when none was measured."""
    lines: list[str] = []
    backends = sorted({r["backend"] for r in runs}, key=lambda b: (b != "FLASH_ATTN", b))
    rows = []
    for b in backends:
        for name in ("batch", "short", "mixed"):
            w = workload(runs, b, name)
            if w is None:
                continue
            for cls, c in w["classes"].items():
                rows.append(f"| {name} | {b} | {cls} ({c['n']}) | {w['completed']}/{w['requests']} | "
                            f"{w['requests_per_s']:.2f} | {w['output_tokens_per_s']:.0f} | "
                            f"{c['ttft_s'].get('p50', 0):.3f} / {c['ttft_s'].get('p90', 0):.3f} / "
                            f"{c['ttft_s'].get('p99', 0):.3f} | {_ms(c['itl_s'].get('p50'))} / "
                            f"{_ms(c['itl_s'].get('p90'))} / {_ms(c['itl_s'].get('p99'))} |")
    if rows:
        lines += ["", "## Concurrent workloads", "",
                  "batch: streams decoding together on long contexts (shared prefix, unique tails); "
                  "short: short requests sent at once; mixed: short requests at Poisson arrivals with "
                  "long prompts among them. Throughput = completed requests (output tokens) / time from "
                  "the first send to the last completion.", "",
                  "| workload | backend | class (n) | completed | req/s | output tok/s | "
                  "TTFT p50 / p90 / p99 (s) | ITL p50 / p90 / p99 (ms) |",
                  "|---|---|---|---|---|---|---|---|", *rows]
    first = [(b, r["warmup"], first_request_penalty(runs, b)) for b in backends for r in runs
             if r.get("backend") == b and "warmup" in r]
    if first:
        lines += ["", "## First requests", "", "| backend | warm-up request: tokens, TTFT (s) | "
                  "128k first / second TTFT |", "|---|---|---|"]
        lines += [f"| {b} | {w['tokens']}, {w['ttft_s']:.3f} | "
                  f"{'–' if p is None else f'{p:.3f}'} |" for b, w, p in first]
    sweep: dict[str, dict[int, float]] = {b: {} for b in backends}  # min TTFT over repeats
    for r in runs:
        for x in r.get("sweep", []):
            got = sweep[r["backend"]]
            got[x["length"]] = min(got.get(x["length"], float("inf")), x["ttft_s"])
    lengths = sorted({n for v in sweep.values() for n in v})
    if lengths:
        cross = crossover(runs)
        shown = [b for b in backends if sweep[b]]
        lines += ["", "## Short-prompt sweep (TTFT, s; min over repeats)", "",
                  "| prompt | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        lines += [f"| {n} | " + " | ".join(f"{sweep[b][n]:.4f}" if n in sweep[b] else "–"
                                           for b in shown) + " |" for n in lengths]
        lines += ["", "Crossover (shortest swept length from which Seer is never slower than "
                  "FLASH_ATTN): " + (", ".join(f"{b}: {v if v is not None else 'never'}"
                                               for b, v in cross.items()) or "–")]
    return "\n".join(lines) + ("\n" if lines else "")


def _value(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def goals_markdown(s: dict[str, Any]) -> str:
    """Markdown of :func:`summary`: the goals table (reported, not asserted)."""
    lines = ["", f"## Goals (issue 12; {s['mode']} mode; reported, not asserted)", "",
             "| goal | key | measured | status |", "|---|---|---|---|"]
    for key, (_, _, desc) in TARGETS.items():
        met = s["met"][key]
        status = "not measured" if met is None else ("met" if met else "missed")
        lines.append(f"| {desc} | `{key}` | {_value(s['goals'][key])} | {status} |")
    never = s["details"]["never_slower"]
    if never is not None:
        lines.append(f"| Seer TTFT never below 1.0x FLASH_ATTN (every density, length) | – | worst "
                     f"{never['ratio']:.3f} ({never['backend']} at {never['length']}) | "
                     f"{'met' if never['ratio'] >= 1.0 else 'missed'} |")
    return "\n".join(lines) + "\n"
