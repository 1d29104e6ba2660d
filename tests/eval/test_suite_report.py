"""Suite report: bootstrap intervals, goals over cells, dense-pass exclusion, files written."""

import json
from pathlib import Path

import pytest

from vllm_seer.eval.suite_report import goals, markdown, mean_ci, summary, training_record, write_all
from vllm_seer.eval.suite_served import compare

GOAL_KEYS = {"ppl_ratio_seer_to_oracle_d01_8k", "ppl_ratio_seer_to_oracle_d03_8k",
             "ppl_ratio_seer_to_dense_d01_8k", "seer_beats_ashape_everywhere",
             "seer_beats_trainingfree_everywhere", "passkey_d03_minus_dense", "ruler_d03_minus_dense",
             "ppl_ratio_seer_sink_to_oracle_d01_8k", "ppl_ratio_seer_sink_to_oracle_d03_8k",
             "seer_sink_beats_ashape_everywhere", "seer_sink_beats_trainingfree_everywhere",
             "passkey_sink_d03_minus_dense", "ruler_sink_d03_minus_dense"}


def test_mean_ci_bootstrap() -> None:
    assert mean_ci([3.0]) == (3.0, 3.0, 3.0)
    xs = [float(i % 7) for i in range(40)]
    m, lo, hi = mean_ci(xs)
    assert m == pytest.approx(sum(xs) / 40) and lo < m < hi
    wide = mean_ci(xs[:8])
    assert wide[2] - wide[1] > hi - lo  # fewer samples, wider interval
    assert mean_ci(xs) == mean_ci(xs)  # seeded
    with pytest.raises(ValueError):
        mean_ci([])


def _results() -> dict:
    ppl = {}
    base = {"dense": 5.0, "seer nz=0.1": 5.5, "oracle nz=0.1": 5.2, "ashape nz=0.1": 6.0,
            "vslash nz=0.1": 5.4, "seer nz=0.3": 5.1, "oracle nz=0.3": 5.0, "ashape nz=0.3": 5.3,
            "vslash nz=0.3": 5.2, "seer+sink nz=0.1": 5.3, "seer+sink nz=0.3": 5.15}
    for corpus, off in (("code", 0.0), ("prose", 1.0)):
        for w in range(3):
            for lab, p in base.items():
                ppl[f"{corpus}|8192|doc{w}#0|{lab}"] = {"ppl": p + off + 0.01 * w,
                                                       "density": 1.0 if lab == "dense" else 0.2}
    gen = {}
    for s in range(4):
        gen[f"passkey|8192|d0.5s{s}|dense"] = {"score": 1.0, "density": 1.0, "text": " 1"}
        gen[f"passkey|8192|d0.5s{s}|seer nz=0.3"] = {"score": float(s != 0), "density": 0.4,
                                                     "text": " 1"}
        gen[f"vt|8192|s{s}|dense"] = {"score": 0.0, "density": 1.0, "text": ""}  # dense fails
        gen[f"niah_single|8192|s{s}|dense"] = {"score": 1.0, "density": 1.0, "text": " 7"}
        gen[f"niah_single|8192|s{s}|seer nz=0.3"] = {"score": 1.0, "density": 0.4, "text": " 7"}
    return {"ppl": ppl, "gen": gen, "meta": {"device": "cpu", "excluded_cells": ["vt|8192"]}}


def test_goals_from_cells() -> None:
    g = goals(_results())
    assert set(g) == GOAL_KEYS
    # pooled mean over both corpora: (5.5 + 6.5) / 2 + 0.01 vs (5.2 + 6.2) / 2 + 0.01
    assert g["ppl_ratio_seer_to_oracle_d01_8k"] == pytest.approx(6.01 / 5.71)
    assert g["ppl_ratio_seer_to_dense_d01_8k"] == pytest.approx(6.01 / 5.51)
    assert g["seer_beats_ashape_everywhere"] is True
    assert g["seer_beats_trainingfree_everywhere"] is False  # 5.5 > vslash 5.4 at nz 0.1
    assert g["ppl_ratio_seer_sink_to_oracle_d01_8k"] == pytest.approx(5.81 / 5.71)
    assert g["seer_sink_beats_trainingfree_everywhere"] is True  # 5.3 < 5.4, 5.15 < 5.2
    assert g["seer_sink_beats_ashape_everywhere"] is True
    assert g["passkey_sink_d03_minus_dense"] is None  # no seer+sink generation cells
    assert g["passkey_d03_minus_dense"] == pytest.approx(-25.0)
    assert g["ruler_d03_minus_dense"] == pytest.approx(0.0)  # vt excluded: dense fails it
    assert goals({"ppl": {}, "gen": {}})["ppl_ratio_seer_to_oracle_d01_8k"] is None


def test_training_record(tmp_path: Path) -> None:
    rec, why = training_record(tmp_path)
    assert rec is None and "train_record.json" in why
    (tmp_path / "config.json").write_text(json.dumps({"training": {"distinct_train_tokens": 7,
                                                                   "seq_len": 8192}}))
    rec, src = training_record(tmp_path)
    assert rec == {"distinct_train_tokens": 7, "seq_len": 8192} and "config.json" in src
    (tmp_path / "train_record.json").write_text(json.dumps({"distinct_train_tokens": 9,
                                                            "seq_len": 4096}))
    summ = summary(_results(), *training_record(tmp_path))
    assert (summ["train_distinct_tokens"], summ["train_seq_len"]) == (9, 4096)


def test_write_all_files_and_flags(tmp_path: Path) -> None:
    res = _results()
    res["heatmap"] = {"selector": "seer thr=0.0005", "length": 8192, "windows": ["code:a"],
                      "density": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]}
    res["served"] = {"ppl": {"code|8192|doc0#0|seer nz=0.3": {"ppl": 5.1 * (1 + 2e-6),
                                                               "density": 0.2}},
                     "gen": {"passkey|8192|d0.5s1|seer nz=0.3": {"score": 1.0, "density": 0.41,
                                                                 "text": " 1 "}}}
    cmp = compare(res)["seer nz=0.3"]
    assert cmp["max_ppl_rel_diff"] == pytest.approx(2e-6) and cmp["same_text"] == 1
    assert cmp["max_density_diff"] == pytest.approx(0.01)
    summ = write_all(res, tmp_path, "fid", tmp_path)
    data = json.loads((tmp_path / "fid.json").read_text())
    assert set(data["goals"]) >= GOAL_KEYS and data["train_distinct_tokens"] is None
    assert {"date", "device", "train_distinct_tokens", "train_seq_len", "goals"} <= set(data)
    for png in ("fid-ppl.png", "fid-heatmap.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "fid.md").read_text()
    assert md == markdown(res, summ)
    assert "| vt@8192" not in md or "excl." in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| dense |") and "excl." in ln)
    assert "0 [0, 0] excl." in row  # dense fails vt: flagged, shown with its dense score
