"""Markdown tables and the perplexity-vs-density plot from an eval results JSON."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def aggregate_ppl(results: dict[str, Any]) -> dict[tuple[int, str], tuple[float, float, int]]:
    """(length, selector) → (geometric-mean perplexity over documents, mean density, #docs)."""
    acc: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for key, v in results.get("ppl", {}).items():
        length, _, label = key.split("|", 2)
        acc[(int(length), label)].append((math.log(v["ppl"]), v["density"]))
    return {k: (math.exp(sum(x for x, _ in v) / len(v)), sum(d for _, d in v) / len(v), len(v))
            for k, v in acc.items()}


def aggregate_passkey(results: dict[str, Any]) -> dict[tuple[int, str], tuple[float, float, int]]:
    """(length, selector) → (accuracy, mean density, #prompts)."""
    acc: dict[tuple[int, str], list[tuple[bool, float]]] = defaultdict(list)
    for key, v in results.get("passkey", {}).items():
        length, _, _, label = key.split("|", 3)
        acc[(int(length), label)].append((v["ok"], v["density"]))
    return {k: (sum(o for o, _ in v) / len(v), sum(d for _, d in v) / len(v), len(v))
            for k, v in acc.items()}


def _labels(keys: list[tuple[int, str]]) -> list[str]:
    order = {"dense": 0, "seer": 1, "ashape": 2, "vslash": 3, "oracle": 4}
    labels = sorted({lab for _, lab in keys},
                    key=lambda s: (order.get(s.split()[0], 9), s.split()[-1][:3], s))
    return labels


def markdown(results: dict[str, Any]) -> str:
    """Two tables: perplexity (density) and pass-key accuracy (density) per length."""
    lines: list[str] = []
    for title, agg, fmt in (("Held-out perplexity", aggregate_ppl(results), "{:.3f}"),
                            ("Pass-key retrieval accuracy", aggregate_passkey(results),
                             "{:.0%}")):
        if not agg:
            continue
        lengths = sorted({n for n, _ in agg})
        lines += [f"### {title} (achieved density in parentheses)", "",
                  "| selector | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for lab in _labels(list(agg)):
            cells = []
            for n in lengths:
                v = agg.get((n, lab))
                cells.append("-" if v is None else f"{fmt.format(v[0])} ({v[1]:.2f})")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        counts = sorted({v[2] for v in agg.values()})
        lines += ["", f"(samples per cell: {', '.join(map(str, counts))})", ""]
    return "\n".join(lines)


def selector_family(label: str) -> str:
    """The line a selector's result goes on in a perplexity-vs-density plot: ``"dense"``, or
    its name and kind, e.g. ``"seer top-k"`` (``nz=`` settings) or ``"seer threshold"``."""
    if label == "dense":
        return "dense"
    return f"{label.split()[0]} {'top-k' if 'nz=' in label else 'threshold'}"


def dress_density_axes(ax: Any, title: str) -> None:
    """Title, axis labels and grid of one perplexity-vs-achieved-density panel."""
    ax.set_title(title)
    ax.set_xlabel("achieved block density")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)


def save_figure(fig: Any, axes: Any, path: Path) -> None:
    """Legend on the first panel, tight layout, written to ``path`` (120 dpi), figure closed."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(results: dict[str, Any], path: Path) -> None:
    """Perplexity vs achieved density, one panel per length, one line per selector family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate_ppl(results)
    lengths = sorted({n for n, _ in agg})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    for ax, n in zip(axes[0], lengths, strict=True):
        fams: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (m, lab), (ppl, dens, _) in agg.items():
            if m != n:
                continue
            fams[selector_family(lab)].append((dens, ppl))
        for fam, pts in sorted(fams.items()):
            pts.sort()
            if fam == "dense":
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="dense")
            else:
                ax.plot([d for d, _ in pts], [p for _, p in pts], marker="o", label=fam)
        dress_density_axes(ax, f"{n} tokens")
    save_figure(fig, axes, path)


def write_report(results: dict[str, Any], md_path: Path | None, png_path: Path | None) -> None:
    """Write the markdown tables and/or the plot."""
    if md_path is not None:
        md_path.write_text(markdown(results) + "\n")
    if png_path is not None:
        plot(results, png_path)
