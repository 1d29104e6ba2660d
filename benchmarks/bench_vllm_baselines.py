"""Seer prefill vs vLLM's own dense kernels on the same paged KV cache (GPU test host, vLLM bundle).

Llama-3.1-8B attention shapes (32 q / 8 kv heads, d=128), one request prefilled at once, page 16, bf16.
In one run: cuDNN SDPA (contiguous), vLLM FlashAttention 3 (``vllm.vllm_flash_attn``, varlen with
``block_table``), vLLM's Triton unified attention (paged; skipped at 128k, where one call takes seconds)
and Seer (gate included, top-k) at densities 1.0 and 0.1. Writes a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch
import triton
from triton.testing import do_bench
from vllm_seer.kernels.planning import SeerBuffers, plan_batch, seer_gate
from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged

from vllm_seer.gate import Selection
from vllm_seer.rope import RopeSpec

HQ, HKV, D, PAGE = 32, 8, 128, 16


def _unified():
    try:  # vLLM 0.32+
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except ImportError:  # vLLM 0.26
        from vllm.attention.ops.triton_unified_attention import unified_attention
    return unified_attention


def case(L: int, rep: int) -> dict[str, float]:
    import vllm
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(L, HQ, D, device=dev, dtype=dt)
    k = torch.randn(L, HKV, D, device=dev, dtype=dt)
    v = torch.randn(L, HKV, D, device=dev, dtype=dt)
    n_pages = L // PAGE
    perm = torch.randperm(n_pages, device=dev)
    k_cache = torch.empty(n_pages, PAGE, HKV, D, device=dev, dtype=dt)
    v_cache = torch.empty_like(k_cache)
    k_cache[perm] = k.view(n_pages, PAGE, HKV, D)
    v_cache[perm] = v.view(n_pages, PAGE, HKV, D)
    bt = perm.to(torch.int32)[None]
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    lens = torch.tensor([L], dtype=torch.int32, device=dev)
    scale = 1 / math.sqrt(D)
    out = torch.empty_like(q)
    res: dict[str, float] = {"vllm": vllm.__version__}  # type: ignore[dict-item]
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    kt, vt = kt.repeat_interleave(HQ // HKV, 1), vt.repeat_interleave(HQ // HKV, 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        res["cudnn"] = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True), rep=rep)
    res["fa3"] = do_bench(lambda: flash_attn_varlen_func(
        q, k_cache, v_cache, L, cu, L, seqused_k=lens, softmax_scale=scale, causal=True,
        block_table=bt, out=out, fa_version=3), rep=rep)
    if L <= 32768:
        ua = _unified()
        res["triton_unified"] = do_bench(lambda: ua(
            q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu, max_seqlen_q=L, seqused_k=lens,
            max_seqlen_k=L, softmax_scale=scale, causal=True, window_size=(-1, -1),
            block_table=bt, softcap=0, q_descale=None, k_descale=None, v_descale=None), rep=rep)
    inv = RopeSpec(D, 500000.0).inv_freq().to(dev)
    weight = (torch.randn(HQ, 3 * D, D, device=dev) / math.sqrt(3 * D)).to(dt)
    bufs = SeerBuffers.allocate(plan_batch([0, L], [L]), HQ, HKV, D, dev)
    for dens in (1.0, 0.1):
        sel = Selection("nz_ratio", 0.0, dens, True)

        def seer(sel: Selection = sel) -> None:
            seer_gate(q, k_cache, bt, cu, lens, weight, inv, sel, bufs)
            sparse_prefill_paged(q, k_cache, v_cache, bt, cu, lens, bufs.block_index,
                                 bufs.block_count, out, scale)

        res[f"seer{dens}"] = do_bench(seer, rep=rep)
        causal = (L // 64) * (L // 64 + 1) / 2 * HQ
        res[f"density{dens}"] = float(bufs.block_count.sum()) / causal
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="8192,32768,131072")
    ap.add_argument("--out", default="benchmarks/results/kernels-vllm-h100.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for L in (int(s) for s in args.seqs.split(",")):
        r = case(L, rep=100 if L < 131072 else 600)
        rows.append((L, r))
        print(L, r, flush=True)
    lines = [
        "# Seer vs vLLM dense kernels on the same paged KV cache",
        "",
        f"Date {datetime.date.today()}; {torch.cuda.get_device_name()}; vLLM {rows[0][1]['vllm']}; "
        f"torch {torch.__version__}; triton {triton.__version__}. Llama-3.1-8B attention shapes "
        f"(32/8 heads, d=128), one request, page {PAGE}, bf16, top-k, gate included. Times in ms "
        "(`triton.testing.do_bench`); ratios = baseline time / Seer time.",
        "",
        "| seq | cuDNN | vLLM FA3 | vLLM Triton | Seer d=1.0 (achieved) | Seer d=0.1 (achieved) | "
        "x FA3 @0.1 | x cuDNN @0.1 | x Triton @0.1 | x FA3 @1.0 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for L, r in rows:
        tri = r.get("triton_unified", float("nan"))
        lines.append(
            f"| {L // 1024}k | {r['cudnn']:.2f} | {r['fa3']:.2f} | {tri:.2f} | "
            f"{r['seer1.0']:.2f} ({r['density1.0']:.2f}) | {r['seer0.1']:.2f} "
            f"({r['density0.1']:.3f}) | {r['fa3'] / r['seer0.1']:.2f} | "
            f"{r['cudnn'] / r['seer0.1']:.2f} | {tri / r['seer0.1']:.2f} | "
            f"{r['fa3'] / r['seer1.0']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
