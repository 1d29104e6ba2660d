"""``benchmarks/code_tree.py``: tree ids computed from files equal git's own (``write-tree``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import code_tree  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def test_tree_ids_equal_git_write_tree(tmp_path: Path) -> None:
    """Nested folders, names whose order differs between a file and a folder (``a.py`` vs
    ``a/``), an executable, a symlink, an empty folder and ignored build files: the id of every
    folder equals the one git gives the same files."""
    pkg = tmp_path / "pkg"
    (pkg / "a").mkdir(parents=True)
    (pkg / "a" / "x.py").write_text("x = 1\n")
    (pkg / "a.py").write_text("a = 2\n")
    (pkg / "a-b.py").write_text("# dash sorts before '/'\n")
    (pkg / "run.sh").write_text("#!/bin/sh\n")
    (pkg / "run.sh").chmod(0o755)
    (pkg / "link").symlink_to("a.py")
    (pkg / "empty").mkdir()
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0\1")
    (pkg / "b.pyc").write_bytes(b"\2")
    (tmp_path / ".gitignore").write_text("__pycache__/\n*.pyc\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    root = _git(tmp_path, "write-tree")
    for rel in ("pkg", "pkg/a"):
        assert code_tree.tree_id(tmp_path / rel) == _git(tmp_path, "rev-parse", f"{root}:{rel}")
    (pkg / "a" / "x.py").write_text("x = 3\n")  # any content change moves the id
    assert code_tree.tree_id(tmp_path / "pkg") != _git(tmp_path, "rev-parse", f"{root}:pkg")


def test_code_trees_names_the_project_folders() -> None:
    trees = code_tree.code_trees()
    assert set(trees) == {"kernels_tree", "backend_tree"}
    assert all(t is not None and len(t) == 40 for t in trees.values())


def test_script_commit_only_names_a_commit_holding_these_kernels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The e2e environment's commit: git's HEAD when its kernels tree is the one given (the files'
    own on a clean checkout), ``unknown (...)`` when git's HEAD holds other kernels (a stale .git),
    and ``SEER_COMMIT`` when the caller sets it."""
    import e2e_client

    repo = Path(__file__).resolve().parents[2]
    if _git(repo, "rev-parse", "--is-inside-work-tree") != "true":
        pytest.skip("not a git checkout")
    monkeypatch.delenv("SEER_COMMIT", raising=False)
    head = _git(repo, "rev-parse", "HEAD")
    assert e2e_client.script_commit(_git(repo, "rev-parse", "HEAD:kernels")) == head[:7]
    stale = e2e_client.script_commit("0" * 40)
    assert stale.startswith("unknown (git HEAD") and head[:7] in stale
    monkeypatch.setenv("SEER_COMMIT", "abc1234")
    assert e2e_client.script_commit("0" * 40) == "abc1234"
