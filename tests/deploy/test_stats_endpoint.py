"""GET /v1/seer/stats (vllm_seer/stats_endpoint.py) against a registry holding contract metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_seer.stats_endpoint import ROUTE, SeerStatsPlugin, collect_stats


def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    lab = ["model_name", "engine"]
    comp = Counter("vllm:seer_blocks_computed", "", [*lab, "layer"], registry=r)
    poss = Counter("vllm:seer_blocks_possible", "", [*lab, "layer"], registry=r)
    tokens = Counter("vllm:seer_prefill_tokens", "", [*lab, "path"], registry=r)
    dens = Histogram("vllm:seer_prefill_density", "", lab, buckets=(0.1, 0.5, 1.0), registry=r)
    gate = Histogram("vllm:seer_gate_seconds", "", lab, registry=r)
    Histogram("vllm:seer_sparse_attention_seconds", "", lab, registry=r)
    Gauge("vllm:seer_config_info", "", [*lab, "gates", "threshold"], registry=r).labels(
        "m", "0", "g/", "0.001").set(1)
    Counter("vllm:request_success", "", lab, registry=r).labels("m", "0").inc()
    for engine in ("0", "1"):  # two engines of one model are summed
        comp.labels("m", engine, "0").inc(10)
        poss.labels("m", engine, "0").inc(100)
        comp.labels("m", engine, "1").inc(30)
        poss.labels("m", engine, "1").inc(100)
        tokens.labels("m", engine, "sparse").inc(300)
        tokens.labels("m", engine, "dense").inc(100)
        dens.labels("m", engine).observe(0.2)
        gate.labels("m", engine).observe(0.5)
    return r


def test_collect_stats_sums_engines_and_derives_densities() -> None:
    m = collect_stats(registry())["models"]["m"]
    assert m["config"] == {"gates": "g/", "threshold": "0.001"}
    assert m["density"] == pytest.approx(80 / 400)
    assert [(x["layer"], x["density"]) for x in m["layers"]] == [(0, 0.1), (1, 0.3)]
    assert m["prefill_tokens"] == {"sparse": 600, "dense": 200}
    assert m["sparse_token_share"] == pytest.approx(0.75)
    assert m["sparse_steps"] == 2 and m["step_density"]["mean"] == pytest.approx(0.2)
    assert m["gate_seconds"] == {"count": 2, "sum": 1.0, "mean": 0.5}
    assert m["sparse_attention_seconds"]["mean"] is None


def test_empty_registry_gives_no_models() -> None:
    assert collect_stats(CollectorRegistry()) == {"models": {}}


def test_route_through_fastapi_and_vllm_protocol() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    plugin = SeerStatsPlugin(registry())
    interface = pytest.importorskip("vllm.plugins.endpoint_plugins.interface")
    assert isinstance(plugin, interface.EndpointPlugin)
    app = FastAPI()
    plugin.attach_router(app)
    body = TestClient(app).get(ROUTE).json()
    assert body["models"]["m"]["density"] == pytest.approx(0.2)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_live_server_serves_stats(tmp_path) -> None:
    """The plugin loaded by a real server through its entry point and VLLM_PLUGINS.

    The entry point is declared by a throw-away dist-info on PYTHONPATH, so this test does not
    depend on the installed package metadata declaring it.
    """
    import json
    import os
    import re
    import urllib.request

    from vllm_seer.testing import SeerServer, ensure_test_model

    dist = tmp_path / "vllm_seer_stats_probe-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-seer-stats-probe\n"
                                   "Version: 0.0.0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.endpoint_plugins]\nseer_stats = vllm_seer.stats_endpoint:SeerStatsPlugin\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "VLLM_PLUGINS": "seer,seer_cpu,seer_stats"}
    model = ensure_test_model()
    seer = {"gates": str(model / "gates"), "min_prefill_tokens": 256}
    with SeerServer(model, {"seer": seer}, ["--enforce-eager"], env=env) as server:
        server.completion([(7 * i) % 1500 + 100 for i in range(1200)], 2)
        metrics = server.metrics_text()
        with urllib.request.urlopen(server.url + ROUTE, timeout=30) as r:
            stats = json.loads(r.read())
    m = stats["models"][server.model_name]
    sparse = sum(float(v) for v in re.findall(
        r'^vllm:seer_prefill_tokens_total\{[^}]*path="sparse"[^}]*\} (\S+)$', metrics, re.M))
    assert m["prefill_tokens"]["sparse"] == sparse > 0
    assert 0 < m["density"] <= 1 and m["config"]["min_prefill_tokens"] == "256"
    assert len(m["layers"]) > 0 and m["sparse_steps"] > 0
