"""Training outputs besides the gates: the JSON log and the loss-curve plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (NaN / inf become null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(obj), indent=1) + "\n")
    tmp.replace(path)


def plot_losses(step_losses: list[list[float]], history: list[dict[str, Any]], path: Path,
                title: str = "gate distillation") -> Path:
    """Train loss per step (light) and its running mean, held-out loss per evaluation, vs tokens.

    Args:
        step_losses: ``[step, tokens, loss]`` rows; history: dicts with ``tokens`` and ``eval``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if step_losses:
        tok = [r[1] / 1e6 for r in step_losses]
        loss = [r[2] for r in step_losses]
        ax.plot(tok, loss, color="tab:blue", alpha=0.25, lw=0.8)
        k = max(1, len(loss) // 50)
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1])
                  for i in range(len(loss))]
        ax.plot(tok, smooth, color="tab:blue", lw=1.5, label=f"train (mean of {k} steps)")
    ev = [(h["tokens"] / 1e6, h["eval"]) for h in history if h.get("eval") is not None]
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", color="tab:red", ms=3, lw=1.5, label="held-out")
    finite = [v for v in ([r[2] for r in step_losses] + [e for _, e in ev]) if math.isfinite(v)]
    if finite and max(finite) > 20 * min(finite) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("distillation loss (10 x KL, summed over layers)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
