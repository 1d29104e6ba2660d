"""The pure parts of ``benchmarks/gpu/parallel_check.py`` (the two-GPU TP / PP check of issue 15):
argument parsing, the server plans and the judging of hand-written run records."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "parallel_check.py"
spec = importlib.util.spec_from_file_location("parallel_check", SCRIPT)
assert spec is not None and spec.loader is not None
pc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pc)


def test_parse_args_defaults_and_refusals() -> None:
    args = pc.parse_args(["--part", "correctness"])
    assert (args.models, args.layouts, args.kinds) == (["tiny"], ["single", "tp2", "pp2"],
                                                       list(pc.KINDS))
    args = pc.parse_args(["--part", "ttft", "--layouts", "pp2", "--models", "tiny,8b"])
    assert args.layouts == ["pp2"] and args.models == ["tiny", "8b"]
    with pytest.raises(SystemExit, match="--layouts 'tp4'"):
        pc.parse_args(["--part", "correctness", "--layouts", "tp4"])
    with pytest.raises(SystemExit):
        pc.parse_args(["--models", "tiny"])  # --part is required


def test_server_plans() -> None:
    gates = Path("/m/gates")
    cfg, flags = pc.server_plan("flash", "tp2", gates)
    assert cfg is None and flags[-4:] == ["--tensor-parallel-size", "2", "--attention-backend",
                                          "FLASH_ATTN"]
    cfg, flags = pc.server_plan("seer1", "pp2", gates)
    assert cfg["seer"]["nz_ratio"] == 1.0 and flags[-2:] == ["--pipeline-parallel-size", "2"]
    assert "--enforce-eager" in flags
    cfg, flags = pc.server_plan("sparse", "single", gates)
    assert cfg["seer"]["sparsity_method"] == "threshold" and "--pipeline-parallel-size" not in flags


def record(lp: list[float], computed: list[int], tokens: tuple[int, int] = (1024, 0),
           outputs: list[list[int]] | None = None) -> dict:
    return {"prompt_lp": [lp], "outputs": outputs or [[1, 2, 3]],
            "computed": sum(computed), "possible": 544 * len(computed),
            "per_layer": {"computed": computed, "possible": [544] * len(computed)},
            "sparse_tokens": tokens[0], "dense_tokens": tokens[1]}


def runs_for(layout: str, sparse: dict, shift: float = 0.0) -> dict:
    """Dense runs of one layout whose FLASH_ATTN vs TRITON_ATTN gap is 0.01 (plus ``shift``)."""
    dense = [-1.0 + shift, -2.0 + shift]
    return {("tiny", layout, "flash"): record(dense, [0, 0], (0, 0)),
            ("tiny", layout, "triton"): record([x + 0.01 for x in dense], [0, 0], (0, 0)),
            ("tiny", layout, "seer1"): {**record([x + 0.012 for x in dense], [544, 544])},
            ("tiny", layout, "sparse"): sparse}


def test_judge_passes_matching_layouts_and_names_what_failed() -> None:
    single = record([-1.1, -2.1], [300, 250])
    runs = {**runs_for("single", single), **runs_for("pp2", record([-1.1, -2.1], [300, 250])),
            **runs_for("tp2", record([-1.105, -2.1], [301, 250]), shift=0.004)}
    verdict = pc.judge(runs, "tiny")
    assert verdict["ok"] and not verdict["missing"], verdict
    assert set(verdict["checks"]) == {
        "single: density 1 vs TRITON_ATTN", "tp2: density 1 vs TRITON_ATTN",
        "pp2: density 1 vs TRITON_ATTN", "tp2: sparse vs single", "pp2: sparse vs single"}
    # PP runs the same kernels on the same rows: one block off is a failure there, not under TP
    runs[("tiny", "pp2", "sparse")] = record([-1.1, -2.1], [301, 250])
    verdict = pc.judge(runs, "tiny")
    assert not verdict["ok"] and not verdict["checks"]["pp2: sparse vs single"]["ok"]
    # tokens counted once per worker would double them
    runs[("tiny", "pp2", "sparse")] = record([-1.1, -2.1], [300, 250], tokens=(2048, 0))
    check = pc.judge(runs, "tiny")["checks"]["pp2: sparse vs single"]
    assert not check["ok"] and not check["tokens_equal"]
    # density 1 that misses blocks, and a missing run
    runs[("tiny", "pp2", "sparse")] = record([-1.1, -2.1], [300, 250])
    runs[("tiny", "tp2", "seer1")] = record([-1.0, -2.0], [544, 500])
    del runs[("tiny", "single", "triton")]
    verdict = pc.judge(runs, "tiny")
    assert not verdict["ok"] and verdict["missing"] == ["tiny-single-triton"]
    assert not verdict["checks"]["tp2: density 1 vs TRITON_ATTN"]["ok"]


def test_sparse_log_probs_beyond_the_layout_noise_fail() -> None:
    runs = {**runs_for("single", record([-1.1, -2.1], [300, 250])),
            **runs_for("tp2", record([-1.4, -2.1], [300, 250]))}  # 0.3 off; dense moved 0
    check = pc.judge(runs, "tiny")["checks"]["tp2: sparse vs single"]
    assert not check["ok"] and check["lp"]["max"] == pytest.approx(0.3)


def ttft_file(folder: Path, layout: str, fa: dict[int, float], seer: dict[int, float]) -> None:
    def run(backend: str, ttfts: dict[int, float]) -> dict:
        reqs = [{"length": n, "label": f"{round(n / 1024)}k", "repeat": 0, "ttft_s": t}
                for n, t in ttfts.items()]
        return {"run_id": f"{backend}-{layout}", "backend": backend, "requests": reqs,
                "skipped": [], "error": None, "env": {}, "settings": {"flags": []}}

    data = {"schema": 1, "runs": [run("FLASH_ATTN", fa), run("seer@0.1", seer)]}
    (folder / f"ttft-{layout}.json").write_text(json.dumps(data))


def test_ttft_report_compares_each_layout_with_one_gpu(tmp_path) -> None:
    ttft_file(tmp_path, "single", {32768: 1.2, 130944: 10.0}, {32768: 0.8, 130944: 4.0})
    ttft_file(tmp_path, "tp2", {32768: 0.7, 130944: 5.5}, {32768: 0.5, 130944: 2.5})
    ttft_file(tmp_path, "pp2", {32768: 1.3, 130944: 10.5}, {32768: 0.95, 130944: 4.1})
    rep = pc.ttft_report([tmp_path], tolerance=0.05)
    assert rep["speedups"]["single"] == {"32k": pytest.approx(1.5), "128k": pytest.approx(2.5)}
    checks = rep["checks"]
    assert checks["tp2 32k"]["ok"] is False  # 1.4x < 0.95 * 1.5x
    assert checks["tp2 128k"]["ok"] is False  # 2.2x
    assert checks["pp2 32k"]["ok"] is False and checks["pp2 128k"]["ok"] is True  # 1.37x, 2.56x
    assert rep["ok"] is False
    assert pc.ttft_report([tmp_path], tolerance=0.1)["checks"]["pp2 32k"]["ok"] is True


def test_main_keeps_nvlink_multicast_off_and_reports(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    for name in ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    ttft_file(tmp_path, "single", {32768: 1.2}, {32768: 0.8})
    ttft_file(tmp_path, "pp2", {32768: 1.2}, {32768: 0.8})
    assert pc.main(["--part", "ttft-report", "--dir", str(tmp_path)]) == 0
    assert all(os.environ[k] == v for k, v in pc.NO_MULTICAST.items())
    report = json.loads((tmp_path / "parallel_ttft.json").read_text())
    assert report["checks"] == {"pp2 32k": {"speedup": pytest.approx(1.5),
                                            "single_gpu_speedup": pytest.approx(1.5), "ok": True}}
