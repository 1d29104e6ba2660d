"""FP8 KV cache timings for ``bench_kernels.py --kv-dtype bf16,fp8`` (Seer kernels, one GPU).

The bf16 inputs of a benchmark case are quantized as vLLM stores an ``--kv-cache-dtype fp8`` cache
(``x / scale`` in float8_e4m3fn, one per-tensor scale each for K and V, here ``amax / 448``); the
query is timed both as bf16 and quantized the same way (vLLM's FlashAttention backend hands the
attention impl an FP8 query when the cache is FP8). Scales are device tensors, as in the backend.
"""

from __future__ import annotations

import torch
from vllm_seer.kernels.planning import seer_gate
from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as (``float8_e4m3fn`` tensor of ``x / scale``, ``[]`` fp32 device scale)."""
    scale = x.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(FP8), scale


def fp8_caches(q: torch.Tensor, caches: dict) -> dict:
    """FP8 versions of the case's inputs: ``q8``, per page ``caches`` ``(k8, v8, bt)``, the scales
    ``q_scale`` / ``k_scale`` / ``v_scale`` (one K and one V scale for every page size, as a layer
    has), and the dequantized bf16 caches / query (``deq``) the error figures compare against."""
    k_first, v_first, _ = next(iter(caches.values()))
    ks, vs = (c.abs().amax().float().clamp(min=1e-12) / E4M3_MAX for c in (k_first, v_first))
    q8, qs = quantize(q)
    out = {"q8": q8, "q_scale": qs, "k_scale": ks, "v_scale": vs, "caches": {}, "deq": {}}
    for page, (kc, vc, bt) in caches.items():
        k8, v8 = (kc.float() / ks).to(FP8), (vc.float() / vs).to(FP8)
        out["caches"][page] = (k8, v8, bt)
        out["deq"][page] = ((k8.float() * ks).to(kc.dtype), (v8.float() * vs).to(vc.dtype))
    out["q_deq"] = (q8.float() * qs).to(q.dtype)
    return out


def time_fp8_attention(bench, rep: int, q: torch.Tensor, f8: dict, cu, lens, index, count, out,
                       scale: float, bs: int, split) -> dict[str, float]:
    """Per page ``attn_fp8_p{page}`` (bf16 q, FP8 K/V); on the first page also ``attn_fp8q`` (FP8
    q and K/V) and the relative errors of both against the bf16 kernel on the dequantized inputs
    (``fp8_rel_err`` / ``fp8q_rel_err``: the kernels' own error, not the quantization's)."""
    res: dict[str, float] = {}
    kv = {"k_scale": f8["k_scale"], "v_scale": f8["v_scale"]}
    first = next(iter(f8["caches"]))
    for page, (k8, v8, bt) in f8["caches"].items():
        res[f"attn_fp8_p{page}"] = bench(lambda k8=k8, v8=v8, bt=bt: sparse_prefill_paged(
            q, k8, v8, bt, cu, lens, index, count, out, scale, bs, split, **kv), rep)
    k8, v8, bt = f8["caches"][first]
    res["attn_fp8q"] = bench(lambda: sparse_prefill_paged(
        f8["q8"], k8, v8, bt, cu, lens, index, count, out, scale, bs, split,
        q_scale=f8["q_scale"], **kv), rep)
    kd, vd = f8["deq"][first]
    for name, qq, qd, extra in (("fp8_rel_err", q, q, {}),
                                ("fp8q_rel_err", f8["q8"], f8["q_deq"],
                                 {"q_scale": f8["q_scale"]})):
        want = sparse_prefill_paged(qd, kd, vd, bt, cu, lens, index, count,
                                    torch.empty_like(out), scale, bs, split).float()
        got = sparse_prefill_paged(qq, k8, v8, bt, cu, lens, index, count, torch.empty_like(out),
                                   scale, bs, split, **extra, **kv).float()
        res[name] = float((got - want).norm() / want.norm())
    return res


def time_fp8_gate(bench, rep: int, f8: dict, gate_args: tuple, tabs: dict) -> float:
    """The gate (ms) with the FP8 query and cache: ``gate_args`` are ``seer_gate``'s after ``q``
    and ``k_cache`` (block table of the first page size first)."""
    k8 = next(iter(f8["caches"].values()))[0]
    return bench(lambda: seer_gate(f8["q8"], k8, *gate_args, **tabs, q_scale=f8["q_scale"],
                                   k_scale=f8["k_scale"]), rep)


def fp8_goals(rows: list[dict]) -> dict[str, float]:
    """FP8 vs bf16 cache (Llama shapes, random selections, target density 0.1, first page size):
    attention speed-ups with a bf16 / FP8 query, and the whole Seer step (gate + attention)."""
    out: dict[str, float] = {}
    for r in rows:
        if (r["model"] != "llama3.1-8b" or r["kind"] != "random" or r["target"] != 0.1
                or "attn_fp8q" not in r):
            continue
        name = f"{r['L'] // 1024}k"
        out[f"x_fp8kv_attn_d01_{name}"] = r["attn"] / r["attn_fp8"]
        out[f"x_fp8q_attn_d01_{name}"] = r["attn"] / r["attn_fp8q"]
        out[f"x_fp8_seer_d01_{name}"] = (r["gate"] + r["attn"]) / (r["gate_fp8"] + r["attn_fp8q"])
        out[f"fp8q_rel_err_d01_{name}"] = r["fp8q_rel_err"]
    return out


def fmt_fp8(rows: list[dict]) -> str:
    """A markdown table of the rows' FP8 figures (empty when none has them)."""
    rows = [r for r in rows if "attn_fp8q" in r]
    if not rows:
        return ""
    lines = ["", "FP8 KV cache (e4m3, per-tensor scales; first page size): attention with a bf16 "
             "query / an FP8 query (as vLLM's FlashAttention FP8 path hands it); Seer x fp8 = (gate + "
             "attention) on bf16 over the same on FP8 (FP8 query); errors vs the bf16 kernel on the "
             "dequantized inputs.", "",
             "| model | seq | selection | target | attn ms bf16 | attn ms fp8 K/V | attn ms fp8 "
             "q+K/V | x fp8 K/V | x fp8 q+K/V | gate ms bf16 | gate ms fp8 | Seer x fp8 | rel "
             "err fp8 K/V | rel err fp8 q+K/V |", "|" + "---|" * 14]
    for r in rows:
        seer8 = r["gate_fp8"] + r["attn_fp8q"]
        lines.append(
            f"| {r['model']} | {r['L'] // 1024}k | {r['kind']} | {r['target']} | {r['attn']:.3f} "
            f"| {r['attn_fp8']:.3f} | {r['attn_fp8q']:.3f} | {r['attn'] / r['attn_fp8']:.2f} | "
            f"{r['attn'] / r['attn_fp8q']:.2f} | {r['gate']:.3f} | {r['gate_fp8']:.3f} | "
            f"{(r['gate'] + r['attn']) / seer8:.2f} | {r['fp8_rel_err']:.1e} | {r['fp8q_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"
