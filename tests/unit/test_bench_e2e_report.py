"""Report rendering of ``benchmarks/bench_e2e_ttft.py`` from a small hand-written result JSON
(the goals JSON and the workloads: ``test_bench_e2e_goals.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bench_e2e_ttft  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import e2e_client
import e2e_report
import pytest

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "vllm": "0.26.0", "torch": "2.11.0+cu130", "triton": "3.6.0",
       "transformers": "5.17.0", "vllm_seer": "0.1.0", "date": "2026-11-23T10:00:00+00:00",
       "script_commit": "abc1234"}


def req(length: int, ttft: float, itl_ms: float, **seer: float) -> dict[str, Any]:
    label = f"{round(length / 1024)}k"
    return {"length": length, "label": label, "repeat": 0, "ttft_s": ttft, "itl_median_s": itl_ms / 1e3,
            "itl_p90_s": itl_ms * 1.1 / 1e3, "vllm_ttft_s": ttft * 0.98, "prefix_cache_hits": 0.0, **seer}


def run(backend: str, requests: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"run_id": backend + "-1", "backend": backend, "env": ENV,
            "settings": {"flags": ["--load-format", "dummy"], "max_tokens": 64}, "requests": requests,
            "skipped": [], "error": None, **extra}


RUNS = [
    run("FLASH_ATTN", [req(32768, 1.20, 20.0), req(32768, 1.30, 20.4), req(130944, 10.29, 22.0)]),
    run("TRITON_ATTN", [req(32768, 4.45, 25.0), req(130944, 62.5, 40.0)]),
    # density 0.1: 32k 1.5x (met), 128k 2.0x (missed); ITL 32k 1.000x, 128k 22/23 = 0.957x (missed)
    run("seer@0.1", [
        req(32768, 0.80, 20.2, blocks_computed=10.0, blocks_possible=100.0, gate_s=0.08, sparse_attn_s=0.2),
        req(130944, 5.145, 23.0, blocks_computed=30.0, blocks_possible=200.0, gate_s=0.5,
            sparse_attn_s=1.0)]),
    run("seer@0.3", [], skipped=[{"what": "server", "why": "12 s left of the budget"}]),
]


def test_aggregate_takes_min_ttft_and_pools_density() -> None:
    agg = e2e_report.aggregate(RUNS)
    assert agg["FLASH_ATTN"]["32k"]["ttft_s"] == 1.20 and agg["FLASH_ATTN"]["32k"]["n"] == 2
    assert agg["FLASH_ATTN"]["32k"]["itl_median_s"] == pytest.approx(0.0202)
    s = agg["seer@0.1"]["128k"]
    assert s["density"] == pytest.approx(0.15)
    assert s["gate_share"] == pytest.approx(0.5 / 5.145)
    assert s["attn_share"] == pytest.approx(1.0 / 5.145)
    assert "density" not in agg["FLASH_ATTN"]["32k"]


def test_render_report(tmp_path: Path) -> None:
    path = tmp_path / "ttft.json"
    path.write_text(json.dumps({"schema": 1, "runs": RUNS}))
    text = e2e_report.render_report(e2e_report.load_runs([path]))
    lines = text.splitlines()
    assert "NVIDIA H100 80GB HBM3; vLLM 0.26.0" in text
    # TTFT table: columns ordered FLASH_ATTN, TRITON_ATTN, Seer by density; rows ordered by length
    header = next(ln for ln in lines if ln.startswith("| prompt | FLASH_ATTN (n)"))
    assert header == "| prompt | FLASH_ATTN (n) | TRITON_ATTN (n) | seer@0.1 (n) |"
    i = lines.index(header)
    assert lines[i + 2] == "| 32k | 1.200 (2) | 4.450 (1) | 0.800 (1) |"
    assert lines[i + 3] == "| 128k | 10.290 (1) | 62.500 (1) | 5.145 (1) |"
    assert "| 128k | seer@0.1 | 5.145 | 2.00x | 12.15x | 0.150 | 9.7% | 19.4% |" in lines
    assert "| 32k | 20.20 (22.22) | 25.00 (27.50) | 20.20 (22.22) | 0.808x | 1.000x |" in lines
    assert "- seer@0.3: skipped server: 12 s left of the budget" in lines


def test_parse_backend_and_labels() -> None:
    assert e2e_report.parse_backend("seer@0.05") == ("seer", 0.05)
    assert e2e_report.parse_backend("FLASH_ATTN") == ("FLASH_ATTN", None)
    with pytest.raises(ValueError):
        e2e_report.parse_backend("seer@1.5")
    assert e2e_report.parse_backend("seer@0.1/p16") == ("seer", 0.1)
    assert e2e_report.page_variant("FLASH_ATTN/p64") == ("FLASH_ATTN", 64)
    assert e2e_report.page_variant("FLASH_ATTN") == ("FLASH_ATTN", None)
    for bad in ("FLASH_ATTN/p", "FLASH_ATTN/p24", "seer@0.1/pxx"):
        with pytest.raises(ValueError, match="multiple of 16"):
            e2e_report.page_variant(bad)
    assert [e2e_report.length_label(n) for n in (512, 8192, 32768, 130944)] == ["512", "8k", "32k", "128k"]
    make_prompt = bench_e2e_ttft.make_prompt
    a, b = make_prompt("seer@0.1", 100, 0, 0, 50), make_prompt("seer@0.1", 100, 1, 0, 50)
    assert a == make_prompt("seer@0.1", 100, 0, 0, 50) and a != b
    assert make_prompt("FLASH_ATTN", 100, 0, 0, 50) != a


def test_itl_stats() -> None:
    s = e2e_client.itl_stats([1.0, 1.1, 1.3, 1.4], 4)
    assert s["itl_median_s"] == pytest.approx(0.1) and s["itl_mean_s"] == pytest.approx(0.4 / 3)
    assert not s["merged"] and s["itl_max_s"] == pytest.approx(0.2)
    assert e2e_client.itl_stats([1.0, 1.2], 5)["merged"]
