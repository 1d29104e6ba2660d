"""The GPU end-to-end check's judging (pure functions of the per-run JSONs; no server, no GPU)."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "e2e_check.py"
_spec = importlib.util.spec_from_file_location("e2e_check", _PATH)
assert _spec is not None and _spec.loader is not None
e2e_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e_check)

PROMPTS, NEW = 6, 16


def _top(chosen: int, runner_up: int, gap: float) -> list[list[float]]:
    return [[chosen, -0.5], [runner_up, -0.5 - gap], [chosen + 100, -4.0]]


def _run(name: str, lp_shift: float = 0.0) -> dict:
    outs = [[10 * p + j for j in range(NEW)] for p in range(PROMPTS)]
    top = [[_top(t, t + 1, 3.0) for t in out] for out in outs]
    return {"name": name, "outputs": outs, "top_logprobs": top,
            "prompt_lp": [[-1.0 + lp_shift * (i % 2) for i in range(50)] for _ in range(5)],
            "computed": 10.0, "possible": 10.0, "gate_s": 0.1, "attn_s": 0.2,
            "prefix_cache_hit_tokens": 768.0, "log_errors": []}


def _diverge(run: dict, prompt: int, pos: int, gap: float) -> None:
    """From ``pos`` on, ``run`` continues prompt ``prompt`` with other tokens; at ``pos`` it ranks
    the common token ``gap`` below its own choice (``gap`` of rounding size: a near tie)."""
    common = run["outputs"][prompt][pos]
    run["outputs"][prompt][pos:] = [t + 1000 for t in run["outputs"][prompt][pos:]]
    mine = run["outputs"][prompt][pos]
    run["top_logprobs"][prompt][pos] = _top(mine, common, gap)


def _runs() -> dict[str, dict]:
    runs = {k: _run(k) for k in e2e_check.RUN_NAMES}
    runs["flash"] = _run("flash", lp_shift=0.04)  # noise floor: max 0.04 against triton
    for k in ("flash", "triton"):
        runs[k].update(computed=0.0, possible=0.0, gate_s=0.0, attn_s=0.0)
    return runs


def test_divergence_margin():
    a = _run("a")
    b = copy.deepcopy(a)
    assert e2e_check.divergence_margin(a["outputs"][0], a["top_logprobs"][0], b["outputs"][0],
                                       b["top_logprobs"][0]) is None
    _diverge(b, 0, 5, 0.01)  # B ranks A's token 0.01 below its own
    a["top_logprobs"][0][5] = _top(a["outputs"][0][5], b["outputs"][0][5], 0.02)  # and A: 0.02
    j, margin = e2e_check.divergence_margin(a["outputs"][0], a["top_logprobs"][0],
                                            b["outputs"][0], b["top_logprobs"][0])
    assert j == 5 and margin == pytest.approx(0.02)
    a["top_logprobs"][0][5] = _top(a["outputs"][0][5], 7777, 0.02)  # B's token not in A's top-k
    assert e2e_check.divergence_margin(a["outputs"][0], a["top_logprobs"][0], b["outputs"][0],
                                       b["top_logprobs"][0])[1] == math.inf


def _tie(runs: dict, eager: str, graphs: str, prompt: int, pos: int, gap: float) -> None:
    _diverge(runs[graphs], prompt, pos, gap)
    e_tok, g_tok = runs[eager]["outputs"][prompt][pos], runs[graphs]["outputs"][prompt][pos]
    runs[eager]["top_logprobs"][prompt][pos] = _top(e_tok, g_tok, gap)


def test_seer_graph_divergences_at_ties_as_small_as_the_controls_pass():
    """The measured case: Seer differs in 2 of 6, FLASH_ATTN alone in 3 of 6, all at near ties."""
    runs = _runs()
    for p, pos in ((0, 4), (2, 9), (5, 12)):
        _tie(runs, "flash_eager", "flash_graphs", p, pos, 0.03)
    for p, pos in ((1, 6), (3, 2)):
        _tie(runs, "unchunked", "graphs", p, pos, 0.05)
    ok, checks = e2e_check.judge(runs)
    graphs = checks["decode_graphs_vs_eager"]
    assert graphs["tokens_equal"] == [True, False, True, False, True, True]
    assert [j for j, _ in graphs["divergences"]] == [6, 2]
    assert checks["control_flash_decode_graphs_vs_eager"]["tokens_equal"].count(False) == 3
    assert graphs["tie_tolerance"] == pytest.approx(0.08)  # 2 x the floor's 0.04 > 2 x 0.03
    assert ok


def test_a_seer_divergence_far_from_a_tie_fails():
    runs = _runs()
    _tie(runs, "flash_eager", "flash_graphs", 0, 4, 0.03)
    _tie(runs, "unchunked", "graphs", 1, 1, 1.5)  # graphs picked a token 1.5 nats below
    ok, checks = e2e_check.judge(runs)
    assert not ok
    assert checks["decode_graphs_vs_eager"]["divergences"] == [[1, pytest.approx(1.5)]]


def test_a_seer_token_outside_the_other_runs_top_k_fails():
    runs = _runs()
    _diverge(runs["graphs"], 2, 3, 0.01)  # eager's top-k at 3 does not hold graphs' token
    ok, checks = e2e_check.judge(runs)
    assert not ok and checks["decode_graphs_vs_eager"]["divergences"] == [[3, math.inf]]


def test_prefill_moved_under_graphs_fails():
    runs = _runs()
    assert e2e_check.judge(runs)[0]
    runs["graphs"]["prompt_lp"][0][3] += 0.5
    assert not e2e_check.judge(runs)[0]


def test_pooled_key_cache_must_be_bit_identical_to_chunked():
    runs = _runs()
    assert e2e_check.judge(runs)[0]
    runs["keycache"]["prompt_lp"][2][7] += 1e-6  # any difference: a stale or wrong cached key
    ok, checks = e2e_check.judge(runs)
    assert not ok and checks["pooled_key_cache_vs_chunked"]["lp"]["max"] == pytest.approx(1e-6)
    runs = _runs()
    runs["keycache"]["prefix_cache_hit_tokens"] = 0.0  # the prefix hit not exercised
    assert not e2e_check.judge(runs)[0]


def test_tolerance_follows_a_noisier_control():
    floor = {"max": 0.01, "mean": 0.001}
    assert e2e_check.graph_tolerance({"divergences": []}, floor) == e2e_check.TIE_MIN
    control = {"divergences": [[3, 0.2], [5, math.inf]]}  # an inf margin never widens it
    assert e2e_check.graph_tolerance(control, floor) == pytest.approx(0.4)


def test_run_json_without_top_logprobs_is_refused_by_name():
    runs = _runs()
    del runs["flash_graphs"]["top_logprobs"]
    with pytest.raises(ValueError, match="flash_graphs.*top_logprobs"):
        e2e_check.judge(runs)


def test_density1_judge_alone_for_an_fp8_cache():
    runs = {k: v for k, v in _runs().items() if k in e2e_check.DENSITY1_RUNS}
    ok, checks = e2e_check.judge_density1(runs)
    assert ok and checks["noise_floor_flash_vs_triton"]["lp"]["max"] == pytest.approx(0.04)
    far = copy.deepcopy(runs)
    far["seer1"] = _run("seer1", lp_shift=0.2)  # 5x the noise floor: a real difference
    assert not e2e_check.judge_density1(far)[0]
    partial = copy.deepcopy(runs)
    partial["seer1"]["computed"] = 9.0  # density 1 must compute every block
    assert not e2e_check.judge_density1(partial)[0]
    errors = copy.deepcopy(runs)
    errors["triton"]["log_errors"] = ["ERROR boom"]
    assert not e2e_check.judge_density1(errors)[0]


def test_plans_add_the_cache_flags_to_every_server():
    table = e2e_check.plans("/g", ["--kv-cache-dtype", "fp8"])
    assert set(table) == set(e2e_check.RUN_NAMES)
    assert all(flags[-2:] == ["--kv-cache-dtype", "fp8"] for _, _, flags in table.values())
    assert all("--kv-cache-dtype" not in flags for _, _, flags in e2e_check.plans("/g").values())
