"""128-row pair tiles vs 64-row tiles alone: the sparse prefill timed both ways (GPU, no vLLM).

Llama-3.1-8B shapes (32 / 8 heads, d=128), bf16, vLLM's packed K|V rows on 64-token pages (the
CUDA backend's default; TMA boxes), long-row split as the backend runs it. Cases per length ``L``:
``prompt`` (all ``L`` rows in one step) and, with ``--chunk``, ``chunk`` (the last ``chunk`` rows
over the whole ``L`` context: one step of vLLM's chunked prefill). Selections as
``benchmarks/bench_kernels.py`` makes them: ``random`` (the gate's top-k on random inputs),
``structured`` and ``real`` (``benchmarks/real_selections.py``); the chunk takes the last rows
of the prompt's lists. For each ``--ratios`` value the pair planner's ``max_ratio``: time, speed
over the 64-row kernel, the fraction of rows run in pairs, the work ratio of the union tiles and
the output's relative difference to the 64-row kernel's. Timings include the planner's launch.

    python3 benchmarks/gpu/pair_variants.py --seqs 8192,32768,131072 --chunk 8192 \\
        --json $OUT/pair-variants.json

``--dry-run`` runs every variant once on the CPU (Triton interpreter, no timing; small ``--seqs``
such as ``1024 --chunk 512``) to check the script before GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cpu" if DRY else "cuda"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import BS, MODELS, _bench, _gate_tables, _paged_kv, _seer_lists  # noqa: E402
from vllm_seer.kernels.planning import SeerBuffers, plan_batch, seer_gate  # noqa: E402
from vllm_seer.kernels.sparse_prefill import pairs as pr  # noqa: E402
from vllm_seer.kernels.sparse_prefill.pairs import plan_pairs  # noqa: E402
from vllm_seer.kernels.sparse_prefill.pairs_naive import PairWork  # noqa: E402
from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged  # noqa: E402

from vllm_seer.gate import Selection  # noqa: E402
from vllm_seer.rope import RopeSpec  # noqa: E402


def _lists(kind: str, dens: float, L: int, rows: int, q, k_cache, bt, real: str) -> tuple:
    """``(block_index, block_count, bufs)`` of the last ``rows`` query rows of an ``L``-token
    prompt (``rows == L``: the whole prompt), with the buffers the backend would plan."""
    hq, hkv, d, theta = MODELS["llama3.1-8b"]
    dev = DEV
    inv = RopeSpec(d, theta).inv_freq().to(dev)
    weight = (torch.randn(hq, 3 * d, d, device=dev) / math.sqrt(3 * d)).to(torch.bfloat16)
    cu = torch.tensor([0, rows], dtype=torch.int32, device=dev)
    lens = torch.tensor([L], dtype=torch.int32, device=dev)
    bufs = SeerBuffers.allocate(plan_batch([0, rows], [L]), hq, hkv, d, dev)
    sel = Selection("nz_ratio", 0.0, dens, True)
    bufs.set_topk([L], sel)
    tabs = _gate_tables(weight, inv, hkv, L)
    if kind == "random":
        seer_gate(q[-rows:], k_cache, bt, cu, lens, weight, inv, sel, bufs, **tabs)
        return bufs.block_index, bufs.block_count, bufs
    full = SeerBuffers.allocate(plan_batch([0, L], [L]), hq, hkv, d, dev) if rows < L else bufs
    index, count = _seer_lists(kind, dens, L, hq, dev, None, full, real)
    mq = bufs.plan.max_qblocks
    return index[:, :, -mq:].contiguous(), count[:, :, -mq:].contiguous(), bufs


PAIR_CONFIGS = list(pr._pair_kernel.configs)


def time_it(fn, rep: int) -> float:
    """``do_bench`` mean in ms (NaN in a dry run)."""
    return float("nan") if DRY else _bench(fn, rep)


def run(L: int, rows: int, kinds: list[str], densities: list[float], ratios: list[float],
        rep: int, real: str, stages: list[int | None]) -> list[dict]:
    """``stages``: pin the pair kernel to its autotune config of that many stages (``None``: let
    it autotune, on the first call of each process)."""
    hq, hkv, d, _ = MODELS["llama3.1-8b"]
    dev = DEV
    q = torch.randn(L, hq, d, dtype=torch.bfloat16, device=dev)
    k = torch.randn(L, hkv, d, dtype=torch.bfloat16, device=dev)
    v = torch.randn(L, hkv, d, dtype=torch.bfloat16, device=dev)
    k_cache, v_cache, bt = _paged_kv(k, v, 64)
    qs = q[-rows:]
    cu = torch.tensor([0, rows], dtype=torch.int32, device=dev)
    lens = torch.tensor([L], dtype=torch.int32, device=dev)
    scale = 1.0 / math.sqrt(d)
    out = []
    for kind in kinds:
        for dens in densities:
            index, count, bufs = _lists(kind, dens, L, rows, q, k_cache, bt, real)
            o_ref = torch.empty_like(qs)

            def base(o=o_ref, ix=index, ct=count, b=bufs):
                sparse_prefill_paged(qs, k_cache, v_cache, bt, cu, lens, ix, ct, o, scale, BS,
                                     b.split)

            base()
            t0 = time_it(base, rep)
            nqb = count.shape[-1]
            row = dict(L=L, rows=rows, case="prompt" if rows == L else "chunk", kind=kind,
                       target=dens, density=float(count.double().sum()
                                                  / (hq * (nqb * (L // BS) - nqb * (nqb - 1) / 2))),
                       ms_rows=t0, pairs={})
            for r, st in ((r, st) for r in ratios for st in stages):
                pinned = [c for c in PAIR_CONFIGS if st is None or c.num_stages == st]
                pr._pair_kernel.configs, pr._pair_kernel.cache = pinned, {}
                work = PairWork.allocate(hq, nqb, dev, 256, r)
                o = torch.empty_like(qs)

                def paired(o=o, ix=index, ct=count, b=bufs, w=work):
                    sparse_prefill_paged(qs, k_cache, v_cache, bt, cu, lens, ix, ct, o, scale,
                                         BS, b.split, pairs=w)

                paired()
                err = float((o.float() - o_ref.float()).norm() / o_ref.float().norm())
                t = time_it(paired, rep)
                t_plan = time_it(lambda ix=index, ct=count, w=work: plan_pairs(
                    ix, ct, cu, lens, w, BS), rep)
                npairs = hq * -(-nqb // 2)
                uc = work.union_count[:npairs].double()
                ca = count.flatten().double()
                taken_rows = work.paired[:hq * nqb].double()
                own = float((ca * taken_rows).sum())
                row["pairs"][f"{r}" if st is None else f"{r}/s{st}"] = dict(
                    ms=t, plan_ms=t_plan, x=t0 / t, paired_rows=float(taken_rows.mean()),
                    work_ratio=float(2 * uc.sum() / own) if own else float("nan"), rel_err=err)
            print(json.dumps(row), flush=True)
            out.append(row)
            del index, count, bufs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="8192,32768,131072")
    ap.add_argument("--chunk", type=int, default=8192, help="0: whole prompts only")
    ap.add_argument("--kinds", default="random,structured,real")
    ap.add_argument("--densities", default="0.1,0.05")
    ap.add_argument("--ratios", default="1.1,1.25,1.5")
    ap.add_argument("--stages", default="",
                    help="comma list: time the pair kernel pinned to each autotune config of that "
                         "many stages (default: autotuned once)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--real", default=str(Path(__file__).resolve().parents[1] / "data"
                                          / "smollm2-selections-8k.safetensors"))
    ap.add_argument("--json", default="")
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter, no timing")
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    dens = [float(x) for x in a.densities.split(",")]
    ratios = [float(x) for x in a.ratios.split(",")]
    stages = [int(x) for x in a.stages.split(",")] if a.stages else [None]
    rows = []
    for L in (int(x) for x in a.seqs.split(",")):
        rows += run(L, L, kinds, dens, ratios, a.rep, a.real, stages)
        if a.chunk and a.chunk < L:
            rows += run(L, a.chunk, kinds, dens, ratios, a.rep, a.real, stages)
    print(f"{'L':>7} {'case':>6} {'kind':>10} {'dens':>5} {'rows ms':>8} "
          + " ".join(f"{'r' + str(r) + ('' if st is None else f'/s{st}') + ' ms x paired plan':>29}"
                     for r in ratios for st in stages))
    for r in rows:
        cells = " ".join(f"{p['ms']:7.3f} {p['x']:5.2f}x {p['paired_rows']:4.2f}p "
                         f"{p['plan_ms']:6.3f}"
                         for p in r["pairs"].values())
        print(f"{r['L']:>7} {r['case']:>6} {r['kind']:>10} {r['density']:5.3f} "
              f"{r['ms_rows']:8.3f} {cells}")
    if a.json:
        from vllm_seer.kernels.sparse_prefill import triton as sp

        meta = dict(device="cpu (dry run)" if DRY else torch.cuda.get_device_name(),
                    pair_config=str(getattr(pr._pair_kernel, "best_config", None)),
                    rows_config=str(getattr(sp._sparse_prefill_kernel, "best_config", None)),
                    torch=torch.__version__,
                    triton=__import__("triton").__version__)
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
