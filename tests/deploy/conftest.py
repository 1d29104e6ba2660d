"""Fixtures for the deploy/ tests: Prometheus and promtool from scripts/get-prometheus.sh."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """Folder holding `prometheus` and `promtool` (Debian package, cached in .cache/prometheus).

    Skips with the script's message when it cannot be obtained, except under CI (env `CI` set),
    where the package registry is reachable and a missing Prometheus is a failure.
    """
    proc = subprocess.run([str(ROOT / "scripts/get-prometheus.sh")], capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode != 0:
        reason = f"Prometheus not obtainable: {proc.stderr.strip().splitlines()[-1:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return Path(proc.stdout.strip().splitlines()[-1])
