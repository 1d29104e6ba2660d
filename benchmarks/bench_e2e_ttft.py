"""End-to-end TTFT / decode ITL of ``vllm serve`` with Seer vs FLASH_ATTN and TRITON_ATTN (issue 4).

Model: the Llama-3.1-8B architecture with random weights (``--load-format dummy``: the model folder
holds only ``config.json`` and a project-made tokenizer, no weights file), plus a random gate
checkpoint of the right shapes in top-k (``nz_ratio``) mode, so the density is fixed by the setting.
Everything is built offline and deterministically on first use (a few seconds).

For each backend named in ``--backends`` (``FLASH_ATTN``, ``TRITON_ATTN``, ``seer@0.3``, ``seer@0.1``,
``seer@0.05``; ``default`` = no ``--attention-backend`` flag) the script starts one real ``vllm serve``
(``vllm_seer.testing.SeerServer``; eager, bf16, ``--max-model-len 131072``, default chunked prefill,
prefix caching on, seed 0), warms it up, then for each prompt length sends random token-id prompts
(unique per backend, length and repeat, so never a prefix-cache hit) through the streaming
completions API and measures, client side, the time to the first streamed token (TTFT) and the gaps
between later tokens (decode inter-token latency). After each request it reads ``/metrics``: vLLM's
own TTFT histogram and, for Seer, the block counters (achieved density) and the gate / sparse-attention
time histograms (share of the TTFT), all as per-request deltas. Results are appended to a JSON file
after every request (a run cut short keeps what it measured). A wall-clock budget (``--budget-s``)
skips what would not fit, so one invocation stays inside a 10-minute limit.

``--report A.json [B.json ...]`` turns the JSON files into the markdown table (and the issue's
goals, marked met / missed). ``--dry-run`` runs the whole orchestration on a CPU machine with a
tiny model of the same kind (2 layers, float32, 512 / 1024-token prompts, the CPU default backend
and ``seer@0.3``).
``--serve-args`` adds vLLM flags to every server (``--tensor-parallel-size 2``: the layouts of
``benchmarks/gpu/parallel_check.py``), ``--compiled`` drops ``--enforce-eager``.

Prompt lengths: 8192, 32768 and 130944 (= 131072 - 64 decode tokens - 64, a whole number of 64-token
blocks; labelled 128k). Each length runs ``--repeats`` times (default 2; TTFT = the minimum), except
that a request slower than ``--repeat-limit-s`` (30 s: TRITON_ATTN at 128k, ~62 s) is not repeated.
Seer metrics are published by the workers at most once a second on CUDA, at the next engine step, so
after each Seer request the script waits 1.2 s and sends a 3-token request before reading them.

GPU host (vLLM 0.26, one invocation per 10-minute command; estimated: server start-up ~1.5-2 min,
FLASH_ATTN ~2.5 min in all, TRITON_ATTN ~3.5 min, each Seer density ~3 min)::

    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends FLASH_ATTN,seer@0.1 \\
        --out $OUT/ttft-1.json
    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends TRITON_ATTN,seer@0.05 \\
        --out $OUT/ttft-2.json
    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends seer@0.3 --out $OUT/ttft-3.json
    python benchmarks/bench_e2e_ttft.py --report ttft-1.json ttft-2.json ttft-3.json \\
        --report-out benchmarks/results/e2e-ttft-h100.md
"""

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
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from e2e_client import (
    SEER_SERIES,
    VLLM_SERIES,
    collect_env,
    delta,
    itl_stats,
    scrape,
    stream_completion,
)
from e2e_model import SCHEMA, ensure_model, model_config, regular_token_range
from e2e_report import length_label, load_runs, parse_backend, render_report

GPU_LENGTHS = (8192, 32768, 131072 - 64 - 64)  # 128k: max-model-len - max_tokens - 64 = 130944 (2046 blocks)
DRY_LENGTHS = (512, 1024)
ALL_GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "seer@0.3", "seer@0.1", "seer@0.05")
FLUSH_WAIT_S = 1.2  # Seer workers publish metrics at most once a second on CUDA (next engine step)

# -- running one backend ---------------------------------------------------------------------------------

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
             *([] if args.compiled else ["--enforce-eager"]), "--dtype", args.dtype, "--seed", "0",
             *shlex.split(args.serve_args)]
    if not args.dry_run:
        flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
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
    lo, hi = regular_token_range(model_config(args.dry_run))
    run_id = f"{backend}-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    record: dict[str, Any] = {
        "run_id": run_id, "backend": backend, "kind": name, "density_setting": density, "env": env_info,
        "settings": {"flags": flags, "additional_config": additional, "max_tokens": args.max_tokens,
                     "lengths": lengths, "repeats": args.repeats, "dry_run": args.dry_run},
        "server": {}, "requests": [], "skipped": [], "error": None,
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
        _measure(srv, backend, args, clock, lengths, record, is_seer, lo, hi)
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
    warm = make_prompt(backend, args.warmup_tokens, "warmup", lo, hi)
    res = stream_completion(srv.port, srv.model_name, warm, 8, timeout=min(args.request_timeout, 300))
    clock.log(f"{backend}: warm-up {len(warm)} tokens TTFT {res['ttft_s']:.3f} s")
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


# -- main ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated, any of {','.join(ALL_GPU_BACKENDS)} or default (no flag); "
                    "default FLASH_ATTN,seer@0.1 (dry run: default,seer@0.3)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "ttft.json",
                    help="JSON file results are appended to (server logs are copied beside it)")
    ap.add_argument("--lengths", default=None, help="prompt lengths in tokens (default 8192,32768,130944)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--repeat-limit-s", type=float, default=30.0,
                    help="a request slower than this is not repeated (TRITON_ATTN at 128k)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="decode tokens per request, for the ITL (default 64; dry run 16)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="warm-up prompt (default 20000: longer than the Seer path's 16384-token "
                         "CUDA default, so every kernel has run before timing)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget of this invocation; what would not fit is skipped")
    ap.add_argument("--min-server-s", type=float, default=200.0,
                    help="do not start a server with less budget left than this")
    ap.add_argument("--startup-timeout", type=float, default=420.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="model folder (built if missing; default $TMPDIR/vllm-seer-bench-llama31-8b)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default 131072 (dry run 2048)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="chunk size; not set by default (vLLM's default chunked prefill)")
    ap.add_argument("--seer-extra", default="{}", help="more Seer settings as JSON, e.g. "
                    '\'{"last_block_dense": false}\'')
    ap.add_argument("--serve-args", default="",
                    help="more vllm serve flags for every backend, e.g. '--tensor-parallel-size 2'")
    ap.add_argument("--compiled", action="store_true",
                    help="without --enforce-eager (torch.compile and CUDA graphs; slower start-up)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU check of the whole flow: tiny model, 512/1024 tokens, default + seer@0.3")
    ap.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSON",
                    help="render the markdown table from these JSON files and exit")
    ap.add_argument("--report-out", type=Path, default=None,
                    help="where --report writes (default: stdout only)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.lengths = args.lengths or ",".join(map(str, DRY_LENGTHS))
        args.budget_s = max(args.budget_s, 1800.0)
        args.min_server_s = min(args.min_server_s, 60.0)
        seer_extra = {"min_prefill_tokens": 256, **json.loads(args.seer_extra)}
        args.seer_extra = json.dumps(seer_extra)
    args.backends = args.backends or ("default,seer@0.3" if args.dry_run else "FLASH_ATTN,seer@0.1")
    args.max_model_len = args.max_model_len or (2048 if args.dry_run else 131072)
    args.max_tokens = args.max_tokens or (16 if args.dry_run else 64)
    args.dtype = args.dtype or ("float32" if args.dry_run else "bfloat16")
    args.warmup_tokens = args.warmup_tokens or (300 if args.dry_run else 20000)
    if args.model_dir is None:
        import tempfile

        name = "vllm-seer-bench-tiny" if args.dry_run else "vllm-seer-bench-llama31-8b"
        args.model_dir = Path(tempfile.gettempdir()) / name
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def gpu_memory_used() -> str:
    """``nvidia-smi`` memory in use (a server left over from a killed run would show here)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
        if res.returncode == 0:
            return res.stdout.strip()
    return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        text = render_report(load_runs(args.report))
        if args.report_out:
            args.report_out.parent.mkdir(parents=True, exist_ok=True)
            args.report_out.write_text(text)
        print(text, flush=True)
        return 0
    clock = Clock(args.budget_s)
    signal.signal(signal.SIGTERM, _on_sigterm)  # `timeout` sends SIGTERM: stop the servers cleanly
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        parse_backend(b)  # fail early on a bad name
    lengths = [int(x) for x in (args.lengths or ",".join(map(str, GPU_LENGTHS))).split(",")]
    too_long = [n for n in lengths if n + args.max_tokens > args.max_model_len]
    if too_long:
        raise SystemExit(f"prompt lengths {too_long} + max_tokens {args.max_tokens} exceed "
                         f"--max-model-len {args.max_model_len}")
    args.out = args.out.resolve()
    clock.log(f"building / checking the model folder {args.model_dir}")
    ensure_model(args.model_dir, tiny=args.dry_run)
    env_info = collect_env()
    clock.log(f"env: {json.dumps(env_info)}; GPU memory used now: {gpu_memory_used()}")
    clock.log(f"backends {backends}, lengths {lengths}, repeats {args.repeats}, max_tokens {args.max_tokens},"
              f" budget {args.budget_s:.0f} s, results → {args.out}")
    failed = 0
    for b in backends:
        rec = run_backend(b, args, env_info, clock, lengths)
        failed += rec["error"] is not None
    clock.log(f"done; {failed} backend(s) with errors; results in {args.out}")
    print(render_report(load_runs([args.out])), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
