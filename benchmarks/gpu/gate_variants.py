"""Time every autotune config of the gate's scores and selection kernels (GPU, no vLLM needed).

Llama-3.1-8B shapes (32 / 8 heads, head_dim 128, gate hidden 128), top-k ``nz_ratio`` 0.1 with
the last two query-block rows dense, random pooled inputs. Shapes: a whole prompt of ``L`` tokens
prefilled at once (``MQB = MKB = L / 64``) and, with ``--chunk``, one chunked-prefill step (the
last ``chunk`` rows of an ``L``-token prompt, as vLLM's default 8k chunks give). The configs the
kernels had before they were autotuned are ``BM 64 BN 64 w4 s1`` (scores) and one warp with the
tie-breaking scan in every row (selection; timed by this script at commit a2ec828 as
``TIE_BRANCH: False``, see ``benchmarks/results/gate-variants-h100.md``). Prints one table;
``--json`` writes the numbers.

    python3 benchmarks/gpu/gate_variants.py --seqs 32768,131072 --chunk 8192 --json $OUT/gv.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
from triton.testing import do_bench
from vllm_seer.kernels.block_select import triton as bsel
from vllm_seer.kernels.planning import SeerBuffers, plan_batch

from vllm_seer.gate import Selection, block_rope_table, group_gate_weight
from vllm_seer.rope import RopeSpec

HQ, HKV, D, BS = 32, 8, 128, 64


def _case(L: int, rows: int) -> dict:
    """Inputs of one gate call: ``rows`` query rows at the end of an ``L``-token context."""
    dev = "cuda"
    cu = torch.tensor([0, rows], dtype=torch.int32, device=dev)
    lens = torch.tensor([L], dtype=torch.int32, device=dev)
    bufs = SeerBuffers.allocate(plan_batch([0, rows], [L]), HQ, HKV, D, dev)
    sel = Selection("nz_ratio", 0.0, 0.1, True)
    bufs.set_topk([L], sel)
    bufs.q_pooled.normal_()
    bufs.k_pooled.normal_()
    inv = RopeSpec(D, 500000.0).inv_freq().to(dev)
    weight = torch.randn(HQ, 3 * D, D, device=dev) / math.sqrt(3 * D)
    mqb, mkb = bufs.plan.max_qblocks, bufs.plan.max_kblocks
    grouped = group_gate_weight(weight, HKV)
    kp = bufs.k_pooled.reshape(mkb, HKV, 3 * D).transpose(0, 1)
    k_gate = torch.matmul(kp, grouped)
    return dict(bufs=bufs, cu=cu, lens=lens, mqb=mqb, mkb=mkb, k_gate=k_gate,
                table=block_rope_table(inv, mkb, BS), topk=bufs.topk)


def time_scores(c: dict, cfg: triton.Config) -> float:
    b = c["bufs"]
    mqb, mkb = c["mqb"], c["mkb"]
    strides = c["k_gate"].view(HKV, 1, mkb, HQ // HKV, D).stride()[:4]

    def run() -> None:
        bsel._scores_kernel.fn[(triton.cdiv(mqb, cfg.kwargs["BM"]), 1, HQ)](
            b.q_pooled, c["k_gate"], b.scores, c["table"], c["cu"], c["lens"],
            1.0 / math.sqrt(D), mqb, mkb, *b.q_pooled.stride()[:3], *strides,
            HQ=HQ, GROUP=HQ // HKV, G=D, BLOCK=BS, PRECISION="tf32x3", **cfg.kwargs,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    return do_bench(run, warmup=20, rep=200)


def time_select(c: dict, cfg: triton.Config) -> float:
    b = c["bufs"]
    mqb, mkb = c["mqb"], c["mkb"]

    def run() -> None:
        bsel._select_kernel.fn[(mqb, 1, HQ)](
            b.scores, c["topk"], b.block_index, b.block_count, c["cu"], c["lens"], 0.0, mqb, mkb, 0,
            HQ=HQ, BLOCK=BS, BLOCK_K=triton.next_power_of_2(mkb), TOPK=True, LAST_DENSE=True,
            **cfg.kwargs, num_warps=cfg.num_warps, num_stages=1)

    return do_bench(run, warmup=20, rep=200)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="32768,131072")
    ap.add_argument("--chunk", type=int, default=8192, help="also one chunk step (0: no)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    results = []
    shapes = [(int(L), int(L)) for L in a.seqs.split(",")]
    if a.chunk:
        shapes += [(int(L), a.chunk) for L in a.seqs.split(",") if int(L) > a.chunk]
    for L, rows in shapes:
        c = _case(L, rows)
        time_scores(c, bsel._scores_configs()[0])  # fills the scores the selection reads
        for cfg in bsel._scores_configs():
            ms = time_scores(c, cfg)
            results.append(dict(kernel="scores", L=L, rows=rows, config=str(cfg.kwargs),
                                warps=cfg.num_warps, stages=cfg.num_stages, ms=ms))
        time_scores(c, bsel._scores_configs()[0])
        for cfg in bsel._prune_select(bsel._select_configs(), {},
                                      BLOCK_K=triton.next_power_of_2(c["mkb"])):
            ms = time_select(c, cfg)
            results.append(dict(kernel="select", L=L, rows=rows, config=str(cfg.kwargs),
                                warps=cfg.num_warps, stages=1, ms=ms))
        del c
        torch.cuda.empty_cache()
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {triton.__version__}")
    print("| kernel | context | rows | config | warps | stages | ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['kernel']} | {r['L']} | {r['rows']} | {r['config']} | {r['warps']} | "
              f"{r['stages']} | {r['ms']:.4f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
