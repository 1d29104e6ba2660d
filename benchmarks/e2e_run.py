"""Running one backend for ``bench_e2e_ttft.py``: its ``vllm serve``, the single-request TTFT /
decode ITL phase, and the concurrent workloads of :mod:`e2e_load` (``batch``, ``short``, ``mixed``)
and the short-prompt ``sweep``. Every result is saved to the JSON file after each request or
workload, so a run cut short keeps what it measured."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import shlex
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

from e2e_client import SEER_SERIES, VLLM_SERIES, delta, itl_stats, scrape, stream_completion
from e2e_load import batch_jobs, burst_jobs, mixed_jobs, run_jobs, summarize
from e2e_model import SCHEMA, model_config, regular_token_range
from e2e_report import length_label, page_variant, parse_backend

FLUSH_WAIT_S = 1.2  # Seer workers publish metrics at most once a second on CUDA (next engine step)

class Clock:
    """Wall-clock budget of the invocation; ``log`` prints timestamped progress lines (flushed)."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)


def make_prompt(backend: str, length: int, repeat: int | str, lo: int, hi: int) -> list[int]:
    """Random token ids, deterministic and unique per (backend, length, repeat)."""
    rng = random.Random(zlib.crc32(f"{backend}|{length}|{repeat}".encode()))
    return [rng.randrange(lo, hi) for _ in range(length)]


def server_args(args: argparse.Namespace, backend: str) -> tuple[dict[str, Any] | None, list[str]]:
    """``(additional_config, extra flags)`` of ``vllm serve`` for one backend."""
    name, density = parse_backend(backend)
    flags = ["--load-format", "dummy", "--max-model-len", str(args.max_model_len),
             "--dtype", args.dtype, "--seed", "0"]
    if args.eager:  # otherwise vLLM's defaults: torch.compile + CUDA graphs
        flags.append("--enforce-eager")
    if not args.dry_run:
        flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.speculative_config:  # decode ITL with speculation (issue 12, part 5)
        flags += ["--speculative-config", args.speculative_config]
    flags += shlex.split(args.serve_args)  # e.g. the layouts of benchmarks/gpu/parallel_check.py
    page = page_variant(backend)[1]
    if page is not None:  # FLASH_ATTN/p64, seer@0.1/p16: the decode ITL page-size control
        flags += ["--block-size", str(page)]
    if name == "seer":
        seer = {"gates": str(args.model_dir / "gates"), "sparsity_method": "nz_ratio",
                "nz_ratio": density, **json.loads(args.seer_extra)}
        return {"seer": seer}, flags
    if name != "default":
        flags += ["--attention-backend", name]
    return None, flags


LOG_KEYS = ("max_num_batched_tokens", "ttention backend", "Using ", "KV cache", "Maximum concurrency",
            "seer", "Seer", "version", "Chunked prefill", "rror")


def interesting_log_lines(log: str, limit: int = 40) -> list[str]:
    lines = [ln.strip()[-300:] for ln in log.splitlines() if any(k in ln for k in LOG_KEYS)]
    return lines[:limit]


def save_run(path: Path, record: dict[str, Any]) -> None:
    """Insert / replace ``record`` (by ``run_id``) in the JSON file at ``path``, atomically."""
    data: dict[str, Any] = {"schema": SCHEMA, "runs": []}
    if path.is_file():
        data = json.loads(path.read_text())
    data["runs"] = [r for r in data.get("runs", []) if r.get("run_id") != record["run_id"]] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_backend(backend: str, args: argparse.Namespace, env_info: dict[str, Any], clock: Clock,
                lengths: list[int]) -> dict[str, Any]:
    """Serve one backend, warm it up, measure every length; the record is saved after each request."""
    from vllm_seer.testing import SeerServer, ServerError

    name, density = parse_backend(backend)
    is_seer = name == "seer"
    additional, flags = server_args(args, backend)
    lo, hi = regular_token_range(model_config(args.dry_run, args.arch))
    run_id = f"{backend}-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    record: dict[str, Any] = {
        "run_id": run_id, "backend": backend, "kind": name, "density_setting": density, "env": env_info,
        "settings": {"arch": args.arch, "flags": flags, "additional_config": additional,
                     "max_tokens": args.max_tokens,
                     "lengths": lengths, "repeats": args.repeats, "dry_run": args.dry_run,
                     "mode": "eager" if args.eager else "compiled", "phases": args.phases},
        "server": {}, "requests": [], "workloads": {}, "sweep": [], "skipped": [], "error": None,
    }
    if clock.left() < args.min_server_s:
        record["skipped"].append({"what": "server", "why": f"{clock.left():.0f} s left of the budget"})
        clock.log(f"{backend}: skipped (only {clock.left():.0f} s left)")
        save_run(args.out, record)
        return record
    clock.log(f"{backend}: starting vllm serve {' '.join(flags)}"
              + (f" --additional-config {json.dumps(additional)}" if additional else ""))
    srv = SeerServer(args.model_dir, additional, flags,
                     startup_timeout=max(30.0, min(args.startup_timeout, clock.left() - 30)))
    t_start = time.monotonic()
    try:
        try:
            srv.start()
        except ServerError as e:
            record["error"] = f"server did not start: {str(e).splitlines()[0]}"
            record["server"]["log_tail"] = srv.log()[-6000:]
            clock.log(f"{backend}: {record['error']}\n{srv.log()[-3000:]}")
            return record
        log = srv.log()
        record["server"].update(startup_s=round(time.monotonic() - t_start, 1),
                                log_lines=interesting_log_lines(log))
        clock.log(f"{backend}: server up in {record['server']['startup_s']} s")
        for ln in record["server"]["log_lines"][:12]:
            clock.log(f"  log| {ln[-160:]}")
        warm = make_prompt(backend, args.warmup_tokens, "warmup", lo, hi)
        res = stream_completion(srv.port, srv.model_name, warm, 8,
                                timeout=min(args.request_timeout, 300))
        record["warmup"] = {"tokens": len(warm), "ttft_s": res["ttft_s"]}  # the first request
        clock.log(f"{backend}: warm-up {len(warm)} tokens TTFT {res['ttft_s']:.3f} s")
        if "ttft" in args.phases:
            _measure(srv, backend, args, clock, lengths, record, is_seer, lo, hi)
        run_workloads(srv, backend, args, clock, record, lo, hi)
    except Exception as e:  # keep what was measured; the record says what broke
        record["error"] = f"{type(e).__name__}: {e}"
        clock.log(f"{backend}: ERROR {record['error']}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: save, stop the server, then stop
        record["error"] = "interrupted"
        clock.log(f"{backend}: interrupted")
        raise
    finally:
        save_run(args.out, record)
        t_stop = time.monotonic()
        srv.stop()
        clock.log(f"{backend}: server stopped ({time.monotonic() - t_stop:.1f} s)")
        with contextlib.suppress(OSError):
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", backend)
            shutil.copy(srv.log_path, args.out.with_name(f"{args.out.stem}.{safe}.log"))
            srv.log_path.unlink()
    return record


def _flush_seer(srv: Any, lo: int) -> None:
    """Make the workers publish their Seer counters: one more engine step after the flush interval."""
    time.sleep(FLUSH_WAIT_S)
    srv.post("/v1/completions", {"model": srv.model_name, "prompt": [lo + 1, lo + 2, lo + 3],
                                 "max_tokens": 1, "temperature": 0.0}, timeout=60)


def _measure(srv: Any, backend: str, args: argparse.Namespace, clock: Clock, lengths: list[int],
             record: dict[str, Any], is_seer: bool, lo: int, hi: int) -> None:
    if is_seer:
        _flush_seer(srv, lo)
    base = scrape(srv.url)
    last: tuple[int, float] | None = None  # (length, ttft) of the last measured request
    for length in lengths:
        for rep in range(args.repeats):
            estimate = 5.0 if last is None else last[1] * (length / last[0]) ** 2 * 1.1 + 5.0
            if estimate + 15 > clock.left():
                record["skipped"].append({"length": length, "repeat": rep,
                                          "why": f"estimated {estimate:.0f} s, {clock.left():.0f} s left"})
                clock.log(f"{backend}: {length_label(length)} rep {rep} skipped (estimate {estimate:.0f} s, "
                          f"{clock.left():.0f} s left)")
                continue
            prompt = make_prompt(backend, length, rep, lo, hi)
            timeout = min(args.request_timeout, max(30.0, clock.left() - 10))
            clock.log(f"{backend}: {length_label(length)} ({length} tokens) rep {rep} ...")
            res = stream_completion(srv.port, srv.model_name, prompt, args.max_tokens, timeout)
            time.sleep(FLUSH_WAIT_S)  # vLLM records its own stats just after the last chunk
            after_vllm = scrape(srv.url)
            after = after_vllm
            if is_seer:
                _flush_seer(srv, lo)
                after = scrape(srv.url)
            req = {"length": length, "label": length_label(length), "repeat": rep,
                   "ttft_s": res["ttft_s"], "e2e_s": res["e2e_s"], "prompt_tokens": res["prompt_tokens"],
                   "completion_tokens": res["completion_tokens"],
                   **itl_stats(res["chunk_times"], res["completion_tokens"]),
                   **delta(after_vllm, base, VLLM_SERIES)}
            if req["vllm_ttft_count"] >= 1:
                req["vllm_ttft_s"] = req["vllm_ttft_sum"] / req["vllm_ttft_count"]
            if req["vllm_itl_count"] >= 1:
                req["vllm_itl_s"] = req["vllm_itl_sum"] / req["vllm_itl_count"]
            if is_seer:  # (seer_tokens_dense includes the 3 tokens of the flush request)
                req.update(delta(after, base, [*SEER_SERIES, "seer_tokens_sparse", "seer_tokens_dense"]))
                if req["blocks_possible"] > 0:
                    req["density"] = req["blocks_computed"] / req["blocks_possible"]
            base = after
            record["requests"].append(req)
            save_run(args.out, record)
            last = (length, res["ttft_s"])
            extra = ""
            if is_seer:
                extra = (f" density {req.get('density', float('nan')):.3f} gate {req['gate_s']:.3f} s "
                         f"attn {req['sparse_attn_s']:.3f} s sparse tokens {req['seer_tokens_sparse']:.0f}")
            clock.log(f"{backend}: {req['label']} rep {rep} TTFT {res['ttft_s']:.3f} s "
                      f"(vLLM {req.get('vllm_ttft_s', float('nan')):.3f} s) ITL median "
                      f"{req.get('itl_median_s', float('nan')) * 1e3:.2f} ms p90 "
                      f"{req.get('itl_p90_s', float('nan')) * 1e3:.2f} ms, e2e {res['e2e_s']:.2f} s, "
                      f"cache hits {req['prefix_cache_hits']:.0f}{extra}")
            if res["ttft_s"] > args.repeat_limit_s:
                clock.log(f"{backend}: {req['label']} took > {args.repeat_limit_s:.0f} s: not repeated")
                break



# -- concurrent workloads and the short-prompt sweep ----------------------------------------------------

# GPU, 8B model: about 3x the H200 makespans of 2026-12-04 (batch 2.5 s after its 32k prefix, short
# 2.0 s, mixed 7.1 s; raw/e2e-2026-12-04-fa.json), so a phase that fits is not skipped as before
PHASE_ESTIMATE_S = {"batch": 20.0, "short": 15.0, "mixed": 30.0, "sweep": 40.0}


def run_workloads(srv: Any, backend: str, args: argparse.Namespace, clock: Clock,
                  record: dict[str, Any], lo: int, hi: int) -> None:
    """The phases after ``ttft`` named in ``args.phases``, each skipped when its estimate does not
    fit the budget left; each result is saved as soon as it is measured."""
    for phase in [p for p in args.phases if p != "ttft"]:
        need = PHASE_ESTIMATE_S[phase] * (0.25 if args.dry_run else 1.0)
        if clock.left() < need + 15:
            record["skipped"].append({"what": phase, "why": f"estimated {need:.0f} s, "
                                      f"{clock.left():.0f} s left"})
            clock.log(f"{backend}: {phase} skipped ({clock.left():.0f} s left)")
            continue
        timeout = min(args.request_timeout, max(30.0, clock.left() - 10))
        clock.log(f"{backend}: {phase} ...")
        if phase == "sweep":
            for length in args.sweep_lengths:
                for rep in range(args.repeats):
                    prompt = make_prompt(backend, length, f"sweep{rep}", lo, hi)
                    res = stream_completion(srv.port, srv.model_name, prompt, 4, timeout)
                    record["sweep"].append({"length": length, "label": length_label(length),
                                            "repeat": rep, "ttft_s": res["ttft_s"]})
                    clock.log(f"{backend}: sweep {length} rep {rep} TTFT {res['ttft_s']:.4f} s")
            save_run(args.out, record)
            continue
        if phase == "batch":
            prefix, jobs = batch_jobs(backend, args.batch_streams, args.batch_length,
                                      args.max_tokens, lo, hi)
            stream_completion(srv.port, srv.model_name, prefix, 1, timeout)  # fills the cache
        elif phase == "short":
            jobs = burst_jobs(backend, args.short_requests, args.short_length, args.max_tokens,
                              lo, hi)
        else:
            jobs = mixed_jobs(backend, args.mixed_short, args.short_length, args.mixed_rate,
                              args.mixed_long, args.mixed_long_length, args.max_tokens, lo, hi)
        makespan, results = run_jobs(srv.port, srv.model_name, jobs, timeout)
        summary = summarize(makespan, results)
        summary["settings"] = {"requests": len(jobs), "max_tokens": args.max_tokens,
                               "lengths": sorted({len(j.prompt) for j in jobs})}
        record["workloads"][phase] = summary
        save_run(args.out, record)
        clock.log(f"{backend}: {phase}: {summary['completed']}/{summary['requests']} in "
                  f"{makespan:.1f} s ({summary['requests_per_s']:.2f} req/s); "
                  + "; ".join(f"{c} TTFT p50 {v['ttft_s'].get('p50', float('nan')):.3f} s ITL p50 "
                              f"{v['itl_s'].get('p50', float('nan')) * 1e3:.2f} ms"
                              for c, v in summary["classes"].items()))
