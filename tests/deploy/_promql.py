"""PromQL found in the deploy/ artefacts: the dashboard's queries and the rules' expressions."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/vllm-seer.json"
RULES = ROOT / "deploy/prometheus/rules/seer.rules.yml"

# The metric contract of vllm_seer/metrics.py: base name -> type.
SEER_METRICS = {
    "vllm:seer_blocks_computed": "counter",
    "vllm:seer_blocks_possible": "counter",
    "vllm:seer_prefill_tokens": "counter",
    "vllm:seer_prefill_density": "histogram",
    "vllm:seer_gate_seconds": "histogram",
    "vllm:seer_sparse_attention_seconds": "histogram",
    "vllm:seer_config_info": "gauge",
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
CONTRACT_SERIES = {base + s for base, kind in SEER_METRICS.items() for s in SUFFIXES[kind]}

_METRIC = re.compile(r"(?<![\w:\"])((?:vllm|seer):[A-Za-z0-9_:]+)")
_LABEL_VALUES = re.compile(r"^label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)$")


@dataclass(frozen=True)
class Query:
    where: str  # human-readable origin, for failure messages
    expr: str
    kind: str  # "panel" | "variable" | "record" | "alert"


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels including those nested in collapsed rows."""
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries(dash: dict[str, Any]) -> list[Query]:
    out = []
    for p in all_panels(dash):
        for t in p.get("targets", []):
            if t.get("expr"):
                where = f"panel {p['id']} {p['title']!r} {t['refId']}"
                out.append(Query(where, t["expr"], "panel"))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = _LABEL_VALUES.match(q.strip())
        # label_values(SELECTOR, LABEL) is Grafana's; Prometheus answers its selector
        out.append(Query(f"variable {v['name']}", m.group(1) if m else q, "variable"))
    return out


def rule_queries(rules: dict[str, Any]) -> list[Query]:
    out = []
    for g in rules["groups"]:
        for r in g["rules"]:
            kind = "record" if "record" in r else "alert"
            out.append(Query(f"{kind} {r.get('record') or r.get('alert')}", r["expr"], kind))
    return out


def recorded_names(rules: dict[str, Any]) -> set[str]:
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Names of the vllm:* / seer:* series an expression selects."""
    return set(_METRIC.findall(expr))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's $var / ${var} / [[var]] by the given values."""
    for name in sorted(variables, key=len, reverse=True):
        for form in (f"${{{name}}}", f"[[{name}]]", f"${name}"):
            expr = expr.replace(form, variables[name])
    return expr
