"""Where a served long prefill spends its time: vLLM's own torch profiler around real requests.

For each backend (``bench_e2e_ttft.py`` names: ``FLASH_ATTN``, ``seer@0.1``, ...) one ``vllm serve`` of
the bench's model (dummy weights, compiled mode unless ``--eager``) with ``--profiler-config``
(torch profiler, no stacks); ``/start_profile``, the first request after start-up (``--warmup-tokens``),
a pause, one ``--length`` request, ``/stop_profile``. The worker's trace is then read here: GPU
kernel events are split into the two requests at the pause, and per request the script reports the
span from first to last kernel, the time the GPU was busy (union of kernel intervals), the idle
gaps, the kernels by total time, and for the longest idle gaps the host operations running during
them (what the GPU waited for). Writes ``--out`` (JSON) and prints a summary; the traces stay in
``--trace-dir`` (large).

Run on the GPU host (``benchmarks/gpu/setup_host.sh`` sourced), e.g.::

    python benchmarks/gpu/profile_e2e.py --backends FLASH_ATTN,seer@0.1 --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e_ttft import parse_args as bench_args  # noqa: E402
from e2e_client import collect_env, stream_completion  # noqa: E402
from e2e_model import ensure_model, model_config, regular_token_range  # noqa: E402
from e2e_run import make_prompt, server_args  # noqa: E402

PAUSE_S = 3.0  # between the two requests: the split point of the trace
SPLIT_GAP_US = 1.5e6


def load_trace(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def union_busy(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (sorted by start)."""
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy


def category(name: str) -> str:
    n = name.lower()
    if "sparse_prefill" in n or "_combine_kernel" in n or "_plan_kernel" in n:
        return "seer attention"
    if "_pool" in n or "_scores_kernel" in n or "_select_kernel" in n or "sgemm" in n:
        return "seer gate"
    if "flash" in n or "fmha" in n:
        return "flash attention"
    if "gemm" in n or "cutlass" in n or "nvjet" in n or "xmma" in n:
        return "gemm"
    if "reshape_and_cache" in n:
        return "kv write"
    return "other"


def analyse(events: list[dict[str, Any]], top: int = 25, gaps: int = 8) -> list[dict[str, Any]]:
    """Per burst of GPU activity (bursts split at idle gaps > ``SPLIT_GAP_US``)."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e),
                     key=lambda e: e["ts"])
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
    bursts: list[list[dict[str, Any]]] = []
    end = -1e30
    for k in kernels:
        if k["ts"] - end > SPLIT_GAP_US:
            bursts.append([])
        bursts[-1].append(k)
        end = max(end, k["ts"] + k["dur"])
    out = []
    for ks in bursts:
        t0 = ks[0]["ts"]
        t1 = max(k["ts"] + k["dur"] for k in ks)
        busy = union_busy([(k["ts"], k["ts"] + k["dur"]) for k in ks])
        by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        by_cat: dict[str, float] = defaultdict(float)
        for k in ks:
            by_name[k["name"]][0] += 1
            by_name[k["name"]][1] += k["dur"]
            by_cat[category(k["name"])] += k["dur"]
        idle = []
        end = ks[0]["ts"]
        for k in ks:
            if k["ts"] > end:
                idle.append((k["ts"] - end, end, k["ts"]))
            end = max(end, k["ts"] + k["dur"])
        idle.sort(reverse=True)
        long_gaps = []
        for g, s, e in idle[:gaps]:
            during = [c for c in cpu if c["ts"] < e and c["ts"] + c["dur"] > s and c["dur"] > 0.2 * g]
            during.sort(key=lambda c: -c["dur"])
            long_gaps.append({"gap_ms": g / 1e3, "at_ms": (s - t0) / 1e3,
                              "host_ops": [f"{c['name'][:90]} ({c['dur'] / 1e3:.1f} ms)"
                                           for c in during[:6]]})
        out.append({
            "kernels": len(ks), "span_ms": (t1 - t0) / 1e3, "busy_ms": busy / 1e3,
            "idle_ms": (t1 - t0 - busy) / 1e3,
            "idle_gaps_over_50us_ms": sum(g for g, _, _ in idle if g > 50) / 1e3,
            "by_category_ms": {c: v / 1e3 for c, v in sorted(by_cat.items(), key=lambda x: -x[1])},
            "top_kernels": [{"name": n[:120], "count": c, "ms": d / 1e3}
                            for n, (c, d) in sorted(by_name.items(), key=lambda x: -x[1][1])[:top]],
            "longest_gaps": long_gaps,
        })
    return out


def profile_backend(backend: str, args: argparse.Namespace, bench: argparse.Namespace) -> dict:
    from vllm_seer.testing import SeerServer

    trace_dir = args.trace_dir / backend.replace("@", "_")
    trace_dir.mkdir(parents=True, exist_ok=True)
    additional, flags = server_args(bench, backend)
    flags += ["--profiler-config", json.dumps({
        "profiler": "torch", "torch_profiler_dir": str(trace_dir),
        "torch_profiler_with_stack": False, "ignore_frontend": True})]
    lo, hi = regular_token_range(model_config(False, bench.arch))
    rec: dict[str, Any] = {"backend": backend, "flags": flags, "additional_config": additional}
    srv = SeerServer(bench.model_dir, additional, flags, startup_timeout=420)
    t = time.monotonic()
    srv.start()
    try:
        rec["startup_s"] = time.monotonic() - t
        _post_empty(srv, "/start_profile")
        first = stream_completion(srv.port, srv.model_name,
                                  make_prompt(backend, args.warmup_tokens, "warmup", lo, hi), 2, 300)
        time.sleep(PAUSE_S)
        long = stream_completion(srv.port, srv.model_name,
                                 make_prompt(backend, args.length, 0, lo, hi), 2, 300)
        _post_empty(srv, "/stop_profile", timeout=600)
        rec["ttft_first_s"], rec["ttft_long_s"] = first["ttft_s"], long["ttft_s"]
        print(f"{backend}: first request {args.warmup_tokens} tokens TTFT {first['ttft_s']:.3f} s, "
              f"{args.length} tokens TTFT {long['ttft_s']:.3f} s", flush=True)
    finally:
        srv.stop()
    traces = sorted(trace_dir.glob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"{backend}: no trace in {trace_dir}: {list(trace_dir.iterdir())}\n"
                           + srv.log()[-3000:])
    rec["trace"] = str(traces[-1])
    rec["bursts"] = analyse(load_trace(traces[-1]))
    return rec


def _post_empty(srv: Any, path: str, timeout: float = 60.0) -> None:
    import urllib.request

    req = urllib.request.Request(srv.url + path, b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        if r.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {r.status}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="FLASH_ATTN,seer@0.1")
    ap.add_argument("--length", type=int, default=130944)
    ap.add_argument("--warmup-tokens", type=int, default=20000)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--seer-extra", default="{}")
    ap.add_argument("--trace-dir", type=Path, default=Path("/tmp/seer-profiles"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    bench = bench_args(["--backends", args.backends, "--max-tokens", "2",
                        "--seer-extra", args.seer_extra, *(["--eager"] if args.eager else [])])
    ensure_model(bench.model_dir, arch=bench.arch)
    result: dict[str, Any] = {"env": collect_env(), "date": time.strftime("%Y-%m-%d"),
                              "length": args.length, "warmup_tokens": args.warmup_tokens,
                              "mode": "eager" if args.eager else "compiled", "runs": []}
    for b in args.backends.split(","):
        result["runs"].append(profile_backend(b, args, bench))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        for i, burst in enumerate(result["runs"][-1]["bursts"]):
            print(f"{b} burst {i}: span {burst['span_ms']:.1f} ms busy {burst['busy_ms']:.1f} ms "
                  f"idle {burst['idle_ms']:.1f} ms; by category "
                  + ", ".join(f"{c} {v:.1f}" for c, v in burst["by_category_ms"].items()), flush=True)
            for k in burst["top_kernels"][:12]:
                print(f"   {k['ms']:9.2f} ms {k['count']:6d}x {k['name']}")
            for g in burst["longest_gaps"][:5]:
                print(f"   gap {g['gap_ms']:.2f} ms at {g['at_ms']:.1f} ms: {g['host_ops']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
