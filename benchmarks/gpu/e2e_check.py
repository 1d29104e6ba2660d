"""GPU correctness check of the CUDA Seer backend inside real vLLM (run on the GPU test host).

Serves the tiny Llama (bf16) with TRITON_ATTN and with Seer at density 1 (nz_ratio 1.0), compares
greedy tokens on a prompt set, then serves Seer sparse and reports density from /metrics.
Writes a JSON summary to ``$OUT/e2e_check.json``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from vllm_seer.testing import SeerServer, ensure_test_model, metric_sum, parse_metrics

ARGS = ["--dtype", "bfloat16", "--max-model-len", "4096", "--gpu-memory-utilization", "0.3",
        "--enforce-eager", "--seed", "0"]


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 2000) for _ in range(n)] for n in (3000, 1024, 700, 300)]


def run(name: str, model: Path, cfg: dict | None, extra: list[str]) -> dict:
    t0 = time.time()
    with SeerServer(model, cfg, [*ARGS, *extra], startup_timeout=400) as srv:
        up = time.time() - t0
        outs = [srv.completion(p, 16)["token_ids"] for p in prompts()]
        samples = parse_metrics(srv.metrics_text())
        log = srv.log()
    backend_lines = [ln[-200:] for ln in log.splitlines() if "backend" in ln.lower()][:6]
    res = {"name": name, "startup_s": round(up, 1), "outputs": outs, "log": backend_lines,
           "computed": metric_sum(samples, "vllm:seer_blocks_computed_total"),
           "possible": metric_sum(samples, "vllm:seer_blocks_possible_total"),
           "sparse_tokens": metric_sum(samples, "vllm:seer_prefill_tokens_total", path="sparse")}
    print(json.dumps({k: v for k, v in res.items() if k != "outputs"}), flush=True)
    return res


def main() -> int:
    model = ensure_test_model(Path("/tmp/tiny-llama"))
    gates = str(model / "gates")
    results = [run("TRITON_ATTN", model, None, ["--attention-backend", "TRITON_ATTN"])]
    seer1 = {"seer": {"gates": gates, "sparsity_method": "nz_ratio", "nz_ratio": 1.0,
                      "min_prefill_tokens": 64}}
    results.append(run("SEER_density1", model, seer1, []))
    sparse = {"seer": {"gates": gates, "sparsity_method": "nz_ratio", "nz_ratio": 0.3,
                       "min_prefill_tokens": 64}}
    results.append(run("SEER_nz0.3_chunk256", model, sparse, ["--max-num-batched-tokens", "256"]))
    same = results[0]["outputs"] == results[1]["outputs"]
    per_prompt = [a == b for a, b in zip(results[0]["outputs"], results[1]["outputs"], strict=True)]
    summary = {"density1_equals_triton": same, "per_prompt": per_prompt, "runs": results}
    out = Path(os.environ.get("OUT", "/tmp")) / "e2e_check.json"
    out.write_text(json.dumps(summary, indent=1))
    print("density1_equals_triton", same, per_prompt, flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
