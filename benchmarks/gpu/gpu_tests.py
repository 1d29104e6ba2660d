"""Run the GPU test group and record it (``benchmarks/results/gpu-tests.json`` entry).

Usage on the GPU host (after ``. benchmarks/gpu/setup_host.sh``)::

    KERNELS_TREE=$(git rev-parse HEAD:kernels) BACKEND_TREE=$(git rev-parse HEAD:vllm_seer/backend) \\
        python3 benchmarks/gpu/gpu_tests.py --out $OUT/gpu-tests-run.json

The trees are passed in because the GPU host gets a copy of the working tree without ``.git``:
commit first, so that they name what ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("pytest_args", nargs="*", default=["tests"])
    args = ap.parse_args()
    junit = args.out + ".xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *args.pytest_args]
    rc = subprocess.run(cmd, check=False).returncode
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    import torch
    import triton

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    entry = {
        "date": str(datetime.date.today()), "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "vllm": vllm_version},
        "passed": tests - skipped - len(failed), "failed": len(failed), "skipped": skipped,
        "failed_tests": failed, "pytest_rc": rc,
        "kernels_tree": os.environ.get("KERNELS_TREE"),
        "backend_tree": os.environ.get("BACKEND_TREE"),
    }
    with open(args.out, "w") as f:
        json.dump(entry, f, indent=1)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
