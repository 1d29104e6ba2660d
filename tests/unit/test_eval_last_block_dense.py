"""``benchmarks/eval_last_block_dense.py`` without a server: the four rules' server settings, the
paired summary and the table (the served run itself is a benchmark, run by hand)."""

from __future__ import annotations

import math
from pathlib import Path

import eval_last_block_dense as lbd  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import pytest

GATES = Path("/gates")


def test_rules_differ_only_where_they_should():
    flags = {r: lbd.rule_server(r, GATES, 0.1, 2048, 512) for r in lbd.RULES}
    step = {r: f[f.index("--max-num-batched-tokens") + 1] for r, (_, f) in flags.items()}
    assert step == {"dense": str(2048 + 64), "upstream": str(2048 + 64), "per-step": "512",
                    "none": "512"}
    assert flags["dense"][0] is None
    seer = {r: flags[r][0]["seer"] for r in ("upstream", "per-step", "none")}
    assert [s["last_block_dense"] for s in seer.values()] == [True, True, False]
    assert all(s["nz_ratio"] == 0.1 and s["min_prefill_tokens"] == 0 for s in seer.values())
    assert all("--no-enable-prefix-caching" in f for _, f in flags.values())
    with pytest.raises(ValueError, match="rule 'per-prompt'"):
        lbd.rule_server("per-prompt", GATES, 0.1, 2048, 512)


def test_summary_pairs_windows_with_upstream():
    per_window = {
        "upstream": {"a": {"ppl": 10.0, "density": 0.2}, "b": {"ppl": 20.0, "density": 0.2}},
        "per-step": {"a": {"ppl": 9.0, "density": 0.3}, "b": {"ppl": 19.0, "density": 0.4}},
        "none": {"a": {"ppl": 11.0, "density": 0.1}, "b": {"ppl": 22.0, "density": 0.1},
                 "c": {"ppl": 99.0, "density": 0.1}},  # not measured under every rule: left out
    }
    s = lbd.summarize(per_window)
    assert s["upstream"]["n"] == 2 and "log_ppl_diff_vs_upstream" not in s["upstream"]
    assert s["none"]["ppl"] == pytest.approx(16.5)
    want = (math.log(11 / 10) + math.log(22 / 20)) / 2
    assert s["none"]["log_ppl_diff_vs_upstream"] == pytest.approx(want)
    assert s["per-step"]["density"] == pytest.approx(0.35)
    assert s["per-step"]["diff_lo"] <= s["per-step"]["log_ppl_diff_vs_upstream"] <= \
        s["per-step"]["diff_hi"] < 0
    md = lbd.markdown(s, {"length": 2048, "chunk": 512})
    assert "| per-step | 4 |" in md and "| upstream | 1 |" in md and "+0.0953" in md
    with pytest.raises(ValueError, match="no window"):
        lbd.summarize({"upstream": {"a": {"ppl": 1.0}}, "none": {"b": {"ppl": 1.0}}})
