"""GPU correctness of the CUDA Seer backend inside real vLLM (run on the GPU test host).

Serves the project's tiny Llama (bf16, ``vllm_seer.tiny_model``) several times and compares greedy
tokens on a fixed prompt set:

1. density 1 (``nz_ratio`` 1.0): Seer equals ``--attention-backend TRITON_ATTN`` (eager);
2. sparse (threshold, ``last_block_dense`` off, as in the CPU test): unchunked without prefix
   caching is the reference; 256-token chunks with prefix caching on give the same tokens for the
   full prompt and for a prompt that re-uses 768 cached tokens (a prefix-cache hit);
3. the same sparse settings with CUDA graphs on (no ``--enforce-eager``; decode runs in FlashAttention
   full graphs) give the eager tokens;
and reads the Seer metrics of each run (density, sparse tokens, gate / attention seconds measured by
CUDA events). Writes ``$OUT/e2e_check.json``; exit code 1 when an equality fails.

Usage (GPU host, package importable): ``cd /tmp && python /path/to/e2e_check.py``
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from pathlib import Path

from vllm_seer.testing import SeerServer, ensure_test_model, metric_sum, parse_metrics

ERROR_LINE = re.compile(r"^(\(\S+ pid=\d+\) )?ERROR ")
BASE = ["--dtype", "bfloat16", "--max-model-len", "4096", "--gpu-memory-utilization", "0.3",
        "--seed", "0"]
EAGER = [*BASE, "--enforce-eager"]
SPARSE = {"sparsity_method": "threshold", "threshold": 0.08, "last_block_dense": False,
          "min_prefill_tokens": 64}


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    ps = [[rng.randrange(3, 2000) for _ in range(n)] for n in (3000, 1024, 700, 300, 2048)]
    ps.append(ps[1][:768] + list(reversed(ps[1][768:])))  # shares 768 tokens with prompt 1
    return ps


def run(name: str, model: Path, cfg: dict | None, extra: list[str]) -> dict:
    t0 = time.time()
    with SeerServer(model, cfg, extra, startup_timeout=500) as srv:
        up = time.time() - t0
        outs = [srv.completion(p, 16)["token_ids"] for p in prompts()]
        samples = parse_metrics(srv.metrics_text())
        hits = sum(parse_metrics(srv.metrics_text(), "vllm:prefix_cache_hits").values())
        log = srv.log()
    res = {"name": name, "startup_s": round(up, 1), "outputs": outs,
           "computed": metric_sum(samples, "vllm:seer_blocks_computed_total"),
           "possible": metric_sum(samples, "vllm:seer_blocks_possible_total"),
           "sparse_tokens": metric_sum(samples, "vllm:seer_prefill_tokens_total", path="sparse"),
           "dense_tokens": metric_sum(samples, "vllm:seer_prefill_tokens_total", path="dense"),
           "gate_s": metric_sum(samples, "vllm:seer_gate_seconds_sum"),
           "attn_s": metric_sum(samples, "vllm:seer_sparse_attention_seconds_sum"),
           "prefix_cache_hit_tokens": hits,
           "log_errors": [ln[-300:] for ln in log.splitlines()
                          if "Traceback" in ln or ERROR_LINE.match(ln)],
           "log_backend": [ln[-200:] for ln in log.splitlines()
                           if "backend" in ln.lower() or "cudagraph" in ln.lower()][:8]}
    if res["possible"]:
        res["density"] = res["computed"] / res["possible"]
    print(json.dumps({k: v for k, v in res.items() if k != "outputs"}), flush=True)
    return res


def main() -> int:
    model = ensure_test_model(Path("/tmp/tiny-llama"))
    gates = str(model / "gates")
    seer1 = {"seer": {"gates": gates, "sparsity_method": "nz_ratio", "nz_ratio": 1.0,
                      "min_prefill_tokens": 64}}
    sparse = {"seer": {"gates": gates, **SPARSE}}
    runs = {
        "triton": run("TRITON_ATTN", model, None, [*EAGER, "--attention-backend", "TRITON_ATTN"]),
        "seer1": run("SEER_density1", model, seer1, EAGER),
        "unchunked": run("SEER_sparse_unchunked_nocache", model, sparse,
                         [*EAGER, "--max-num-batched-tokens", "4096", "--no-enable-prefix-caching"]),
        "chunked": run("SEER_sparse_chunk256_prefixcache", model, sparse,
                       [*EAGER, "--max-num-batched-tokens", "256"]),
        "graphs": run("SEER_sparse_cudagraphs", model, sparse,
                      [*BASE, "--max-num-batched-tokens", "4096", "--no-enable-prefix-caching"]),
    }

    def same(a: str, b: str) -> list[bool]:
        return [x == y for x, y in zip(runs[a]["outputs"], runs[b]["outputs"], strict=True)]

    checks = {
        "density1_equals_triton": same("triton", "seer1"),
        "chunked_and_prefix_hit_equal_unchunked": same("unchunked", "chunked"),
        "cudagraphs_equal_eager": same("unchunked", "graphs"),
    }
    ok = all(all(v) for v in checks.values())
    ok &= runs["chunked"]["prefix_cache_hit_tokens"] >= 768
    ok &= all(r["computed"] > 0 for k, r in runs.items() if k != "triton")
    ok &= runs["seer1"]["computed"] == runs["seer1"]["possible"]
    ok &= all(r["gate_s"] > 0 and r["attn_s"] > 0 for k, r in runs.items() if k != "triton")
    ok &= not any(r["log_errors"] for r in runs.values())
    summary = {"ok": ok, "checks": checks, "runs": list(runs.values())}
    out = Path(os.environ.get("OUT", "/tmp")) / "e2e_check.json"
    out.write_text(json.dumps(summary, indent=1))
    print("checks", json.dumps(checks), "ok", ok, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
