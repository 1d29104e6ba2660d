"""The gate of a chunked prefill with and without the pooled-key cache (setting
``pooled_key_cache``), on the GPU, no vLLM needed.

One prompt of ``--tokens`` prefilled in ``--chunk``-token steps, Llama-3.1-8B shapes (32 / 8 heads,
d = 128, gate hidden 128, top-k ``nz_ratio`` 0.1), random K in a paged cache of ``--page``-token
pages: per step the whole gate (:func:`vllm_seer.kernels.planning.seer_gate`) is timed with CUDA
events (median of ``--repeats``), without a cache and with one (its invalidation by the step's
slot mapping included). The selections must be identical. Prints a table, writes ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _now(dev: str) -> object:
    """A start mark: a recorded CUDA event, or the host clock on the CPU."""
    if dev == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _elapsed_ms(t0: object, dev: str) -> float:
    if dev == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        torch.cuda.synchronize()
        return t0.elapsed_time(ev)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import triton
    from vllm_seer.kernels.paged_pool.key_cache import PooledKeyCache, slots_of
    from vllm_seer.kernels.planning import SeerBuffers, plan_batch, seer_gate

    from vllm_seer.gate import Selection, block_rope_table, group_gate_weight
    from vllm_seer.rope import RopeSpec

    hq, hkv, d, bs = 32, 8, 128, 64
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, tiny sizes
    sel = Selection("nz_ratio", 0.0, 0.1, True)
    torch.manual_seed(0)
    pages = -(-a.tokens // a.page)
    k_cache = torch.randn(pages, a.page, hkv, d, dtype=torch.bfloat16, device=dev)
    table = torch.randperm(pages, device=dev).to(torch.int32)[None]
    inv = RopeSpec(d, 500000.0).inv_freq().to(dev)
    weight = torch.randn(hq, 3 * d, d, device=dev) / math.sqrt(3 * d)
    grouped = group_gate_weight(weight, hkv)
    max_blocks = -(-a.tokens // bs)
    rope = block_rope_table(inv, max_blocks, bs)
    positions = block_rope_table(inv, a.tokens, 1)
    kc = PooledKeyCache.allocate(1, pages * a.page, a.page, bs, hkv, d, dev)
    rows, total = [], {"off": 0.0, "on": 0.0}
    for start in range(0, a.tokens, a.chunk):
        n = min(a.chunk, a.tokens - start)
        end = start + n
        q = torch.randn(n, hq, d, dtype=torch.bfloat16, device=dev)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        lens = torch.tensor([end], dtype=torch.int32, device=dev)
        slots = slots_of(table[0], start, end, a.page)
        times, picks = {}, {}
        for mode in ("off", "on"):
            bufs = SeerBuffers.allocate(plan_batch([0, n], [end], bs), hq, hkv, d, dev)
            bufs.set_topk([end], sel)
            ts = []
            for r in range(a.repeats + 1):
                t0 = _now(dev)
                layer = None
                if mode == "on":
                    # the builder's invalidation; repeats of a step re-run its own slots (their
                    # entries were stored by the first run: the steady state is one run per step)
                    kc.begin_step(slots)
                    layer = kc.layer(0)
                seer_gate(q, k_cache, table, cu, lens, weight, inv, sel, bufs, rope, grouped,
                          rope_positions=positions, key_cache=layer)
                if r:  # the first run compiles / autotunes
                    ts.append(_elapsed_ms(t0, dev))
            times[mode] = statistics.median(ts)
            picks[mode] = (bufs.block_index.clone(), bufs.block_count.clone())
        same = all(torch.equal(x, y) for x, y in zip(picks["off"], picks["on"], strict=True))
        if not same:
            raise SystemExit(f"step at {start}: the selections differ with the cache")
        for mode in total:
            total[mode] += times[mode]
        rows.append({"context": end, "gate_ms_off": times["off"], "gate_ms_on": times["on"]})
        print(f"{end:>7} {times['off']:8.3f} {times['on']:8.3f} ms", flush=True)
    print(f"total gate over the prompt: {total['off']:.2f} ms without, {total['on']:.2f} ms with "
          f"the cache ({total['off'] / total['on']:.2f}x); selections identical")
    summary = {"date": str(datetime.date.today()),
               "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               "versions": {"torch": torch.__version__, "triton": triton.__version__},
               "tokens": a.tokens, "chunk": a.chunk, "page": a.page, "repeats": a.repeats,
               "total_ms_off": total["off"], "total_ms_on": total["on"],
               "cache_mib": kc.nbytes / 2**20, "steps": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
