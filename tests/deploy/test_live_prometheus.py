"""A real vllm-seer server on CPU, scraped every second by a real Prometheus loading the repo's
rules; every PromQL expression of the dashboard and the rules is evaluated through Prometheus' HTTP
API and must return data."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import yaml
from _promql import (
    RULES,
    dashboard_queries,
    load_dashboard,
    load_rules,
    metric_names,
    rule_queries,
    substitute,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PROMPT_TOKENS = 1200  # > min_prefill_tokens below: these prefills take the sparse path
NUM_REQUESTS = 4
SETTLE_S = 120.0  # bound on waiting for scrapes and rule evaluations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def rules(self) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/rules", timeout=10)
        return [rule for g in r.json()["data"]["groups"] for rule in g["rules"]]


@pytest.fixture()
def prometheus_for(prometheus_bin: Path, tmp_path: Path):
    """Factory: start Prometheus on 127.0.0.1 scraping `target` every second with the repo rules."""
    procs: list[subprocess.Popen] = []

    def start(target: str) -> Prometheus:
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(RULES)],
               "scrape_configs": [{"job_name": "vllm-seer",
                                   "static_configs": [{"targets": [target]}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("w")
        procs.append(subprocess.Popen(
            [str(prometheus_bin / "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert procs[-1].poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    return Prometheus(url)
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise AssertionError("Prometheus not ready in 30 s")

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=15)


def wait_until(what: str, check: Callable[[], bool], timeout: float = SETTLE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(1.0)


def test_every_dashboard_and_rule_expression_returns_data(prometheus_for) -> None:
    from vllm_seer.testing import SeerServer, ensure_test_model

    model = ensure_test_model()
    seer = {"gates": str(model / "gates"), "min_prefill_tokens": 256}
    with SeerServer(model, {"seer": seer}, ["--enforce-eager"]) as server:
        prom = prometheus_for(urlparse(server.url).netloc)
        up = 'up{job="vllm-seer"} == 1'
        wait_until("the first scrape", lambda: bool(prom.query(up)), timeout=30)

        # one request first so every counter exists before the burst: rate() then has an increase
        ids = [(7 * i) % 1500 + 100 for i in range(PROMPT_TOKENS)]
        server.completion(ids, 2)
        time.sleep(3)
        for n in range(NUM_REQUESTS):
            server.completion(ids[n:] + ids[:n], 4)
        assert re.search(r'vllm:seer_prefill_tokens_total\{[^}]*path="sparse"[^}]*\} [1-9]',
                         server.metrics_text()), "no prefill token took the sparse path"

        wait_until("vllm:seer_config_info", lambda: bool(prom.query("vllm:seer_config_info")))
        model_name = prom.query("vllm:seer_config_info")[0]["metric"]["model_name"]
        # as Grafana does for a regex matcher: regex-escaped, then backslashes escaped for PromQL
        as_regex = re.escape(model_name).replace("\\", "\\\\")
        variables = {"model_name": as_regex, "__rate_interval": "1m",
                     "__interval": "15s", "__range": "5m"}
        dash = [(q, substitute(q.expr, variables)) for q in dashboard_queries(load_dashboard())]
        rules = [(q, q.expr) for q in rule_queries(load_rules())]
        # data-bearing queries must answer; alert conditions must parse and their inputs answer
        must_answer = [(q.where, e) for q, e in dash + rules if q.kind != "alert"]
        for q, e in rules:
            if q.kind == "alert":
                prom.query(e)  # valid PromQL for this Prometheus
                must_answer += [(f"{q.where} input", n) for n in metric_names(e) | {"up"}]

        def empty() -> list[str]:
            return [f"{where}: {expr}" for where, expr in must_answer if not prom.query(expr)]

        missing: list[str] = []
        deadline = time.monotonic() + SETTLE_S
        while (missing := empty()) and time.monotonic() < deadline:
            time.sleep(2.0)
        assert not missing, "expressions without data:\n" + "\n".join(missing)

        wait_until("every rule evaluated",
                   lambda: all(r["health"] != "unknown" for r in prom.rules()), timeout=30)
        bad = [f"{r['name']}: {r.get('lastError')}" for r in prom.rules() if r["health"] != "ok"]
        assert not bad, bad
        # the recorded ratios settle to real numbers once the burst's scrape is in (0/0 before)
        sel = f'{{model_name="{model_name}"}}'
        wait_until("a density in (0, 1]",
                   lambda: bool(prom.query(f"seer:density:rate5m{sel} > 0 <= 1")), timeout=30)
        wait_until("a positive sparse token share",
                   lambda: bool(prom.query(f"seer:sparse_token_share:rate5m{sel} > 0")), timeout=30)
        layers = prom.query(f"seer:layer_density:rate5m{sel} >= 0")
        assert len(layers) == len(prom.query(f"vllm:seer_blocks_possible_total{sel}")) > 0
        down = [r for r in prom.rules() if r["name"] == "SeerTargetDown"]
        assert down and down[0]["state"] == "inactive"
