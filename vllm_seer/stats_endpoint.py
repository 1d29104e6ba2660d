"""``GET /v1/seer/stats``: this server's Seer metrics as JSON, as a vLLM endpoint plugin.

vLLM (0.32 CPU build and 0.33) loads entry points of the group ``vllm.endpoint_plugins`` only when
they are named in ``VLLM_PLUGINS``; that variable is also the allow-list of the general and
platform plugins, so enable it with ``VLLM_PLUGINS=seer,seer_cpu,seer_stats``. The route reads
the registry that ``/metrics`` serves (the multiprocess registry when ``PROMETHEUS_MULTIPROC_DIR``
is set, otherwise the default one where the Seer collector is registered); it never calls into the
engine.
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "vllm:seer_"
ROUTE = "/v1/seer/stats"
_SERIES_LABELS = ("model_name", "engine")


def current_registry() -> CollectorRegistry:
    """The registry vLLM's ``/metrics`` serves in this process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry
    return REGISTRY


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _model_entry() -> dict[str, Any]:
    return {"config": {}, "blocks_computed": {}, "blocks_possible": {},
            "prefill_tokens": {"sparse": 0.0, "dense": 0.0},
            "prefill_density": {"count": 0.0, "sum": 0.0},
            "gate_seconds": {"count": 0.0, "sum": 0.0},
            "sparse_attention_seconds": {"count": 0.0, "sum": 0.0}}


def collect_stats(registry: CollectorRegistry) -> dict[str, Any]:
    """Seer metrics summed over engines, per served model name, with densities derived."""
    raw: dict[str, dict[str, Any]] = {}
    for family in registry.collect():
        if not family.name.startswith(PREFIX):
            continue
        short = family.name[len(PREFIX):]
        for s in family.samples:
            entry = raw.setdefault(s.labels.get("model_name", ""), _model_entry())
            if short == "config_info":
                entry["config"] = {k: v for k, v in s.labels.items() if k not in _SERIES_LABELS}
            elif short in ("blocks_computed", "blocks_possible") and s.name.endswith("_total"):
                layer = int(s.labels["layer"])
                entry[short][layer] = entry[short].get(layer, 0.0) + s.value
            elif short == "prefill_tokens" and s.name.endswith("_total"):
                path = s.labels["path"]
                entry["prefill_tokens"][path] = entry["prefill_tokens"].get(path, 0.0) + s.value
            elif short in ("prefill_density", "gate_seconds", "sparse_attention_seconds"):
                for part in ("count", "sum"):
                    if s.name == f"{family.name}_{part}":
                        entry[short][part] += s.value
    return {"models": {name: _summarise(e) for name, e in sorted(raw.items())}}


def _summarise(e: dict[str, Any]) -> dict[str, Any]:
    computed, possible = e["blocks_computed"], e["blocks_possible"]
    layers = [{"layer": i, "blocks_computed": computed.get(i, 0.0),
               "blocks_possible": possible.get(i, 0.0),
               "density": _ratio(computed.get(i, 0.0), possible.get(i, 0.0))}
              for i in sorted(set(computed) | set(possible))]
    tokens = e["prefill_tokens"]
    hist = {k: {**e[k], "mean": _ratio(e[k]["sum"], e[k]["count"])}
            for k in ("prefill_density", "gate_seconds", "sparse_attention_seconds")}
    return {
        "config": e["config"],
        "density": _ratio(sum(computed.values()), sum(possible.values())),
        "blocks_computed": sum(computed.values()),
        "blocks_possible": sum(possible.values()),
        "prefill_tokens": tokens,
        "sparse_token_share": _ratio(tokens.get("sparse", 0.0), sum(tokens.values())),
        "sparse_steps": hist["prefill_density"]["count"],
        "step_density": hist["prefill_density"],
        "gate_seconds": hist["gate_seconds"],
        "sparse_attention_seconds": hist["sparse_attention_seconds"],
        "layers": layers,
    }


class SeerStatsPlugin:
    """The ``vllm.endpoint_plugins`` entry point (``seer_stats``): adds ``GET /v1/seer/stats``."""

    name = "seer_stats"
    required_tasks = ("generate",)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._registry = registry

    def attach_router(self, app: Any) -> None:
        app.add_api_route(ROUTE, self.stats, methods=["GET"], tags=["seer"],
                          summary="SeerAttention sparsity statistics of this server")

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        return None  # stateless: everything comes from the metrics registry

    async def stats(self) -> dict[str, Any]:
        return collect_stats(self._registry or current_registry())
