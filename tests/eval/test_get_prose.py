"""scripts/get-prose.sh: reuse of a finished copy, and a clear error when nothing can be fetched."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "get-prose.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PROSE_CACHE": str(tmp_path / "prose"), **env})


def test_finished_copy_is_reused(tmp_path: Path) -> None:
    text = tmp_path / "prose" / "text"
    text.mkdir(parents=True)
    (text / ".done").touch()
    r = _run(tmp_path, PROSE_PACKAGES="no-such-package-vllm-seer")  # not downloaded again
    assert r.returncode == 0 and r.stdout.strip() == str(text.resolve())


def test_no_package_is_a_clear_error(tmp_path: Path) -> None:
    r = _run(tmp_path, PROSE_PACKAGES="no-such-package-vllm-seer")
    assert r.returncode == 1 and r.stdout == ""
    assert "none of the packages (no-such-package-vllm-seer) could be downloaded" in r.stderr
    assert not (tmp_path / "prose" / "text").exists()
