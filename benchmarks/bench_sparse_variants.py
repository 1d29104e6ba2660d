"""Time the sparse prefill kernel's load and order variants against each other and cuDNN (GPU).

One GPU call compares what ``kernels/sparse_prefill/triton.py`` can be told to do: K/V loads by
pointers or by tensor descriptors (TMA, pages that are a multiple of the 64-token gate block) and
the program order (``band`` 0: query block slowest across all heads; ``band`` N: bands of N query
blocks, KV-head-major inside). Llama-3.1-8B shapes (32 / 8 heads, d=128), one request prefilled at
once, bf16, gate lists from the gate's own top-k on random inputs (as ``bench_kernels.py``'s
``random`` kind), the long dense rows split as the backend does; every variant is re-autotuned and
checked against the pointer / band 0 output. Example::

    python benchmarks/bench_sparse_variants.py --seqs 8192,32768,131072 --out $OUT/variants.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import BS, MODELS, _bench, _gate_tables, _paged_kv  # noqa: E402
from vllm_seer.kernels.planning import SeerBuffers, plan_batch, seer_gate  # noqa: E402
from vllm_seer.kernels.sparse_prefill import triton as sp  # noqa: E402

from vllm_seer.gate import Selection  # noqa: E402
from vllm_seer.rope import RopeSpec  # noqa: E402


def _cudnn_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rep: int) -> float:
    """cuDNN SDPA, causal, on contiguous ``[1, Hq, L, D]`` (K/V repeated to the query heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)[None]
    kt = k.transpose(0, 1)[None].repeat_interleave(g, 1)
    vt = v.transpose(0, 1)[None].repeat_interleave(g, 1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return _bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True), rep)


def run_length(L: int, variants: list[tuple[int, bool, int]], densities: list[float],
               rep: int) -> list[dict]:
    hq, hkv, d, theta = MODELS["llama3.1-8b"]
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(L, hq, d, dtype=dt, device=dev)
    k = torch.randn(L, hkv, d, dtype=dt, device=dev)
    v = torch.randn(L, hkv, d, dtype=dt, device=dev)
    caches = {p: _paged_kv(k, v, p) for p in sorted({p for p, _, _ in variants})}
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    lens = torch.tensor([L], dtype=torch.int32, device=dev)
    inv = RopeSpec(d, theta).inv_freq().to(dev)
    weight = (torch.randn(hq, 3 * d, d, device=dev) / math.sqrt(3 * d)).to(dt)
    bufs = SeerBuffers.allocate(plan_batch([0, L], [L]), hq, hkv, d, dev)
    tabs = _gate_tables(weight, inv, hkv, L)
    scale = 1.0 / math.sqrt(d)
    cudnn = _cudnn_ms(q, k, v, rep)
    print(f"{L}: cuDNN {cudnn:.3f} ms", flush=True)
    rows = []
    for dens in densities:
        sel = Selection("nz_ratio", 0.0, dens, True)
        bufs.set_topk([L], sel)
        seer_gate(q, caches[min(caches)][0], caches[min(caches)][2], cu, lens, weight, inv, sel,
                  bufs, **tabs)
        index, count = bufs.block_index.clone(), bufs.block_count.clone()
        blocks = count.double().sum().item()
        nqb = count.shape[-1]
        density = blocks / (hq * nqb * (nqb + 1) / 2)
        ref = None
        for page, tma, band in variants:
            kc, vc, bt = caches[page]
            out = torch.full_like(q, float("nan"))
            sp._sparse_prefill_kernel.cache.clear()  # tune each variant under its own order

            def call(kc=kc, vc=vc, bt=bt, out=out, tma=tma, band=band, index=index,
                     count=count):
                sp.sparse_prefill_paged(q, kc, vc, bt, cu, lens, index, count, out, scale, BS,
                                        bufs.split, tma=tma, band=band)

            call()
            if ref is None:
                ref = out.clone()
            err = float((out.float() - ref.float()).abs().max())
            ms = _bench(call, rep)
            row = dict(L=L, target=dens, density=density, page=page, tma=tma, band=band, ms=ms,
                       x_cudnn=cudnn / ms, tflops=4.0 * d * BS * BS * blocks / ms / 1e9,
                       max_abs_diff=err, finite=bool(torch.isfinite(out).all()),
                       config=str(sp._sparse_prefill_kernel.best_config), cudnn=cudnn)
            rows.append(row)
            print({k2: (round(x, 4) if isinstance(x, float) else x) for k2, x in row.items()},
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="8192,32768,131072")
    ap.add_argument("--densities", default="0.1,1.0")
    ap.add_argument("--variants", default="16:0:0,16:0:64,64:0:0,64:1:0,64:1:32,64:1:128",
                    help="comma list of page:tma:band")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms); x4 at 128k")
    ap.add_argument("--out", default="variants.json")
    args = ap.parse_args()
    variants = [(int(p), bool(int(t)), int(b)) for p, t, b in
                (x.split(":") for x in args.variants.split(","))]
    t0 = time.time()
    rows: list[dict] = []
    meta = dict(device=torch.cuda.get_device_name(), date=str(datetime.date.today()),
                versions=dict(torch=torch.__version__, triton=triton.__version__,
                              python=platform.python_version()))
    for L in (int(x) for x in args.seqs.split(",")):
        dens = [float(x) for x in args.densities.split(",")]
        rows += run_length(L, variants, dens, args.rep * (4 if L >= 131072 else 1))
        Path(args.out).write_text(json.dumps(dict(meta, rows=rows, wall_s=time.time() - t0),
                                             indent=1))
    print(f"wall {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
