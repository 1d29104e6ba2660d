"""Run the GPU test group and record it (``benchmarks/results/gpu-tests.json`` entry).

Usage on the GPU host (after ``. benchmarks/gpu/setup_host.sh``)::

    python3 benchmarks/gpu/gpu_tests.py --out $OUT/gpu-tests-run.json

``kernels_tree`` / ``backend_tree`` are computed from the files that ran
(:mod:`benchmarks.code_tree`: the ids ``git rev-parse HEAD:kernels`` / ``HEAD:vllm_seer/backend``
give for a clean checkout), since the GPU host's copy has no usable ``.git``; ``KERNELS_TREE`` /
``BACKEND_TREE`` in the environment are checked against them (a mismatch is recorded as
``declared_*``).

``--jobs N`` runs the test files in N concurrent pytest processes (files dealt out largest
first; each process's junit is merged into the one entry): Triton's compiles are CPU-bound and
the host has 16 cores, so the group finishes in about the time of its slowest file. Use at most 3
on an 80 GB card: with 6, the naive references of test_fp8_kv / test_sparse_prefill ran out of GPU
memory (H100, 2026-12-08; 3 jobs ran the whole group there).

Where one call cannot hold the whole group, run it in parts (pytest paths after ``--out``), then
here::

    python3 benchmarks/gpu/gpu_tests.py record PART.json [PART.json ...] --note "..."

merges the parts (same device, versions and trees, or it refuses) into one entry, moves the
previous top level of ``benchmarks/results/gpu-tests.json`` to the end of its ``history``
(oldest first) and writes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SAME = ("device", "versions", "kernels_tree", "backend_tree")


def merge_parts(parts: list[dict], note: str) -> dict:
    """One entry from the entries of a group run in parts; raises ``ValueError`` when they differ
    in device, versions or trees (then they are not one run of one code)."""
    if not parts:
        raise ValueError("record: no part entries given")
    for key in SAME:
        seen = {json.dumps(p.get(key), sort_keys=True) for p in parts}
        if len(seen) > 1:
            raise ValueError(f"record: the parts differ in {key!r}: {sorted(seen)}")
    if any(p.get(k) is None for k in ("kernels_tree", "backend_tree") for p in parts):
        raise ValueError("record: a part has no kernels_tree / backend_tree (recorded by an old "
                         "gpu_tests.py without KERNELS_TREE / BACKEND_TREE set)")
    entry = {k: parts[0][k] for k in SAME}
    entry["date"] = max(p["date"] for p in parts)
    for k in ("passed", "failed", "skipped"):
        entry[k] = sum(int(p[k]) for p in parts)
    entry["failed_tests"] = [t for p in parts for t in p["failed_tests"]]
    entry["pytest_rc"] = max(int(p["pytest_rc"]) for p in parts)
    entry["parts"] = len(parts)
    entry["note"] = note
    return entry


def record(paths: list[str], note: str, results: str) -> dict:
    """Merge the part files and make the result the top level of ``results`` (the old top level
    is appended to its history, which runs oldest first)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    entry = merge_parts(parts, note)
    try:
        with open(results) as f:
            old = json.load(f)
    except FileNotFoundError:
        old = None
    entry["history"] = [*old.pop("history", []), old] if old is not None else []
    with open(results, "w") as f:
        json.dump(entry, f, indent=1)
        f.write("\n")
    return entry


def shard_files(paths: list[str], jobs: int) -> list[list[str]]:
    """Deal the test files under ``paths`` (directories are searched for ``test_*.py``) into at
    most ``jobs`` lists, largest file first onto the lightest list (bytes as the cost guess)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("test_*.py"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"gpu_tests --jobs: {p} is neither a test file nor a directory "
                             "(pytest options cannot be sharded; run without --jobs)")
    shards: list[list[str]] = [[] for _ in range(min(jobs, len(files)))]
    load = [0] * len(shards)
    for f in sorted(files, key=lambda f: -f.stat().st_size):
        i = load.index(min(load))
        shards[i].append(str(f))
        load[i] += f.stat().st_size
    return shards


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``(paths, options)`` of pytest arguments: options start with ``-`` (``-k`` / ``-m`` /
    ``-p`` take the next argument as their value); every shard gets all options."""
    paths: list[str] = []
    opts: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-k", "-m", "-p"):
            opts += [a, next(it)]
        elif a.startswith("-"):
            opts.append(a)
        else:
            paths.append(a)
    return paths, opts


def read_junit(junit: str) -> tuple[int, int, list[str]]:
    """(tests, skipped, failed test ids) of one pytest junit file."""
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return int(suite.get("tests")), int(suite.get("skipped")), failed


def main() -> None:
    if sys.argv[1:2] == ["record"]:
        ap = argparse.ArgumentParser(prog="gpu_tests.py record")
        ap.add_argument("parts", nargs="+")
        ap.add_argument("--note", required=True)
        ap.add_argument("--results", default="benchmarks/results/gpu-tests.json")
        a = ap.parse_args(sys.argv[2:])
        entry = record(a.parts, a.note, a.results)
        print(json.dumps({k: v for k, v in entry.items() if k != "history"}, indent=1))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=1,
                    help="concurrent pytest processes, each over its share of the test files")
    ap.add_argument("pytest_args", nargs="*", default=["tests"])
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from code_tree import code_trees

    trees = code_trees()  # of the files that ran (the host's copy has no usable .git)
    if args.jobs > 1:
        paths, opts = split_args(args.pytest_args)
        shards = [[*shard, *opts] for shard in shard_files(paths, args.jobs)]
    else:
        shards = [args.pytest_args]
    procs = []
    for i, shard in enumerate(shards):
        junit = f"{args.out}.{i}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *shard]
        log = open(f"{args.out}.{i}.log", "w")  # noqa: SIM115 - closed after wait
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), junit, log))
    rc, failed, tests, skipped = 0, [], 0, 0
    for i, (proc, junit, log) in enumerate(procs):
        code = proc.wait()
        log.close()
        text = Path(log.name).read_text()
        print(f"--- shard {i}: {' '.join(shards[i])} (rc {code})\n{text[-3000:]}")
        if code == 5:  # no test of the gpu mark in this shard's files
            continue
        rc = max(rc, code)
        n, s, f = read_junit(junit)
        tests, skipped, failed = tests + n, skipped + s, failed + f
    import torch
    import triton

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    entry = {
        "date": str(datetime.date.today()), "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "vllm": vllm_version},
        "passed": tests - skipped - len(failed), "failed": len(failed), "skipped": skipped,
        "failed_tests": failed, "pytest_rc": rc, "jobs": len(shards),
        **trees,
    }
    for key, env in (("kernels_tree", "KERNELS_TREE"), ("backend_tree", "BACKEND_TREE")):
        if os.environ.get(env) and os.environ[env] != trees[key]:
            entry[f"declared_{key}"] = os.environ[env]  # what the caller said ran: not the files'
            print(f"gpu_tests: {env}={os.environ[env]} but the files here are {key} {trees[key]}",
                  file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(entry, f, indent=1)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
