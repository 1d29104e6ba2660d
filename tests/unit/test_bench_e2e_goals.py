"""``bench_e2e_ttft.py`` on CPU without a server: argument parsing, the goals JSON, the workload
summaries and the joined report (``--compare``), from small hand-written result records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bench_e2e_ttft  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import e2e_goals
import e2e_load
import e2e_run
import pytest

ENV = {"gpu": "NVIDIA H200", "vllm": "0.26.0", "torch": "2.11.0+cu130", "triton": "3.6.0",
       "transformers": "5.17.0", "vllm_seer": "0.1.0", "date": "2026-12-03T10:00:00+00:00",
       "script_commit": "abc1234"}
K = 1024
L128 = 130944


def req(length: int, ttft: float, itl_ms: float, repeat: int = 0) -> dict[str, Any]:
    label = f"{round(length / K)}k"
    return {"length": length, "label": label, "repeat": repeat, "ttft_s": ttft,
            "itl_median_s": itl_ms / 1e3, "itl_p90_s": itl_ms * 1.1 / 1e3, "prefix_cache_hits": 0.0}


def wl(rps: float, itl_ms: float, cls: str = "stream") -> dict[str, Any]:
    return {"requests": 32, "completed": 32, "errors": [], "makespan_s": 32 / rps,
            "requests_per_s": rps, "output_tokens_per_s": rps * 64,
            "classes": {cls: {"n": 32, "ttft_s": {"p50": 0.5, "p90": 0.9, "p99": 1.0, "mean": 0.6},
                              "itl_s": {"p50": itl_ms / 1e3, "p90": 0.03, "p99": 0.04,
                                        "mean": 0.02}}}}


def run(backend: str, requests: list[dict[str, Any]], mode: str = "compiled",
        **extra: Any) -> dict[str, Any]:
    return {"run_id": backend + "-1", "backend": backend, "env": ENV,
            "settings": {"flags": ["--load-format", "dummy"], "max_tokens": 64, "mode": mode},
            "requests": requests, "workloads": {}, "sweep": [], "skipped": [], "error": None,
            **extra}


FA = run("FLASH_ATTN",
         [req(16 * K, 0.50, 20.0), req(32 * K, 1.20, 20.0), req(32 * K, 1.25, 20.4, 1),
          req(64 * K, 3.4, 21.0), req(L128, 10.5, 22.0), req(L128, 10.27, 22.0, 1)],
         workloads={"batch": wl(1.0, 30.0), "short": wl(20.0, 10.0, "short"),
                    "mixed": wl(4.0, 12.0, "short")},
         sweep=[{"length": n, "label": str(n), "repeat": 0, "ttft_s": t}
                for n, t in ((K, 0.05), (4 * K, 0.12), (8 * K, 0.22), (16 * K, 0.5))],
         warmup={"tokens": 20000, "ttft_s": 0.7})
SEER = run("seer@0.1",
           [req(16 * K, 0.45, 20.2), req(32 * K, 0.90, 20.1), req(64 * K, 2.0, 21.5),
            req(L128, 6.3, 22.0), req(L128, 5.27, 22.2, 1)],
           workloads={"batch": wl(1.0, 31.0), "short": wl(19.0, 10.1, "short")},
           sweep=[{"length": n, "label": str(n), "repeat": 0, "ttft_s": t}
                  for n, t in ((K, 0.06), (4 * K, 0.11), (8 * K, 0.25), (16 * K, 0.45))],
           warmup={"tokens": 20000, "ttft_s": 3.0})


def test_summary_goals_are_ratios_to_flash_attn_in_the_same_runs() -> None:
    s = e2e_goals.summary([FA, SEER])
    g = s["goals"]
    assert set(g) == set(e2e_goals.TARGETS)
    assert g["ttft_x_d01_128k"] == pytest.approx(10.27 / 5.27)  # min over repeats
    assert g["ttft_x_d01_64k"] == pytest.approx(1.7)
    assert g["ttft_x_d01_32k"] == pytest.approx(1.2 / 0.9)
    assert g["ttft_x_d01_16k"] == pytest.approx(0.5 / 0.45)
    assert g["itl_x_batch1_32k"] == pytest.approx(20.2 / 20.1)  # median over repeats
    assert g["itl_x_batch32_32k"] == pytest.approx(30.0 / 31.0)
    assert g["short_throughput_x"] == pytest.approx(19.0 / 20.0)
    assert g["mixed_throughput_x"] is None  # Seer's mixed run is missing
    assert g["first_request_penalty"] == pytest.approx(6.3 / 5.27)
    assert s["met"]["ttft_x_d01_64k"] is True and s["met"]["ttft_x_d01_128k"] is False
    assert s["met"]["first_request_penalty"] is False and s["met"]["mixed_throughput_x"] is None
    assert (s["device"], s["date"], s["mode"]) == ("NVIDIA H200", "2026-12-03", "compiled")
    assert s["versions"]["vllm"] == ["0.26.0"]
    assert s["details"]["crossover"] == {"seer@0.1": 16 * K}  # slower at 8k, faster at 16k
    assert s["details"]["first_request_penalty"]["FLASH_ATTN"] == pytest.approx(10.5 / 10.27)
    json.dumps(s)  # JSON-able


def test_summary_of_mixed_modes_says_so_and_empty_runs_measure_nothing() -> None:
    s = e2e_goals.summary([FA, run("seer@0.1", [req(L128, 5.0, 22.0)], mode="eager")])
    assert s["mode"] == "mixed: compiled,eager"
    empty = e2e_goals.summary([])
    assert all(v is None for v in empty["goals"].values())
    assert all(v is None for v in empty["met"].values())


def test_crossover_never_when_the_longest_sweep_length_is_slower() -> None:
    slow = run("seer@0.05", [], sweep=[{"length": 16 * K, "label": "16k", "repeat": 0,
                                       "ttft_s": 0.6}])
    assert e2e_goals.crossover([FA, slow]) == {"seer@0.05": None}


def test_compare_writes_the_goals_json_and_the_markdown(tmp_path: Path) -> None:
    a, b = tmp_path / "fa.json", tmp_path / "s.json"
    a.write_text(json.dumps({"schema": 1, "runs": [FA]}))
    b.write_text(json.dumps({"schema": 1, "runs": [SEER]}))
    out = tmp_path / "res" / "e2e-ttft-h200.json"
    assert bench_e2e_ttft.main(["--compare", str(a), str(b), "--summary-out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "compiled" and "ttft_x_d01_128k" in data["goals"]
    md = out.with_suffix(".md").read_text()
    assert "# End-to-end TTFT, decode ITL and throughput (compiled)" in md
    assert "| TTFT ≥ 2.4x FLASH_ATTN at 128k, density 0.1 | `ttft_x_d01_128k` | 1.949 | missed |" in md
    assert "| batch | FLASH_ATTN | stream (32) | 32/32 | 1.00 | 64 |" in md
    assert "| seer@0.1 | 20000, 3.000 | 1.195 |" in md
    assert "Crossover (shortest swept length from which Seer is never slower than FLASH_ATTN): " \
           "seer@0.1: 16384" in md
    assert "| mixed-load request throughput ≥ 1.0x FLASH_ATTN | `mixed_throughput_x` | – | " \
           "not measured |" in md


def test_parse_args_defaults_compiled_and_the_eager_option() -> None:
    a = bench_e2e_ttft.parse_args([])
    assert a.backends == "FLASH_ATTN,seer@0.1,seer@0.05" and not a.eager
    assert a.lengths == [16 * K, 32 * K, 64 * K, L128]
    assert a.phases == ["ttft", "batch", "short", "mixed"]
    assert (a.batch_streams, a.batch_length) == (32, 32 * K)
    _, flags = e2e_run.server_args(a, "FLASH_ATTN")
    assert "--enforce-eager" not in flags and flags[-2:] == ["--attention-backend", "FLASH_ATTN"]
    e = bench_e2e_ttft.parse_args(["--eager", "--backends", "seer@0.1", "--lengths", "16384",
                                   "--phases", "ttft,sweep"])
    cfg, flags = e2e_run.server_args(e, "seer@0.1")
    assert "--enforce-eager" in flags and cfg["seer"]["nz_ratio"] == 0.1
    assert e.lengths == [16384] and e.phases == ["ttft", "sweep"]
    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    _, flags = e2e_run.server_args(bench_e2e_ttft.parse_args(["--speculative-config", spec]),
                                   "seer@0.1")
    assert flags[flags.index("--speculative-config") + 1] == spec
    _, flags = e2e_run.server_args(a, "FLASH_ATTN/p64")
    assert flags[-4:] == ["--block-size", "64", "--attention-backend", "FLASH_ATTN"]
    cfg, flags = e2e_run.server_args(a, "seer@0.1/p16")
    assert flags[-2:] == ["--block-size", "16"] and cfg["seer"]["nz_ratio"] == 0.1
    assert "--block-size" not in e2e_run.server_args(a, "seer@0.1")[1]
    d = bench_e2e_ttft.parse_args(["--dry-run"])
    assert d.lengths == [512, 1024] and d.batch_length + d.max_tokens <= d.max_model_len


@pytest.mark.parametrize("argv", [["--phases", "ttft,warp"], ["--lengths", "16k"],
                                  ["--lengths", "131072"], ["--seer-extra", "{bad"],
                                  ["--speculative-config", "ngram"]])
def test_parse_args_refuses_bad_input(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench_e2e_ttft.parse_args(argv)


def test_workload_jobs_are_deterministic_and_shaped() -> None:
    prefix, jobs = e2e_load.batch_jobs("FLASH_ATTN", 4, 1000, 8, 0, 50)
    assert len(prefix) == 1000 - e2e_load.TAIL
    assert all(j.prompt[:len(prefix)] == prefix and len(j.prompt) == 1000 for j in jobs)
    assert len({tuple(j.prompt) for j in jobs}) == 4
    mixed = e2e_load.mixed_jobs("x", 10, 100, 5.0, 2, 1000, 8, 0, 50)
    assert mixed == e2e_load.mixed_jobs("x", 10, 100, 5.0, 2, 1000, 8, 0, 50)
    assert [j.delay_s for j in mixed] == sorted(j.delay_s for j in mixed)
    longs = [j for j in mixed if j.cls == "long"]
    shorts = [j for j in mixed if j.cls == "short"]
    assert len(longs) == 2 and len(shorts) == 10 and all(len(j.prompt) == 1000 for j in longs)
    assert 0 < longs[0].delay_s < longs[1].delay_s <= max(j.delay_s for j in shorts)
    assert all(j.delay_s == 0 for j in e2e_load.burst_jobs("y", 3, 10, 4, 0, 50))


def test_summarize_counts_throughput_and_percentiles_per_class() -> None:
    results = [{"cls": "short", "sent_s": 0.0, "ttft_s": 0.1 * (i + 1), "e2e_s": 1.0,
                "completion_tokens": 4, "gaps": [0.01, 0.02, 0.03]} for i in range(4)]
    results.append({"cls": "long", "sent_s": 0.5, "ttft_s": 2.0, "e2e_s": 3.0,
                    "completion_tokens": 4, "gaps": [0.05]})
    results.append({"cls": "long", "sent_s": 0.7, "error": "TimeoutError: request exceeded"})
    s = e2e_load.summarize(4.0, results)
    assert (s["requests"], s["completed"]) == (6, 5)
    assert s["requests_per_s"] == pytest.approx(5 / 4.0)
    assert s["output_tokens_per_s"] == pytest.approx(20 / 4.0)
    assert s["errors"] == ["TimeoutError: request exceeded"]
    short = s["classes"]["short"]
    assert short["n"] == 4 and short["ttft_s"]["p50"] == pytest.approx(0.25)
    assert short["itl_s"]["p50"] == pytest.approx(0.02)
    assert short["ttft_s"]["p99"] == pytest.approx(0.1 + 0.3 * 0.99 * 1, rel=0.02)
    assert s["classes"]["long"]["itl_s"]["p90"] == pytest.approx(0.05)
    assert not math.isnan(s["classes"]["long"]["ttft_s"]["mean"])


def test_compare_refuses_missing_and_malformed_files_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    for path, msg in ((tmp_path / "none.json", "no such file"), (bad, "not JSON")):
        with pytest.raises(SystemExit, match=msg) as e:
            bench_e2e_ttft.main(["--report", str(path)])
        assert str(path) in str(e.value)
    bad.write_text('{"schema": 1}')
    with pytest.raises(SystemExit, match="list 'runs'"):
        bench_e2e_ttft.main(["--report", str(bad)])


def test_report_of_runs_without_the_ttft_phase(tmp_path: Path) -> None:
    only = run("seer@0.1", [], workloads={"short": wl(19.0, 10.1, "short")},
               warmup={"tokens": 20000, "ttft_s": 3.0})
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"schema": 1, "runs": [only]}))
    md = bench_e2e_ttft.compare([path], None, None, print_only=True)
    assert "No single-request (ttft phase) measurements in these runs." in md
    assert "| short | seer@0.1 | short (32) | 32/32 | 19.00 | 1216 |" in md


def test_qwen_yarn_arch_is_a_valid_yarn_config() -> None:
    from e2e_model import model_config

    from vllm_seer.rope import RopeSpec

    for tiny in (False, True):
        cfg = model_config(tiny, "qwen25-7b-yarn")
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        rope = RopeSpec.from_hf_config(SimpleNamespace(**cfg), hd, cfg["max_position_embeddings"])
        assert rope.rope_type == "yarn" and rope.attention_scale() > 1.0  # YaRN's mscale
    assert model_config(False, "qwen25-7b-yarn")["num_key_value_heads"] == 4  # group of 7
    a = bench_e2e_ttft.parse_args(["--arch", "qwen25-7b-yarn", "--lengths", "65536"])
    assert a.arch == "qwen25-7b-yarn" and a.model_dir.name.endswith("qwen25-7b-yarn")
    with pytest.raises(ValueError, match="arch"):
        model_config(False, "gpt2")
