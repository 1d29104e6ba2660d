"""Seer prefill kernels vs dense and block-sparse baselines on one GPU (writes a markdown table).

Shapes: Llama-3.1-8B attention (32 q / 8 kv heads, d=128) and SmolLM2 (9 / 3, d=64); one request
of 8k / 32k / 128k tokens prefilled at once over a paged KV cache (page size 16, shuffled pages);
top-k densities 1.0 / 0.5 / 0.3 / 0.1 / 0.05.

Timed (``triton.testing.do_bench``, bf16):
* Seer = gate (paged K pooling + Q pooling + scores/top-k) + block-sparse attention;
* attention alone, fed the same block lists; the gate alone;
* cuDNN SDPA causal and SDPA flash (FlashAttention-2) on contiguous dense tensors;
* FlexAttention (torch.compile) with the same 64x64 block mask (off-diagonal blocks full,
  diagonal blocks causal), on contiguous tensors;
* vLLM's own dense kernels on the *same paged cache* when ``import vllm`` works (the GPU test host
  with the vLLM bundle): FlashAttention 3 (``vllm.vllm_flash_attn.flash_attn_varlen_func`` with
  ``block_table``, ``fa_version=3``) and the Triton unified attention kernel.

FP8 KV cache (``--kv-dtype bf16,fp8``): the same cases also timed on an e4m3 cache with per-tensor
scales, with a bf16 and an FP8 query (``benchmarks/bench_fp8.py``); bf16 is always the baseline.

Usage: ``python benchmarks/bench_kernels.py --out benchmarks/results/kernels-h100.md``
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import bench_fp8
import torch
import triton
from flex_baseline import FLEX_CONFIGS, block_mask_dense, flex_block_mask, time_flex_configs
from triton.testing import do_bench
from vllm_seer.kernels.planning import SeerBuffers, plan_batch, seer_gate
from vllm_seer.kernels.sparse_prefill import masks_to_block_lists
from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged

from vllm_seer.gate import Selection, block_rope_table, group_gate_weight
from vllm_seer.rope import RopeSpec

MODELS = {"llama3.1-8b": (32, 8, 128, 500000.0), "smollm2": (9, 3, 64, 100000.0)}
DENSITIES = (1.0, 0.5, 0.3, 0.1, 0.05)
PAGE = 16
BS = 64


def _paged(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, H, D]`` -> (``[P, page, H, D]`` cache with shuffled pages, ``[1, P]`` block table)."""
    L, h, d = k.shape
    n = -(-L // page)
    perm = torch.randperm(n, device=k.device)
    cache = torch.zeros(n, page, h, d, dtype=k.dtype, device=k.device)
    flat = torch.zeros(n * page, h, d, dtype=k.dtype, device=k.device)
    flat[:L] = k
    cache[perm] = flat.view(n, page, h, d)
    return cache, perm.to(torch.int32)[None, :]


def _paged_kv(k: torch.Tensor, v: torch.Tensor, page: int, packed: bool = True):
    """``[L, H, D]`` K and V -> (K cache, V cache, ``[1, P]`` block table): shuffled pages, V at
    the same block-table slots as K. ``packed``: as vLLM 0.26+ CUDA keeps them, views of one
    ``[P, page, H, 2D]`` tensor of K|V token rows (its default NHD layout); else two contiguous
    ``[P, page, H, D]`` caches."""
    k_cache, bt = _paged(k, page)
    flat = torch.zeros(bt.shape[1] * page, *v.shape[1:], dtype=v.dtype, device=v.device)
    flat[: v.shape[0]] = v
    v_cache = torch.zeros_like(k_cache)
    v_cache[bt[0].long()] = flat.view(bt.shape[1], page, *v.shape[1:])
    if not packed:
        return k_cache, v_cache, bt
    d = k.shape[-1]
    kv = torch.cat((k_cache, v_cache), dim=-1)
    return kv[..., :d], kv[..., d:], bt


def _bench(fn, rep: int) -> float:
    return do_bench(fn, warmup=max(1, rep // 8), rep=rep)


def _gate_tables(weight: torch.Tensor, inv: torch.Tensor, hkv: int, L: int) -> dict:
    """The start-up tables the CUDA backend passes to ``seer_gate`` (block-start RoPE, weight
    grouped per KV head, per-position cos/sin of the pooling), for a context of ``L`` tokens."""
    return {"rope_table": block_rope_table(inv, -(-L // BS), BS),
            "grouped_weight": group_gate_weight(weight, hkv),
            "rope_positions": block_rope_table(inv, L, 1)}


def _gate_stages(q, k_cache, bt, cu, lens, inv, weight, sel, bufs, tabs: dict) -> dict:
    """The gate's three stages as separately timeable calls, and the whole gate (same arguments
    as ``seer_gate``, the backend's start-up tables ``tabs``)."""
    from vllm_seer.kernels.block_select.triton import block_select
    from vllm_seer.kernels.paged_pool.triton import pool_k_paged, pool_q_varlen

    return {
        "pool_k": lambda: pool_k_paged(k_cache, bt, lens, inv, bufs.k_pooled),
        "pool_q": lambda: pool_q_varlen(q, cu, lens, inv, bufs.q_pooled),
        "select": lambda: block_select(bufs.q_pooled, bufs.k_pooled, weight, inv, cu, lens, sel,
                                       bufs.block_index, bufs.block_count, BS, bufs.scores,
                                       bufs.topk, tabs["rope_table"], tabs["grouped_weight"]),
        "gate": lambda: seer_gate(q, k_cache, bt, cu, lens, weight, inv, sel, bufs, **tabs),
    }


def _vllm_kernels():
    """``(fa3_varlen, triton_unified, version)`` from the installed vLLM, or ``None`` without vLLM."""
    try:
        import vllm
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError as e:
        print(f"vLLM baselines skipped: {e}", flush=True)
        return None
    try:  # vLLM 0.32+
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except ImportError:  # vLLM 0.26
        from vllm.attention.ops.triton_unified_attention import unified_attention
    return flash_attn_varlen_func, unified_attention, vllm.__version__


def _fa3_call(fa3, q, k_cache, v_cache, bt, cu, lens, max_q: int, max_k: int, scale: float, out):
    """vLLM's FA3 varlen call over the paged cache (``max_q`` query rows, ``max_k`` context)."""
    return lambda: fa3(q, k_cache, v_cache, max_q, cu, max_k, seqused_k=lens, softmax_scale=scale,
                       causal=True, block_table=bt, out=out, fa_version=3)


def _vllm_baselines(kernels, q, k_cache, v_cache, bt, cu, lens, L: int, scale: float,
                    rep: int) -> dict[str, float]:
    """vLLM FA3 and Triton unified attention over the same paged cache (ms; NaN when absent)."""
    res = {"fa3": float("nan"), "vtriton": float("nan")}
    if kernels is None:
        return res
    fa3, unified, _ = kernels
    out = torch.empty_like(q)
    res["fa3"] = _bench(_fa3_call(fa3, q, k_cache, v_cache, bt, cu, lens, L, L, scale, out), rep)
    res["vtriton"] = _bench(lambda: unified(
        q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu, max_seqlen_q=L, seqused_k=lens,
        max_seqlen_k=L, softmax_scale=scale, causal=True, window_size=(-1, -1), block_table=bt,
        softcap=0, q_descale=None, k_descale=None, v_descale=None), rep)
    return res


def _seer_lists(kind: str, dens: float, L: int, hq: int, dev: str, gate, bufs, real_path: str):
    """Block lists for one selection kind: ``random`` = the gate's own top-k on random inputs
    (runs ``gate``), ``structured`` / ``real`` = masks from ``benchmarks/real_selections.py``."""
    if kind == "random":
        gate()
        return bufs.block_index, bufs.block_count
    import real_selections as rs

    if kind == "structured":
        mask = rs.structured_selection(hq, L, dens, seed=0, device=dev)
    else:
        mask = rs.load_real_selection(real_path, n_heads=hq, seq_len=L, nz_ratio=dens, device=dev)
    index, count = masks_to_block_lists([mask.to(dev)], bufs.block_index.shape[-1])
    return index, count


def run_case(model: str, L: int, rep: int, cases: list[tuple[str, float]], rows: list[dict],
             flex, vkernels, pages: tuple[int, ...], real_path: str, fp8: bool = False) -> None:
    hq, hkv, d, theta = MODELS[model]
    dev = "cuda"
    dt = torch.bfloat16
    q = torch.randn(L, hq, d, dtype=dt, device=dev)
    k = torch.randn(L, hkv, d, dtype=dt, device=dev)
    v = torch.randn(L, hkv, d, dtype=dt, device=dev)
    caches = {page: _paged_kv(k, v, page) for page in pages}
    k_cache, v_cache, bt = caches[pages[0]]
    f8 = bench_fp8.fp8_caches(q, caches) if fp8 else None
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    lens = torch.tensor([L], dtype=torch.int32, device=dev)
    inv = RopeSpec(d, theta).inv_freq().to(dev)
    weight = (torch.randn(hq, 3 * d, d, device=dev) / math.sqrt(3 * d)).to(dt)
    plan = plan_batch([0, L], [L])
    bufs = SeerBuffers.allocate(plan, hq, hkv, d, dev)
    tabs = _gate_tables(weight, inv, hkv, L)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d)
    flops_dense = 4.0 * hq * d * L * (L + 1) / 2

    # dense baselines on contiguous [1, Hq, L, D]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt = q.transpose(0, 1)[None]
    kt = k.transpose(0, 1)[None].repeat_interleave(hq // hkv, 1)
    vt = v.transpose(0, 1)[None].repeat_interleave(hq // hkv, 1)
    base = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: B023
                    qt, kt, vt, is_causal=True)
                base[name] = _bench(fn, rep)
        except RuntimeError as e:
            base[name] = float("nan")
            print(f"{model} {L}: {name} failed: {e}")
    try:
        base.update(_vllm_baselines(vkernels, q, k_cache, v_cache, bt, cu, lens, L, scale, rep))
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
        base.update(fa3=float("nan"), vtriton=float("nan"))
        print(f"{model} {L}: vLLM baselines failed: {type(e).__name__}: {e}"[:400], flush=True)
    print(f"{model} {L} dense baselines (ms): {base}", flush=True)
    kt_g, vt_g = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gate_ms: dict[float, float] = {}
    gate8_ms: dict[float, float] = {}
    for kind, dens in cases:
        sel = Selection("nz_ratio", 0.0, dens, True)
        bufs.set_topk([L], sel)  # once per step, as the CUDA builder does
        gate = lambda: seer_gate(q, k_cache, bt, cu, lens, weight, inv, sel, bufs, **tabs)  # noqa: E731,B023
        if dens not in gate_ms:  # the gate's cost does not depend on the values it selects from
            gate()
            gate_ms[dens] = _bench(gate, rep)
            if f8 is not None:  # before _seer_lists: its gate() restores the bf16 selection
                gate8_ms[dens] = bench_fp8.time_fp8_gate(
                    _bench, rep, f8, (bt, cu, lens, weight, inv, sel, bufs), tabs)
        index, count = _seer_lists(kind, dens, L, hq, dev, gate, bufs, real_path)
        t_attn = {}
        for page, (kc, vc, btp) in caches.items():
            t_attn[page] = _bench(lambda kc=kc, vc=vc, btp=btp, ix=index, ct=count:  # noqa: B023
                                  sparse_prefill_paged(q, kc, vc, btp, cu, lens, ix, ct, out,
                                                       scale, BS, bufs.split), rep)
        attn = t_attn[pages[0]]
        fp8_fields: dict[str, float] = {}
        if f8 is not None:
            fp8_fields = bench_fp8.time_fp8_attention(_bench, rep, q, f8, cu, lens, index, count,
                                                      out, scale, BS, bufs.split)
            fp8_fields.update(attn_fp8=fp8_fields[f"attn_fp8_p{pages[0]}"],
                              gate_fp8=gate8_ms[dens])
        from vllm_seer.kernels.sparse_prefill.triton import _sparse_prefill_kernel

        tuned = str(_sparse_prefill_kernel.best_config)
        full = gate_ms[dens] + attn
        if kind == "random":  # gate + attention back to back, as the backend runs them

            def both():
                gate()  # noqa: B023
                sparse_prefill_paged(q, k_cache, v_cache, bt, cu, lens, bufs.block_index,
                                     bufs.block_count, out, scale, BS, bufs.split)

            full = _bench(both, rep)
        if dens == 0.1 and kind == "random":  # gate breakdown
            parts = _gate_stages(q, k_cache, bt, cu, lens, inv, weight, sel, bufs, tabs)
            print(f"{model} {L} gate breakdown (ms):",
                  {k: round(_bench(f, rep), 4) for k, f in parts.items()}, flush=True)
        cnt = count.double()
        nqb = cnt.shape[-1]
        blocks = cnt.sum().item()
        density = blocks / (hq * nqb * (nqb + 1) / 2)
        fine = block_mask_dense(index, count)
        ov = _overlap_stats(fine[0], hkv, density)
        flex_ms: dict[str, float] = {}
        err = float("nan")
        if flex is not None:
            configs = FLEX_CONFIGS if dens <= 0.1 else FLEX_CONFIGS[:1]
            flex_ms = time_flex_configs(flex, _bench, qt, kt_g, vt_g, fine, L, scale, rep,
                                        configs)
            best = min(flex_ms, key=lambda n: flex_ms[n] if flex_ms[n] == flex_ms[n] else 1e30)
            bm, bn, w, st = (int(x.lstrip("ws")) for x in best.replace("x", "-").split("-"))
            ref = flex(qt, kt_g, vt_g, block_mask=flex_block_mask(fine, L, bm, bn), scale=scale,
                       enable_gqa=True, kernel_options={"BLOCK_M": bm, "BLOCK_N": bn,
                                                        "num_warps": w, "num_stages": st}
                       )[0].transpose(0, 1)
            sparse_prefill_paged(q, k_cache, v_cache, bt, cu, lens, index, count, out, scale, BS,
                                 bufs.split)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
        flex_best = min((t for t in flex_ms.values() if t == t), default=float("nan"))
        rows.append(dict(model=model, L=L, kind=kind, target=dens, density=density, **ov,
                         full=full, attn=attn, gate=gate_ms[dens],
                         **{f"attn_p{p}": t for p, t in t_attn.items()},
                         cudnn=base["cudnn"], flash=base["flash"], fa3=base["fa3"],
                         vtriton=base["vtriton"], flex=flex_ms, flex_best=flex_best,
                         flex_rel_err=err, flops=flops_dense, tuned_config=tuned,
                         flops_comp=4.0 * d * BS * BS * blocks, **fp8_fields))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
              flush=True)


def _overlap_stats(fine: torch.Tensor, hkv: int, density: float) -> dict[str, float]:
    """``fine`` ``[Hq, MQB, MKB]``: mean Jaccard overlap of adjacent query-block rows' key sets
    and the GQA-group union density (blocks a per-KV-head union tile would compute, over the
    causal total)."""
    a, b = fine[:, :-1], fine[:, 1:]
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double().clamp(min=1)
    hq, nqb = fine.shape[0], fine.shape[1]
    grp = fine.view(hkv, hq // hkv, nqb, -1).any(1).sum().item() * (hq // hkv)
    return {"overlap": float((inter / union).mean()),
            "union": grp / (hq * nqb * (nqb + 1) / 2)}


def autotuned() -> dict[str, dict[str, str]]:
    """What the autotuners of the gate and attention kernels picked in this process, per key."""
    from vllm_seer.kernels.block_select import triton as bsel
    from vllm_seer.kernels.paged_pool import triton as pool
    from vllm_seer.kernels.sparse_prefill import triton as sp

    out = {}
    for name, fn in (("scores", bsel._scores_kernel), ("select", bsel._select_kernel),
                     ("pool_qk", pool._pool_qk_kernel), ("sparse_prefill", sp._sparse_prefill_kernel)):
        while not hasattr(fn, "cache") and hasattr(fn, "fn"):  # under heuristics wrappers
            fn = fn.fn
        out[name] = {str(key): str(cfg) for key, cfg in getattr(fn, "cache", {}).items()}
    return out


def profile_gate(model: str, L: int) -> None:
    """Gate breakdown + a torch.profiler kernel table for one call of ``block_select``."""
    hq, hkv, d, theta = MODELS[model]
    q = torch.randn(L, hq, d, dtype=torch.bfloat16, device="cuda")
    k_cache, bt = _paged(torch.randn(L, hkv, d, dtype=torch.bfloat16, device="cuda"), PAGE)
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    lens = cu[1:].clone()
    inv = RopeSpec(d, theta).inv_freq().cuda()
    weight = (torch.randn(hq, 3 * d, d, device="cuda") / math.sqrt(3 * d)).to(torch.bfloat16)
    bufs = SeerBuffers.allocate(plan_batch([0, L], [L]), hq, hkv, d, "cuda")
    sel = Selection("nz_ratio", 0.0, 0.1, True)
    bufs.set_topk([L], sel)
    parts = _gate_stages(q, k_cache, bt, cu, lens, inv, weight, sel, bufs,
                         _gate_tables(weight, inv, hkv, L))
    print(f"{model} {L} gate (ms):", {k: round(_bench(f, 50), 4) for k, f in parts.items()})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):  # every launch of the whole gate, 5 calls
            parts["gate"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
    print("autotuned:", json.dumps(autotuned(), indent=1))


def profile_chunk(model: str, L: int, chunk: int, vkernels, density: float = 0.1) -> dict:
    """One chunked-prefill step as vLLM runs it: the last ``chunk`` rows of an ``L``-token prompt
    over the whole cached context. Times each gate stage, the sparse attention and vLLM FA3 on the
    same rows (ms)."""
    hq, hkv, d, theta = MODELS[model]
    dt = torch.bfloat16
    q = torch.randn(chunk, hq, d, dtype=dt, device="cuda")
    k_cache, v_cache, bt = _paged_kv(torch.randn(L, hkv, d, dtype=dt, device="cuda"),
                                     torch.randn(L, hkv, d, dtype=dt, device="cuda"), PAGE)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    lens = torch.tensor([L], dtype=torch.int32, device="cuda")
    inv = RopeSpec(d, theta).inv_freq().cuda()
    weight = (torch.randn(hq, 3 * d, d, device="cuda") / math.sqrt(3 * d)).to(dt)
    bufs = SeerBuffers.allocate(plan_batch([0, chunk], [L]), hq, hkv, d, "cuda")
    sel = Selection("nz_ratio", 0.0, density, True)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d)
    bufs.set_topk([L], sel)
    tabs = _gate_tables(weight, inv, hkv, L)
    seer_gate(q, k_cache, bt, cu, lens, weight, inv, sel, bufs, **tabs)
    parts = {
        **_gate_stages(q, k_cache, bt, cu, lens, inv, weight, sel, bufs, tabs),
        "attn": lambda: sparse_prefill_paged(q, k_cache, v_cache, bt, cu, lens, bufs.block_index,
                                             bufs.block_count, out, scale),
    }
    res = {k: _bench(f, 100) for k, f in parts.items()}
    # host time of one gate call (launch overhead), GPU idle before it
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        parts["gate"]()
    res["gate_host"] = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    if vkernels is not None:
        res["fa3"] = _bench(_fa3_call(vkernels[0], q, k_cache, v_cache, bt, cu, lens, chunk, L,
                                      scale, out), 100)
    res["density"] = float(bufs.block_count.double().sum()) / (
        hq * sum(qb + 1 for qb in range((L - chunk) // BS, (L - 1) // BS + 1)))
    print(f"chunk {model} ctx {L} rows {chunk} d={density} (ms):",
          {k: round(v, 4) for k, v in res.items()}, flush=True)
    return res


def _fmt(rows: list[dict], meta: str, pages: tuple[int, ...]) -> str:
    head = ("| model | seq | selection | target | density | adjacent overlap | group-union density "
            "| Seer ms (gate incl.) | " + " | ".join(f"attn ms page {p}" for p in pages) +
            " | gate ms | gate share | cuDNN ms | vLLM FA3 ms | vLLM Triton ms | flex best ms "
            "(config) | x cuDNN | x FA3 | x flex best | x cuDNN attn-only | TFLOP/s computed |")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [meta, "", head, sep]
    for r in rows:
        cfg = min(r["flex"], key=lambda n: r["flex"][n] if r["flex"][n] == r["flex"][n] else 1e30,
                  default="-")
        lines.append(
            f"| {r['model']} | {r['L'] // 1024}k | {r['kind']} | {r['target']} | "
            f"{r['density']:.3f} | {r['overlap']:.3f} | {r['union']:.3f} | {r['full']:.3f} | "
            + " | ".join(f"{r[f'attn_p{p}']:.3f}" for p in pages) +
            f" | {r['gate']:.3f} | {100 * r['gate'] / r['full']:.1f}% | {r['cudnn']:.3f} | "
            f"{r['fa3']:.3f} | {r['vtriton']:.3f} | {r['flex_best']:.3f} ({cfg}) | "
            f"{r['cudnn'] / r['full']:.2f} | {r['fa3'] / r['full']:.2f} | "
            f"{r['flex_best'] / r['full']:.2f} | {r['cudnn'] / r['attn']:.2f} | "
            f"{r['flops_comp'] / r['attn'] * 1e-9:.0f} |")
    return "\n".join(lines) + "\n"


def goals(rows: list[dict], kind: str = "random", page: int | None = None) -> dict[str, float]:
    """The issue's goal figures (Llama shapes, gate included unless said otherwise); ``page``:
    with the attention timed on that page size's cache (default: the headline one)."""
    def row(L: int, target: float) -> dict | None:
        r = next((r for r in rows if r["model"] == "llama3.1-8b" and r["kind"] == kind
                  and r["L"] == L and r["target"] == target), None)
        if r is None or page is None:
            return r
        attn = r[f"attn_p{page}"]
        full = r["full"] - r["attn"] + attn if kind == "random" else r["gate"] + attn
        return {**r, "attn": attn, "full": full}

    out: dict[str, float] = {}
    for name, L in (("8k", 8192), ("32k", 32768), ("128k", 131072)):
        r = row(L, 0.1)
        if r is None:
            continue
        out[f"x_cudnn_d01_{name}"] = r["cudnn"] / r["full"]
        out[f"x_fa3_d01_{name}"] = r["fa3"] / r["full"]
        out[f"x_flex_best_d01_{name}"] = r["flex_best"] / r["full"]
        out[f"tflops_computed_d01_{name}"] = r["flops_comp"] / r["attn"] * 1e-9
        out[f"gate_share_d01_{name}"] = r["gate"] / r["full"]
        out[f"density_d01_{name}"] = r["density"]
        r5 = row(L, 0.05)
        if r5 is not None:
            out[f"x_cudnn_d005_{name}"] = r5["cudnn"] / r5["full"]
            out[f"x_flex_best_d005_{name}"] = r5["flex_best"] / r5["full"]
        r1 = row(L, 1.0)
        if r1 is not None:
            out[f"x_cudnn_d10_{name}"] = r1["cudnn"] / r1["attn"]
    return out


def summarize(summary: dict, kinds: list[str]) -> dict:
    """Fill the goal figures of a summary from its rows (headline page, and every other page)."""
    rows, pages = summary["rows"], tuple(summary["pages"])
    summary["goals"] = goals(rows)
    summary["goals_fp8"] = bench_fp8.fp8_goals(rows)
    summary["goals_by_selection"] = {k: goals(rows, k) for k in kinds}
    for page in pages[1:]:
        summary[f"goals_page{page}"] = {k: goals(rows, k, page) for k in kinds}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kernels-h200.md")
    ap.add_argument("--json", default="", help="JSON summary (default: --out with .json)")
    ap.add_argument("--seqs", default="8192,32768,131072")
    ap.add_argument("--models", default="llama3.1-8b")
    ap.add_argument("--kinds", default="random,structured,real")
    ap.add_argument("--pages", default="64,16",
                    help="page sizes timed (first: the headline; 64 is what the CUDA backend asks "
                         "vLLM for)")
    ap.add_argument("--real", default=str(Path(__file__).resolve().parent / "data"
                                          / "smollm2-selections-8k.safetensors"),
                    help="real gate selections (benchmarks/real_selections.py)")
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep (ms) below 128k")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--kv-dtype", default="bf16",
                    help="KV cache dtypes timed: bf16 (always, the baseline) and fp8 (e4m3)")
    ap.add_argument("--profile-gate", action="store_true", help="only profile the gate")
    ap.add_argument("--chunk", type=int, default=0,
                    help="only time one chunked-prefill step of this many rows at each --seqs")
    ap.add_argument("--resummarize", default="",
                    help="only recompute the goal figures of an existing JSON summary from its rows")
    args = ap.parse_args()
    if args.resummarize:
        with open(args.resummarize) as f:
            summary = json.load(f)
        kinds = sorted({r["kind"] for r in summary["rows"]})
        with open(args.resummarize, "w") as f:
            json.dump(summarize(summary, kinds), f, indent=1)
        print(json.dumps({k: v for k, v in summary.items() if k.startswith("goals")}, indent=1))
        return
    if args.chunk:
        vk = _vllm_kernels()
        for model in args.models.split(","):
            for L in (int(s) for s in args.seqs.split(",")):
                for dens in (0.1, 0.3):
                    profile_chunk(model, L, args.chunk, vk, dens)
        return
    if args.profile_gate:
        for L in (int(s) for s in args.seqs.split(",")):
            profile_gate(args.models.split(",")[0], L)
        return
    torch.manual_seed(0)
    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"FlexAttention unavailable: {e}")
    vkernels = _vllm_kernels()
    vllm_note = (f"vLLM {vkernels[2]} baselines on the same paged cache" if vkernels else
                 "vLLM not importable on this host: vLLM FA3 / Triton-unified baselines skipped")
    pages = tuple(int(p) for p in args.pages.split(","))
    kinds = args.kinds.split(",")
    kv_dtypes = set(args.kv_dtype.split(","))
    if not kv_dtypes <= {"bf16", "fp8"}:
        ap.error(f"--kv-dtype {args.kv_dtype}: expected a comma list of bf16, fp8")
    rows: list[dict] = []
    t0 = time.time()
    versions = {"torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "vllm": vkernels[2] if vkernels else None}

    def write(done: bool) -> tuple[str, dict]:
        """The report and JSON summary of the rows so far (after every shape, so that a run cut
        by a time limit keeps what it measured; ``complete`` says whether every shape ran)."""
        meta = (f"# Seer kernels benchmark\n\nDate: {datetime.date.today()}. Device: "
                f"{torch.cuda.get_device_name()}; " + "; ".join(f"{k} {v}" for k, v in versions.items())
                + f". Paged KV cache pages {pages} (the first is the headline) in vLLM CUDA's "
                f"layout (K|V packed per token row, [pages, page, Hkv, 2D]), gate block {BS}, "
                f"bf16, one request prefilled at once, top-k selection (last two query-block rows "
                f"dense, diagonal forced). Selections: random = the gate's top-k on random inputs "
                f"(Seer time = gate + attention run back to back); structured / real = fixed masks "
                f"(benchmarks/real_selections.py), Seer time = attention on them + the gate's time at "
                f"the same target. FlexAttention: best of {len(FLEX_CONFIGS)} tile configs at the same "
                f"mask (benchmarks/flex_baseline.py; 1 config at density > 0.1). {vllm_note}. Wall "
                f"time {time.time() - t0:.0f} s"
                + ("" if done else " (PARTIAL: the run did not finish every shape)")
                + ". Generated by `benchmarks/bench_kernels.py`.")
        text = _fmt(rows, meta, pages) + bench_fp8.fmt_fp8(rows)
        with open(args.out, "w") as f:
            f.write(text)
        summary = {"device": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
                   "versions": versions, "pages": pages, "complete": done, "rows": rows,
                   "autotuned": autotuned()}
        summarize(summary, kinds)
        with open(args.json or args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(summary, f, indent=1)
        return text, summary

    for model in args.models.split(","):
        for L in (int(s) for s in args.seqs.split(",")):
            cases = [("random", dd) for dd in ((1.0, 0.3, 0.1, 0.05) if "random" in kinds else ())]
            cases += [(k, dd) for k in kinds if k != "random" for dd in (0.1, 0.05)]
            try:
                run_case(model, L, args.rep if L < 131072 else 4 * args.rep, cases, rows, flex,
                         vkernels, pages, args.real, "fp8" in kv_dtypes)
            except Exception as e:  # noqa: BLE001 - keep the other shapes
                print(f"{model} {L}: failed: {type(e).__name__}: {e}"[:500], flush=True)
                torch.cuda.empty_cache()
            write(False)
    text, summary = write(True)
    print(text)
    print(json.dumps(summary["goals"], indent=1))
    if summary["goals_fp8"]:
        print(json.dumps(summary["goals_fp8"], indent=1))


if __name__ == "__main__":
    main()
