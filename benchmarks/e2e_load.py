"""Concurrent workloads of ``bench_e2e_ttft.py`` (one server, real HTTP, client-side timing).

* ``batch``: ``streams`` requests decode together on ``length``-token contexts, for the decode
  inter-token latency at that batch size. The streams share all but the last ``TAIL`` prompt
  tokens (a prefix first prefilled by one request, then prefix-cache hits), so 32 streams at 32k
  hold ~33k tokens of KV cache instead of 1M, while each stream's decode still reads its whole
  32k-token context.
* ``short``: many short requests at once (request throughput of ordinary traffic; with the default
  ``min_prefill_tokens`` they take the dense path, so this measures Seer's overhead on them).
* ``mixed``: short requests arriving on a fixed (seeded) Poisson schedule while a few long prompts
  arrive among them: request throughput, TTFT and ITL percentiles per request class.

Each workload returns a JSON-able record; :func:`summarize` turns per-request results into it.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

from e2e_client import percentile, stream_completion

TAIL = 256  # unique prompt tokens per stream of the batch workload


@dataclass(frozen=True)
class Job:
    """One request of a workload: sent ``delay_s`` after the workload starts."""

    cls: str  # request class ("long", "short", "stream")
    delay_s: float
    prompt: list[int]
    max_tokens: int


def rand_tokens(tag: str, n: int, lo: int, hi: int) -> list[int]:
    rng = random.Random(zlib.crc32(tag.encode()))
    return [rng.randrange(lo, hi) for _ in range(n)]


def batch_jobs(tag: str, streams: int, length: int, max_tokens: int, lo: int,
               hi: int) -> tuple[list[int], list[Job]]:
    """``(shared prefix, jobs)``: ``streams`` prompts of ``length`` tokens sharing all but ``TAIL``."""
    prefix = rand_tokens(f"{tag}|prefix|{length}", length - TAIL, lo, hi)
    jobs = [Job("stream", 0.0, prefix + rand_tokens(f"{tag}|tail|{i}", TAIL, lo, hi), max_tokens)
            for i in range(streams)]
    return prefix, jobs


def burst_jobs(tag: str, n: int, length: int, max_tokens: int, lo: int, hi: int) -> list[Job]:
    """``n`` requests of ``length`` tokens, all sent at once."""
    return [Job("short", 0.0, rand_tokens(f"{tag}|burst|{i}", length, lo, hi), max_tokens)
            for i in range(n)]


def mixed_jobs(tag: str, n_short: int, short_len: int, rate_per_s: float, n_long: int,
               long_len: int, max_tokens: int, lo: int, hi: int) -> list[Job]:
    """Short requests at Poisson arrivals (``rate_per_s``); the long ones spread evenly over the
    short ones' arrival window (the first after a tenth of it)."""
    rng = random.Random(zlib.crc32(f"{tag}|arrivals".encode()))
    t, jobs = 0.0, []
    for i in range(n_short):
        jobs.append(Job("short", t, rand_tokens(f"{tag}|short|{i}", short_len, lo, hi), max_tokens))
        t += rng.expovariate(rate_per_s)
    for i in range(n_long):
        at = t * (0.1 + 0.8 * i / max(1, n_long - 1)) if n_long > 1 else 0.1 * t
        jobs.append(Job("long", at, rand_tokens(f"{tag}|long|{i}", long_len, lo, hi), max_tokens))
    return sorted(jobs, key=lambda j: j.delay_s)


def run_jobs(port: int, model: str, jobs: list[Job], timeout: float) -> tuple[float, list[dict]]:
    """Send every job from its own thread at its delay; ``(makespan_s, results)`` in job order.
    A failed request's result holds ``error`` instead of timings."""
    results: list[dict[str, Any]] = [{} for _ in jobs]
    t0 = time.perf_counter()

    def one(i: int, job: Job) -> None:
        wait = job.delay_s - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
        sent = time.perf_counter() - t0
        try:
            res = stream_completion(port, model, job.prompt, job.max_tokens, timeout)
        except (OSError, RuntimeError, TimeoutError) as e:
            results[i] = {"cls": job.cls, "sent_s": sent, "error": f"{type(e).__name__}: {e}"}
            return
        results[i] = {"cls": job.cls, "sent_s": sent, "prompt_len": len(job.prompt),
                      "ttft_s": res["ttft_s"], "e2e_s": res["e2e_s"],
                      "completion_tokens": res["completion_tokens"],
                      "gaps": [b - a for a, b in zip(res["chunk_times"], res["chunk_times"][1:],
                                                     strict=False)]}

    threads = [threading.Thread(target=one, args=(i, j), daemon=True) for i, j in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout + max((j.delay_s for j in jobs), default=0.0) + 30)
    return time.perf_counter() - t0, results


def _pcts(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    return {"p50": statistics.median(xs), "p90": percentile(xs, 90), "p99": percentile(xs, 99),
            "mean": statistics.fmean(xs)}


def summarize(makespan_s: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput and latency percentiles of one workload, overall and per request class.

    ``requests_per_s`` = completed requests / makespan (first send to last completion);
    ``output_tokens_per_s`` likewise; TTFT and ITL (gaps between a request's streamed tokens after
    its first) as p50 / p90 / p99 / mean in seconds."""
    done = [r for r in results if "error" not in r and r]
    out: dict[str, Any] = {
        "requests": len(results), "completed": len(done),
        "errors": [r.get("error", "no result") for r in results if "error" in r or not r][:5],
        "makespan_s": makespan_s,
        "requests_per_s": len(done) / makespan_s if makespan_s > 0 else None,
        "output_tokens_per_s": (sum(r["completion_tokens"] for r in done) / makespan_s
                                if makespan_s > 0 else None),
        "classes": {},
    }
    for cls in sorted({r["cls"] for r in done}):
        rs = [r for r in done if r["cls"] == cls]
        out["classes"][cls] = {"n": len(rs), "ttft_s": _pcts([r["ttft_s"] for r in rs]),
                               "itl_s": _pcts([g for r in rs for g in r["gaps"]])}
    return out
