"""``benchmarks/gpu/gpu_tests.py record``: parts of one GPU test-group run merged into one entry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "gpu_tests.py"


def _mod():
    spec = importlib.util.spec_from_file_location("gpu_tests", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _part(passed: int, failed: list[str], date: str = "2026-12-03", **over) -> dict:
    return {"date": date, "device": "NVIDIA H200",
            "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0", "vllm": "0.26.0"},
            "passed": passed, "failed": len(failed), "skipped": 0, "failed_tests": failed,
            "pytest_rc": 1 if failed else 0, "kernels_tree": "a" * 40, "backend_tree": "b" * 40,
            **over}


def test_parts_sum_and_old_top_level_goes_to_history(tmp_path: Path) -> None:
    mod = _mod()
    results = tmp_path / "gpu-tests.json"
    old = {**_part(26, [], "2026-12-01"), "history": [_part(20, ["x::y"], "2026-11-30")]}
    results.write_text(json.dumps(old))
    paths = []
    for i, part in enumerate((_part(25, []), _part(21, ["t::one"], "2026-12-04"))):
        paths.append(tmp_path / f"p{i}.json")
        paths[-1].write_text(json.dumps(part))
    entry = mod.record([str(p) for p in paths], "two calls", str(results))
    saved = json.loads(results.read_text())
    assert saved == entry
    assert (entry["passed"], entry["failed"], entry["parts"]) == (46, 1, 2)
    assert entry["failed_tests"] == ["t::one"] and entry["pytest_rc"] == 1
    assert entry["date"] == "2026-12-04" and entry["note"] == "two calls"
    assert [h["date"] for h in entry["history"]] == ["2026-11-30", "2026-12-01"]  # oldest first
    assert "history" not in entry["history"][-1]


@pytest.mark.parametrize("key,value", [("kernels_tree", "c" * 40), ("device", "NVIDIA H100"),
                                       ("versions", {"torch": "2.12"})])
def test_parts_of_different_code_or_machines_are_refused(key: str, value) -> None:
    mod = _mod()
    with pytest.raises(ValueError, match=key):
        mod.merge_parts([_part(1, []), _part(1, [], **{key: value})], "n")


def test_parts_without_trees_are_refused() -> None:
    with pytest.raises(ValueError, match="KERNELS_TREE"):
        _mod().merge_parts([_part(1, [], kernels_tree=None)], "n")
    with pytest.raises(ValueError, match="no part"):
        _mod().merge_parts([], "n")


def test_shards_deal_every_file_once_largest_first(tmp_path: Path) -> None:
    mod = _mod()
    sizes = {"test_a.py": 900, "test_b.py": 500, "test_c.py": 400, "test_d.py": 100}
    for name, size in sizes.items():
        (tmp_path / "sub" if name == "test_d.py" else tmp_path).mkdir(exist_ok=True)
        where = tmp_path / "sub" if name == "test_d.py" else tmp_path
        (where / name).write_text("#" * size)
    (tmp_path / "helper.py").write_text("#" * 5000)  # not a test file
    shards = mod.shard_files([str(tmp_path)], 2)
    names = [[Path(f).name for f in s] for s in shards]
    assert names == [["test_a.py", "test_d.py"], ["test_b.py", "test_c.py"]]
    assert sorted(len(s) for s in mod.shard_files([str(tmp_path)], 9)) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="neither a test file nor a directory"):
        mod.shard_files([str(tmp_path), "-k"], 2)


def test_pytest_options_go_to_every_shard() -> None:
    mod = _mod()
    assert mod.split_args(["tests/kernels", "-k", "not vllm", "-x", "tests/unit"]) == (
        ["tests/kernels", "tests/unit"], ["-k", "not vllm", "-x"])
