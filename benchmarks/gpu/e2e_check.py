"""GPU correctness of the CUDA Seer backend inside real vLLM (run on the GPU test host).

Serves the project's tiny Llama (bf16, ``vllm_seer.tiny_model``) several times; per prompt it
records the greedy tokens (16) and the teacher-forced prompt log-probabilities (``prompt_logprobs``,
which do not depend on where two greedy runs first diverge). bf16 kernels that sum in a different
order differ in the last bits, and a random tiny model has near-tied logits, so token equality
alone cannot tell a bug from rounding: two dense vLLM backends (FLASH_ATTN vs TRITON_ATTN) give the
noise floor of the log-probabilities, and each comparison is judged against it.

1. density 1 (``nz_ratio`` 1.0): Seer vs ``TRITON_ATTN`` within the dense-vs-dense noise floor;
2. sparse (threshold, ``last_block_dense`` off, as in the CPU test): unchunked without prefix
   caching is the reference; 256-token chunks with prefix caching on give the same tokens and
   log-probabilities for the full prompts and for one that re-uses 768 cached tokens (a hit);
   the same chunked run with the pooled-key cache (``pooled_key_cache``) gives bit-identical
   log-probabilities and tokens (the gate gets the values it would have pooled);
3. the same sparse settings with full CUDA graphs for decode (``cudagraph_mode FULL_DECODE_ONLY``,
   no torch.compile, so prefill numerics are the eager ones): the prefill log-probabilities equal
   the eager ones, and the greedy continuations diverge from eager decode only where FLASH_ATTN's
   own do. The control is FLASH_ATTN served the same two ways (eager and decode graphs, same
   flags): FA3 picks its split-KV schedule differently under graph capture, so on near-tied logits
   even FLASH_ATTN alone continues differently (3 of 6 prompts on the H200, 2026-12-02). Counting
   differing prompts cannot tell such ties from a bug; so each run records the top-5 log-probs of
   every generated token, and at the first position where eager and graphs continue differently
   the *margin* is how far apart the two candidate tokens are in each run's own log-probs (the
   larger of the two; infinite when one run did not rank the other's token in its top 5). Seer
   passes when every one of its margins is at most the tie tolerance: twice the largest margin of
   the control's divergences, or twice the dense-vs-dense prompt log-prob noise floor, at least
   0.05 (:func:`graph_tolerance`).
and reads the Seer metrics of each run (density, sparse tokens, gate / attention seconds measured by
CUDA events). Writes ``$OUT/e2e_check.json``; exit code 1 when a check fails.

Usage (GPU host, package importable): ``cd /tmp && python /path/to/e2e_check.py``; in split calls
``--runs flash,triton,seer1`` then ``--runs unchunked,chunked,graphs --compare DIR`` and so on.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from vllm_seer.testing import (
    SeerServer,
    ServerError,
    ensure_test_model,
    metric_sum,
    parse_metrics,
)

ERROR_LINE = re.compile(r"^(\(\S+ pid=\d+\) )?ERROR ")
LAYER_LABEL = re.compile(r'layer="(\d+)"')
BASE = ["--dtype", "bfloat16", "--max-model-len", "4096", "--gpu-memory-utilization", "0.3",
        "--seed", "0"]
EAGER = [*BASE, "--enforce-eager"]
SPARSE = {"sparsity_method": "threshold", "threshold": 0.08, "last_block_dense": False,
          "min_prefill_tokens": 64}
NEW_TOKENS, TOP_K = 16, 5
TIE_MIN = 0.05  # smallest tie tolerance (log-prob), whatever the control shows
TOKEN_ID = "token_id:"


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    ps = [[rng.randrange(3, 2000) for _ in range(n)] for n in (3000, 1024, 700, 300, 2048)]
    ps.append(ps[1][:768] + list(reversed(ps[1][768:])))  # shares 768 tokens with prompt 1
    return ps


def prompt_logprobs(srv: SeerServer, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i = 1..T-1 (one prefill, teacher forced)."""
    body = {"model": srv.model_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 0}
    plp = srv.post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
    return [float(plp[i][str(ids[i])]["logprob"]) for i in range(1, len(ids))]


def greedy(srv: SeerServer, ids: list[int]) -> tuple[list[int], list[list[list[float]]]]:
    """``NEW_TOKENS`` greedy tokens and, per generated position, the top ``TOP_K``
    ``[token_id, logprob]`` pairs (token ids, not strings: byte-level pieces can collide)."""
    body = {"model": srv.model_name, "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0.0,
            "return_token_ids": True, "logprobs": TOP_K, "return_tokens_as_token_ids": True}
    choice = srv.post("/v1/completions", body)["choices"][0]
    top = [[[int(tok.removeprefix(TOKEN_ID)), float(lp)] for tok, lp in pos.items()]
           for pos in choice["logprobs"]["top_logprobs"]]
    return list(choice["token_ids"]), top


def lp_diff(a: dict, b: dict) -> dict[str, float]:
    """Largest and mean absolute difference of the prompt log-probs of two runs (all prompts)."""
    d = [abs(x - y) for pa, pb in zip(a["prompt_lp"], b["prompt_lp"], strict=True)
         for x, y in zip(pa, pb, strict=True)]
    return {"max": max(d), "mean": sum(d) / len(d)}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (``None``: equal)."""
    for j, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return j
    return None


def divergence_margin(out_a: list[int], top_a: list[list[list[float]]], out_b: list[int],
                      top_b: list[list[list[float]]]) -> tuple[int, float] | None:
    """Where two greedy continuations of one prompt part and how clear each run's choice was.

    Returns ``None`` when they are equal, else ``(position, margin)``: at the first differing
    position ``j`` (both runs saw the same context up to there), run A picked ``a``, run B ``b``;
    the margin is ``max(lp_A(a) - lp_A(b), lp_B(b) - lp_B(a))``, ``inf`` when a run's top-k lacks
    the other's token. A near tie has a margin of rounding size.
    """
    j = first_divergence(out_a, out_b)
    if j is None:
        return None
    a, b = out_a[j], out_b[j]
    lps_a, lps_b = dict(map(tuple, top_a[j])), dict(map(tuple, top_b[j]))
    gap_a = lps_a[a] - lps_a[b] if a in lps_a and b in lps_a else math.inf
    gap_b = lps_b[b] - lps_b[a] if a in lps_b and b in lps_b else math.inf
    return j, max(gap_a, gap_b)


def graph_divergences(eager: dict, graphs: dict) -> dict[str, Any]:
    """Per prompt: tokens equal, and ``[position, margin]`` of each divergence."""
    for run in (eager, graphs):
        if "top_logprobs" not in run:
            raise ValueError(f"run {run['name']!r}: its JSON has no top_logprobs (written by an "
                             "older e2e_check.py); run it again")
    equal, margins = [], []
    for oa, ta, ob, tb in zip(eager["outputs"], eager["top_logprobs"], graphs["outputs"],
                              graphs["top_logprobs"], strict=True):
        d = divergence_margin(oa, ta, ob, tb)
        equal.append(d is None)
        if d is not None:
            margins.append([d[0], d[1]])
    return {"tokens_equal": equal, "divergences": margins}


def graph_tolerance(control: dict[str, Any], floor: dict[str, float]) -> float:
    """The largest margin a Seer eager-vs-graphs divergence may have and still count as a tie:
    twice the control's largest finite margin or twice the dense noise floor's largest prompt
    log-prob difference, at least ``TIE_MIN``."""
    finite = [m for _, m in control["divergences"] if math.isfinite(m)]
    return max(TIE_MIN, 2 * floor["max"], 2 * max(finite, default=0.0))


def run(name: str, model: Path, cfg: dict | None, extra: list[str]) -> dict:
    t0 = time.time()
    try:
        return _run(name, model, cfg, extra, t0)
    except ServerError as e:
        print(f"{name}: {e}\n" + "\n".join(e.log.splitlines()[-40:]), flush=True)
        raise


def _run(name: str, model: Path, cfg: dict | None, extra: list[str], t0: float) -> dict:
    with SeerServer(model, cfg, extra, startup_timeout=500) as srv:
        up = time.time() - t0
        gen = [greedy(srv, p) for p in prompts()]
        lps = [prompt_logprobs(srv, p) for p in prompts()[:5]]  # the 6th would be a cache hit
        time.sleep(1.5)  # Seer workers publish their counters at most once a second
        srv.completion([5, 6, 7], 1)  # an engine step after that, so the last snapshot is written
        samples = parse_metrics(srv.metrics_text())
        hits = metric_sum(parse_metrics(srv.metrics_text(), "vllm:prefix_cache_hits"),
                          "vllm:prefix_cache_hits_total")
        log = srv.log()
    res = {"name": name, "startup_s": round(up, 1), "outputs": [g[0] for g in gen],
           "top_logprobs": [g[1] for g in gen], "prompt_lp": lps,
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
    layers = sorted({int(m.group(1)) for k in samples if (m := LAYER_LABEL.search(k))})
    res["per_layer"] = {key: [metric_sum(samples, f"vllm:seer_blocks_{key}_total", layer=str(i))
                              for i in layers] for key in ("computed", "possible")}
    if res["possible"]:
        res["density"] = res["computed"] / res["possible"]
    brief = {k: v for k, v in res.items()
             if k not in ("outputs", "top_logprobs", "prompt_lp", "log_backend", "per_layer")}
    print(json.dumps(brief), flush=True)
    return res


# flash_eager / flash_graphs: the FLASH_ATTN control of the eager-vs-graphs comparison, served
# with the flags of unchunked / graphs
RUN_NAMES = ("flash", "triton", "seer1", "unchunked", "chunked", "graphs", "flash_eager",
             "flash_graphs", "keycache")
SEER_RUNS = ("seer1", "unchunked", "chunked", "graphs", "keycache")


DENSITY1_RUNS = ("flash", "triton", "seer1")


def plans(gates: str, cache: list[str] | None = None, seer_extra: dict | None = None
          ) -> dict[str, tuple[str, dict | None, list[str]]]:
    """Run key -> (name, additional config, server flags); ``cache``: flags added to every server
    (e.g. ``--kv-cache-dtype fp8``); ``seer_extra``: settings added to every Seer server's."""
    table = _plans(gates)
    if seer_extra:
        table = {k: (n, c if c is None else {"seer": {**c["seer"], **seer_extra}}, f)
                 for k, (n, c, f) in table.items()}
    return {k: (n, c, [*flags, *(cache or [])]) for k, (n, c, flags) in table.items()}


def _plans(gates: str) -> dict[str, tuple[str, dict | None, list[str]]]:
    seer1 = {"seer": {"gates": gates, "sparsity_method": "nz_ratio", "nz_ratio": 1.0,
                      "min_prefill_tokens": 64}}
    sparse = {"seer": {"gates": gates, **SPARSE}}
    graphs = ["--compilation-config",
              json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})]
    unchunked = ["--max-num-batched-tokens", "4096", "--no-enable-prefix-caching"]
    flash = ["--attention-backend", "FLASH_ATTN"]
    return {
        "flash": ("FLASH_ATTN", None, [*EAGER, *flash]),
        "triton": ("TRITON_ATTN", None, [*EAGER, "--attention-backend", "TRITON_ATTN"]),
        "seer1": ("SEER_density1", seer1, EAGER),
        "unchunked": ("SEER_sparse_unchunked_nocache", sparse, [*EAGER, *unchunked]),
        "chunked": ("SEER_sparse_chunk256_prefixcache", sparse,
                    [*EAGER, "--max-num-batched-tokens", "256"]),
        "graphs": ("SEER_sparse_full_decode_graphs", sparse, [*BASE, *unchunked, *graphs]),
        "keycache": ("SEER_sparse_chunk256_prefixcache_pooled_key_cache",
                     {"seer": {**sparse["seer"], "pooled_key_cache": True}},
                     [*EAGER, "--max-num-batched-tokens", "256"]),
        "flash_eager": ("FLASH_ATTN_unchunked_nocache", None, [*EAGER, *unchunked, *flash]),
        "flash_graphs": ("FLASH_ATTN_full_decode_graphs", None,
                         [*BASE, *unchunked, *graphs, *flash]),
    }


def judge(runs: dict[str, dict]) -> tuple[bool, dict[str, Any]]:
    """All checks over the runs (keys of ``RUN_NAMES``): ``(ok, checks)``."""

    def same(a: str, b: str) -> list[bool]:
        return [x == y for x, y in zip(runs[a]["outputs"], runs[b]["outputs"], strict=True)]

    floor, d1, ok = density1_check(runs)
    chunk = lp_diff(runs["chunked"], runs["unchunked"])
    control = graph_divergences(runs["flash_eager"], runs["flash_graphs"])
    seer_graphs = graph_divergences(runs["unchunked"], runs["graphs"])
    tol = graph_tolerance(control, floor)
    graphs_lp = lp_diff(runs["graphs"], runs["unchunked"])
    keycache = lp_diff(runs["keycache"], runs["chunked"])
    checks = {
        "noise_floor_flash_vs_triton": {"tokens_equal": same("flash", "triton"), "lp": floor},
        "density1_vs_triton": {"tokens_equal": same("triton", "seer1"), "lp": d1},
        "chunked_and_prefix_hit_vs_unchunked": {"tokens_equal": same("unchunked", "chunked"),
                                                "lp": chunk},
        "control_flash_decode_graphs_vs_eager": {
            **control, "lp": lp_diff(runs["flash_graphs"], runs["flash_eager"])},
        "decode_graphs_vs_eager": {**seer_graphs, "lp": graphs_lp, "tie_tolerance": tol},
        "pooled_key_cache_vs_chunked": {"tokens_equal": same("chunked", "keycache"),
                                        "lp": keycache},
    }
    # the same kernels on the same selections: chunking / a cache hit must not move anything
    ok &= chunk["max"] <= max(floor["max"], 0.02) and all(same("unchunked", "chunked"))
    # decode graphs: the (eager) prefill unchanged; continuations part only at near ties, of the
    # size FLASH_ATTN's own eager-vs-graphs divergences have
    ok &= graphs_lp["max"] <= max(floor["max"], 0.02)
    ok &= all(m <= tol for _, m in seer_graphs["divergences"])
    ok &= runs["chunked"]["prefix_cache_hit_tokens"] >= 768
    # the pooled-key cache hands the gate the very values it would pool: bit-identical
    ok &= keycache["max"] == 0.0 and all(same("chunked", "keycache"))
    ok &= runs["keycache"]["prefix_cache_hit_tokens"] >= 768
    ok &= all(runs[k]["computed"] > 0 for k in SEER_RUNS)
    ok &= runs["seer1"]["computed"] == runs["seer1"]["possible"]
    ok &= all(runs[k]["gate_s"] > 0 and runs[k]["attn_s"] > 0 for k in SEER_RUNS)
    ok &= not any(r["log_errors"] for r in runs.values())
    return bool(ok), checks


def density1_check(runs: dict[str, dict]) -> tuple[dict[str, float], dict[str, float], bool]:
    """``(noise floor, density-1 difference, ok)``: Seer at density 1 must be as close to
    TRITON_ATTN as FLASH_ATTN is (the two dense vLLM kernels: rounding only; 2x slack on the
    mean, 1.5x on the max)."""
    floor = lp_diff(runs["flash"], runs["triton"])
    d1 = lp_diff(runs["seer1"], runs["triton"])
    return floor, d1, d1["mean"] <= 2 * floor["mean"] and d1["max"] <= 1.5 * max(floor["max"], 0.02)


def judge_density1(runs: dict[str, dict]) -> tuple[bool, dict[str, Any]]:
    """The density-1 check alone (``DENSITY1_RUNS``; e.g. over an FP8 KV cache, where the noise
    floor is FLASH_ATTN vs TRITON_ATTN on the same FP8 cache)."""
    floor, d1, ok = density1_check(runs)
    same = [x == y for x, y in zip(runs["triton"]["outputs"], runs["seer1"]["outputs"], strict=True)]
    checks = {"noise_floor_flash_vs_triton": {"lp": floor},
              "density1_vs_triton": {"tokens_equal": same, "lp": d1}}
    ok &= runs["seer1"]["computed"] == runs["seer1"]["possible"] > 0
    ok &= runs["seer1"]["gate_s"] > 0 and runs["seer1"]["attn_s"] > 0
    ok &= not any(runs[k]["log_errors"] for k in DENSITY1_RUNS)
    return bool(ok), checks


def load_runs(folders: list[str]) -> dict[str, dict]:
    """The per-run JSONs of earlier calls (later folders win)."""
    runs = {}
    for folder in folders:
        for f in Path(folder).glob("e2e_run_*.json"):
            runs[f.stem.removeprefix("e2e_run_")] = json.loads(f.read_text())
    return runs


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=None,
                    help="which servers to run now (default: all of the mode; results of earlier "
                         "calls are read from --dir)")
    ap.add_argument("--dir", default=os.environ.get("OUT", "/tmp"),
                    help="one JSON per run is written here; --compare reads them")
    ap.add_argument("--compare", nargs="*", default=None,
                    help="only compare: folders holding the run JSONs of earlier calls")
    ap.add_argument("--kv-cache-dtype", default=None,
                    help="served with this --kv-cache-dtype (e.g. fp8); only the density-1 runs "
                         f"({','.join(DENSITY1_RUNS)}) and check apply")
    ap.add_argument("--seer-extra", type=json.loads, default=None,
                    help='settings added to every Seer server\'s, e.g. \'{"pooled_key_cache": true}\'')
    args = ap.parse_args()
    cache = ["--kv-cache-dtype", args.kv_cache_dtype] if args.kv_cache_dtype else []
    names = DENSITY1_RUNS if cache else RUN_NAMES
    if args.compare is None:
        keys = args.runs.split(",") if args.runs else list(names)
        unknown = [k for k in keys if k not in names]
        if unknown:
            ap.error(f"--runs: unknown run(s) {unknown}; expected some of {','.join(names)}")
        model = ensure_test_model(Path("/tmp/tiny-llama"))
        table = plans(str(model / "gates"), cache, args.seer_extra)
        for key in keys:
            name, cfg, extra = table[key]
            res = run(name, model, cfg, extra)
            (Path(args.dir) / f"e2e_run_{key}.json").write_text(json.dumps(res))
    runs = load_runs([args.dir, *(args.compare or [])])
    missing = [k for k in names if k not in runs]
    if missing:
        print("runs still missing (compare later):", missing, flush=True)
        return 0
    try:
        ok, checks = judge_density1(runs) if cache else judge(runs)
    except ValueError as e:  # a run JSON of an older script
        print(f"cannot judge: {e}", flush=True)
        return 2
    summary = {"ok": ok, "kv_cache_dtype": args.kv_cache_dtype or "auto",
               "seer_extra": args.seer_extra, "checks": checks,
               "runs": [runs[k] for k in names]}
    out = Path(args.dir) / "e2e_check.json"
    out.write_text(json.dumps(summary, indent=1))
    print("checks", json.dumps(checks), "ok", ok, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
