"""Tables, goals and plots from an accuracy-suite results file (:mod:`vllm_seer.eval.suite`).

Confidence intervals: 95 % percentile bootstrap over the samples of a cell (windows for perplexity,
prompts for generation), 2000 resamples with a fixed seed; the point estimate is the plain mean.
Perplexity of a cell = mean of the per-window perplexities.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from vllm_seer.eval.report import dress_density_axes, save_figure, selector_family
from vllm_seer.eval.suite import CORPORA, DENSE_PASS

RESAMPLES = 2000
KIND_ORDER = {"dense": 0, "seer": 1, "seer+sink": 2, "ashape": 3, "vslash": 4, "oracle": 5}


def mean_ci(xs: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 % bootstrap percentiles); a single value gives a zero-width interval."""
    if not xs:
        raise ValueError("mean_ci of no samples")
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, m, m
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(xs, k=len(xs))) / len(xs) for _ in range(RESAMPLES))
    return m, means[int(0.025 * RESAMPLES)], means[int(0.975 * RESAMPLES) - 1]


def _cells(part: dict[str, Any], value: str) -> dict[tuple[str, int, str], dict[str, Any]]:
    """(corpus or task, length, selector) → mean, CI, density, n."""
    acc: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for key, v in part.items():
        group, length, _, label = key.split("|", 3)
        acc[(group, int(length), label)].append((float(v[value]), float(v["density"])))
    out = {}
    for k, vals in acc.items():
        m, lo, hi = mean_ci([x for x, _ in vals])
        out[k] = {"mean": m, "lo": lo, "hi": hi, "n": len(vals),
                  "density": sum(d for _, d in vals) / len(vals)}
    return out


def ppl_cells(results: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    return _cells(results.get("ppl", {}), "ppl")


def gen_cells(results: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    return _cells(results.get("gen", {}), "score")


def _pooled_ppl(results: dict[str, Any], length: int, label: str) -> float | None:
    """Mean perplexity over the windows of both corpora at ``length`` (None if a corpus lacks it)."""
    vals = defaultdict(list)
    for key, v in results.get("ppl", {}).items():
        corpus, n, _, lab = key.split("|", 3)
        if int(n) == length and lab == label:
            vals[corpus].append(v["ppl"])
    if set(vals) != set(CORPORA):
        return None
    xs = [x for c in CORPORA for x in vals[c]]
    return sum(xs) / len(xs)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _beats(cells: dict[tuple[str, int, str], dict[str, Any]], other: str, seer: str = "seer"
           ) -> bool | None:
    """``seer`` top-k (``seer`` or ``seer+sink``) below ``other`` at the same budget in every
    corpus/length cell (None: none)."""
    pairs = [(v["mean"], cells[(c, n, lab.replace(seer, other, 1))]["mean"])
             for (c, n, lab), v in cells.items()
             if lab.startswith(f"{seer} nz=") and (c, n, lab.replace(seer, other, 1)) in cells]
    return None if not pairs else all(s < o for s, o in pairs)


def _acc_diff(results: dict[str, Any], tasks: set[str], label: str) -> float | None:
    """(accuracy of ``label`` - dense) in points over the counted cells of ``tasks``."""
    gen = results.get("gen", {})
    excluded = set(results.get("meta", {}).get("excluded_cells", []))
    diffs = []
    for key, v in gen.items():
        task, n, sid, lab = key.split("|", 3)
        if lab != label or task not in tasks or f"{task}|{n}" in excluded:
            continue
        dense = gen.get(f"{task}|{n}|{sid}|dense")
        if dense is not None:
            diffs.append(v["score"] - dense["score"])
    return None if not diffs else 100.0 * sum(diffs) / len(diffs)


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's reported goals (ratios of pooled mean perplexities at 8k; points)."""
    from vllm_seer.eval.ruler import RULER_TASKS

    n = 8192
    cells = ppl_cells(results)
    p = lambda lab: _pooled_ppl(results, n, lab)
    return {
        "ppl_ratio_seer_to_oracle_d01_8k": _ratio(p("seer nz=0.1"), p("oracle nz=0.1")),
        "ppl_ratio_seer_to_oracle_d03_8k": _ratio(p("seer nz=0.3"), p("oracle nz=0.3")),
        "ppl_ratio_seer_to_dense_d01_8k": _ratio(p("seer nz=0.1"), p("dense")),
        "seer_beats_ashape_everywhere": _beats(cells, "ashape"),
        "seer_beats_trainingfree_everywhere": _beats(cells, "vslash"),
        "passkey_d03_minus_dense": _acc_diff(results, {"passkey"}, "seer nz=0.3"),
        "ruler_d03_minus_dense": _acc_diff(results, set(RULER_TASKS), "seer nz=0.3"),
        # the same gates with the sink block forced (setting sink_blocks 1, not upstream's rule)
        "ppl_ratio_seer_sink_to_oracle_d01_8k": _ratio(p("seer+sink nz=0.1"), p("oracle nz=0.1")),
        "ppl_ratio_seer_sink_to_oracle_d03_8k": _ratio(p("seer+sink nz=0.3"), p("oracle nz=0.3")),
        "seer_sink_beats_ashape_everywhere": _beats(cells, "ashape", "seer+sink"),
        "seer_sink_beats_trainingfree_everywhere": _beats(cells, "vslash", "seer+sink"),
        "passkey_sink_d03_minus_dense": _acc_diff(results, {"passkey"}, "seer+sink nz=0.3"),
        "ruler_sink_d03_minus_dense": _acc_diff(results, set(RULER_TASKS), "seer+sink nz=0.3"),
    }


def training_record(gates: Path) -> tuple[dict[str, Any] | None, str]:
    """The gate checkpoint's training metadata, ``(record, source)``: ``gates/train_record.json``
    (a copy of ``vllm-seer train-gates``' ``STATE/log.json``, or the older trainer's record) or a
    ``training`` object in ``gates/config.json``; ``(None, reason)`` when there is none."""
    rec = gates / "train_record.json"
    if rec.is_file():
        return json.loads(rec.read_text()), str(rec)
    cfg = gates / "config.json"
    if cfg.is_file():
        training = json.loads(cfg.read_text()).get("training")
        if isinstance(training, dict):
            return training, f"{cfg} (training)"
    return None, (f"no training metadata in {gates} (neither train_record.json nor a 'training' "
                  "object in config.json); pass --train-record (train-gates writes STATE/log.json)")


def summary(results: dict[str, Any], record: dict[str, Any] | None, record_source: str
            ) -> dict[str, Any]:
    """The ``fidelity-*.json`` object: date, device, training metadata, goals and every cell."""
    meta = results.get("meta", {})
    rec = record or {}
    return {
        "date": dt.date.today().isoformat(), "device": meta.get("device"),
        "model": meta.get("model"), "gates": meta.get("gates"), "dtype": meta.get("dtype"),
        "train_distinct_tokens": rec.get("distinct_train_tokens", rec.get("train_distinct_tokens")),
        "train_seq_len": rec.get("seq_len", rec.get("train_seq_len")),
        "train_record": record_source if record is not None else None,
        "train_record_missing_reason": None if record is not None else record_source,
        "goals": goals(results),
        "ci_method": f"95% percentile bootstrap over samples, {RESAMPLES} resamples",
        "dense_pass": DENSE_PASS, "excluded_cells": meta.get("excluded_cells", []),
        "ppl": [{"corpus": c, "length": n, "selector": lab, **v}
                for (c, n, lab), v in sorted(ppl_cells(results).items())],
        "gen": [{"task": t, "length": n, "selector": lab, **v}
                for (t, n, lab), v in sorted(gen_cells(results).items())],
        "served": results.get("served_summary"),
    }


def _order(labels: set[str]) -> list[str]:
    def key(s: str) -> tuple[int, int, float]:
        kind, _, rest = s.partition(" ")
        num = float(rest.split("=", 1)[1]) if "=" in rest else 0.0
        return KIND_ORDER.get(kind, 9), 0 if "nz=" in rest else 1, -num
    return sorted(labels, key=key)


def _fmt_goal(v: Any) -> str:
    if v is None:
        return "n/a"
    return str(v) if isinstance(v, bool) else f"{v:.4f}"


def markdown(results: dict[str, Any], summ: dict[str, Any]) -> str:
    """The report: goals, perplexity tables per corpus, generation tables (dense-passing cells)."""
    trained = (f"gates trained on {summ['train_distinct_tokens']} distinct tokens of "
               f"{summ['train_seq_len']}-token sequences ({summ['train_record']})"
               if summ["train_record"] is not None
               else f"gate training metadata unknown: {summ['train_record_missing_reason']}")
    lines = [f"# Accuracy suite: {summ.get('model')} + {summ.get('gates')}", "",
             f"Date {summ['date']}, device {summ['device']}, dtype {summ.get('dtype')}; "
             f"{trained}.", "", f"CI: {summ['ci_method']}. Top-k selectors at the same nz_ratio "
             "share one block budget (matched density); the achieved density is in parentheses.",
             "", "## Goals", "", "| goal | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt_goal(v)} |" for k, v in summ["goals"].items()]
    pc, gc = ppl_cells(results), gen_cells(results)
    for corpus in CORPORA:
        sub = {(n, lab): v for (c, n, lab), v in pc.items() if c == corpus}
        if not sub:
            continue
        lengths = sorted({n for n, _ in sub})
        lines += ["", f"## Perplexity, held-out {corpus}: mean [95% CI] (achieved density)", "",
                  "| selector | " + " | ".join(f"{n}" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for lab in _order({lab for _, lab in sub}):
            cells = [(f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] ({v['density']:.3f})"
                      if (v := sub.get((n, lab))) else "-") for n in lengths]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        ns = sorted({v["n"] for v in sub.values()})
        lines += ["", f"windows per cell: {', '.join(map(str, ns))}"]
    excluded = set(summ["excluded_cells"])
    cols = sorted({(t, n) for t, n, _ in gc})
    if cols:
        lines += ["", "## Generation tasks: accuracy % [95% CI] (achieved density), decoded text",
                  "", f"A cell counts only where dense scores >= {DENSE_PASS:.0%}; excluded cells "
                  "show the dense score and `excl.`", "",
                  "| selector | " + " | ".join(f"{t}@{n}" for t, n in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for lab in _order({lab for _, _, lab in gc}):
            cells = []
            for t, n in cols:
                v = gc.get((t, n, lab))
                if v is None:
                    cells.append("-")
                    continue
                txt = f"{100 * v['mean']:.0f} [{100 * v['lo']:.0f}, {100 * v['hi']:.0f}]"
                cells.append(f"{txt} excl." if f"{t}|{n}" in excluded
                             else f"{txt} ({v['density']:.3f})")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        ns = sorted({v["n"] for v in gc.values()})
        lines += ["", f"samples per cell: {', '.join(map(str, ns))}"]
    if "heatmap" in results:
        h = results["heatmap"]
        flat = [x for row in h["density"] for x in row]
        lines += ["", f"Per-head density of `{h['selector']}` at {h['length']} tokens "
                  f"({len(h['windows'])} windows): min {min(flat):.3f}, mean "
                  f"{sum(flat) / len(flat):.3f}, max {max(flat):.3f}."]
    if summ.get("served"):
        lines += ["", "## Served (vllm serve, Seer backend) vs offline", "",
                  "| setting | cells | max ppl rel. diff | max density diff | score agreement |",
                  "|---|---|---|---|---|"]
        for lab, v in summ["served"].items():
            lines.append(f"| {lab} | {v['cells']} | {_fmt_goal(v['max_ppl_rel_diff'])} | "
                         f"{_fmt_goal(v['max_density_diff'])} | {v['score_agree']} |")
    return "\n".join(lines) + "\n"


def plot_ppl(results: dict[str, Any], path: Path) -> None:
    """Perplexity vs achieved density: one row per corpus, one panel per length, CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pc = ppl_cells(results)
    lengths = sorted({n for _, n, _ in pc})
    fig, axes = plt.subplots(len(CORPORA), len(lengths), figsize=(4.3 * len(lengths), 3.4 * 2),
                             squeeze=False)
    for i, corpus in enumerate(CORPORA):
        for j, n in enumerate(lengths):
            ax = axes[i][j]
            fams: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
            for (c, m, lab), v in pc.items():
                if c != corpus or m != n:
                    continue
                fams[selector_family(lab)].append(
                    (v["density"], v["mean"], v["mean"] - v["lo"], v["hi"] - v["mean"]))
            for fam, pts in sorted(fams.items()):
                pts.sort()
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                err = [[p[2] for p in pts], [p[3] for p in pts]]
                if fam == "dense":
                    ax.axhline(ys[0], color="k", ls="--", lw=1, label="dense")
                else:
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=fam)
            dress_density_axes(ax, f"{corpus}, {n} tokens")
    save_figure(fig, axes, path)


def plot_heatmap(results: dict[str, Any], path: Path) -> None:
    """Per-layer x per-head density of the gates on real text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = results["heatmap"]
    grid = h["density"]  # [layers][heads]
    fig, ax = plt.subplots(figsize=(2.0 + 0.45 * len(grid[0]), 1.5 + 0.2 * len(grid)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"{h['selector']} density, {h['length']} tokens", fontsize=9)
    fig.colorbar(im, ax=ax, label="active / causal blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(results: dict[str, Any], out_dir: Path, name: str, gates: Path,
              train_record: Path | None = None) -> dict[str, Any]:
    """Write ``name.md``, ``name.json``, ``name-ppl.png`` and ``name-heatmap.png``; the summary."""
    if train_record is not None:
        record, source = json.loads(train_record.read_text()), str(train_record)
    else:
        record, source = training_record(gates)
    summ = summary(results, record, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(summ, indent=1, allow_nan=True) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(results, summ))
    if results.get("ppl"):
        plot_ppl(results, out_dir / f"{name}-ppl.png")
    if "heatmap" in results:
        plot_heatmap(results, out_dir / f"{name}-heatmap.png")
    return summ
