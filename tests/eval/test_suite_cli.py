"""``vllm-seer eval-suite`` argument checks that need no model."""

from __future__ import annotations

import pytest

from vllm_seer.eval.suite_cli import eval_suite_main


@pytest.mark.parametrize("extra", [["--no-heatmap"], ["--report-only"], ["--served", "dense"]])
def test_heatmap_only_refuses_contradictions(extra: list[str], tmp_path, caplog) -> None:
    assert eval_suite_main(["--heatmap-only", "--out", str(tmp_path), *extra]) == 2
    assert "--heatmap-only runs the heatmap alone" in caplog.text
    assert not any(tmp_path.iterdir())  # nothing written, no model loaded
