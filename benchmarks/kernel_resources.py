"""Compile the Seer Triton kernels for a GPU target without a GPU and report their resources.

Triton's NVIDIA backend (shipped in the ``triton`` wheel with ``ptxas``) compiles for any target
on a CPU-only machine, so register pressure, spills (stack), shared memory and whether the dots
became Hopper ``wgmma`` can be checked before spending GPU time. Example::

    python benchmarks/kernel_resources.py --arch 90 --head-dim 128 --kv bf16,fp8,fp8q

Prints one line per autotune config of the sparse prefill kernel (``--pairs``: and of the 128-row
pair-tile kernel) and K/V dtype (``fp8``: float8
e4m3 K/V, bf16 query; ``fp8q``: float8 query too, as vLLM's FlashAttention FP8 path hands it).
``--select`` adds the gate's selection kernel (top-k and threshold) at each row width up to
``--max-blocks`` key blocks, once per autotune config; ``--scores`` the gate's scores kernel per
autotune config.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16",
            "bt_ptr": "*i32", "cu_ptr": "*i32", "lens_ptr": "*i32", "idx_ptr": "*i32",
            "cnt_ptr": "*i32", "row_slot_ptr": "*i32", "seg_ptr": "*i32", "counter_ptr": "*i32",
            "pacc_ptr": "*fp32", "pml_ptr": "*fp32", "qs_ptr": "*fp32", "ks_ptr": "*fp32",
            "vs_ptr": "*fp32", "paired_ptr": "*i32", "union_ptr": "*i32", "ucnt_ptr": "*i32"}
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")


def _resources(cubin: bytes) -> dict[str, int]:
    bindir = Path(triton.__file__).parent / "backends/nvidia/bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(bindir / "cuobjdump"), "-res-usage", f.name], check=True,
                              capture_output=True, text=True, timeout=60).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_sparse_prefill(arch: int, head_dim: int, page: int, config: triton.Config,
                           kv: str = "bf16", tma: bool = False, pairs: bool = False) -> dict:
    """Compile ``_sparse_prefill_kernel`` (``pairs``: the 128-row ``pairs._pair_kernel``) for
    ``sm_<arch>`` (``kv``: ``bf16`` / ``fp8`` / ``fp8q``, see the module doc; ``tma``: complete
    key blocks through tensor descriptors, needs ``page % 64 == 0``); resources of the cubin."""
    import triton.language as tl
    from vllm_seer.kernels.sparse_prefill import pairs as pr
    from vllm_seer.kernels.sparse_prefill import triton as sp

    fn = (pr._pair_kernel if pairs else sp._sparse_prefill_kernel).fn
    q_fp8, kv_fp8 = kv == "fp8q", kv in ("fp8", "fp8q")
    pointers = dict(POINTERS)
    if kv_fp8:
        pointers.update(k_ptr="*fp8e4nv", v_ptr="*fp8e4nv")
    if q_fp8:
        pointers["q_ptr"] = "*fp8e4nv"
    kv_ty = pointers["k_ptr"][1:]
    descs = {n: f"tensordesc<{kv_ty}[64,{head_dim}]>" if tma else pointers["k_ptr"]
             for n in ("k_desc", "v_desc")}
    const = dict(HQ=32, GROUP=4, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                 PAGE_SIZE=page, BLOCK=64, DOT_FP32=False, SPLIT=True, Q_FP8=q_fp8,
                 KV_FP8=kv_fp8, FP8_QK=q_fp8 and kv_fp8, DOT_DTYPE=tl.bfloat16, USE_TMA=tma,
                 PAIRS=True, **config.kwargs)
    const.update(dict.fromkeys(UNIT_STRIDES, 1))
    const = {n: v for n, v in const.items() if n in fn.arg_names}
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        # what launching with real tensors specialises: 16-byte aligned pointers, strides that
        # are multiples of 16 (all but the unit ones, which are constants)
        if n in pointers or (n.startswith("stride") and n not in UNIT_STRIDES):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if n in descs:
            sig[n] = descs[n]
            if not tma:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in pointers:
            sig[n] = pointers[n]
        elif n in const:
            sig[n] = "constexpr"
        elif n == "scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i64" if n.startswith("stride") else "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    res = _resources(k.asm["cubin"])
    res["smem_dyn"] = k.metadata.shared
    res["wgmma"] = k.asm["ptx"].count("wgmma.mma_async")
    return res


def _compile_gate_kernel(fn, arch: int, pointers: dict[str, str], const: dict, fp32_arg: str,
                         config: triton.Config) -> dict:
    """Compile one of the gate's kernels (``fn``: its JITFunction) for ``sm_<arch>``: pointer
    arguments typed by ``pointers`` (16-byte aligned), ``const`` constexprs, ``fp32_arg`` the one
    float scalar, every other argument i32; resources of the cubin."""
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in pointers:
            sig[n], attrs[(i,)] = pointers[n], [["tt.divisibility", 16]]
        elif n in const:
            sig[n] = "constexpr"
        else:
            sig[n] = "fp32" if n == fp32_arg else "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    res = _resources(k.asm["cubin"])
    res["smem_dyn"] = k.metadata.shared
    res["wgmma"] = k.asm["ptx"].count("wgmma.mma_async")
    return res


def compile_select(arch: int, block_k: int, topk: bool, config: triton.Config) -> dict:
    """Compile the gate's ``_select_kernel`` for ``sm_<arch>`` at row width ``block_k`` (a power
    of two) with one of its autotune configs."""
    from vllm_seer.kernels.block_select import triton as bsel

    pointers = {"s_ptr": "*fp32", "topk_ptr": "*i32", "idx_ptr": "*i32", "cnt_ptr": "*i32",
                "cu_ptr": "*i32", "lens_ptr": "*i32"}
    const = dict(HQ=32, BLOCK=64, BLOCK_K=block_k, TOPK=topk, LAST_DENSE=True, **config.kwargs)
    return _compile_gate_kernel(bsel._select_kernel.fn, arch, pointers, const, "threshold", config)


def compile_scores(arch: int, group: int, g: int, config: triton.Config) -> dict:
    """Compile the gate's ``_scores_kernel`` (tf32x3) for ``sm_<arch>`` with one of its autotune
    configs (``group`` query heads per KV head, gate hidden size ``g``)."""
    from vllm_seer.kernels.block_select import triton as bsel

    pointers = {"q_ptr": "*fp32", "k_ptr": "*fp32", "s_ptr": "*fp32", "cs_ptr": "*fp32",
                "cu_ptr": "*i32", "lens_ptr": "*i32"}
    const = dict(HQ=32, GROUP=group, G=g, BLOCK=64, PRECISION="tf32x3", **config.kwargs)
    return _compile_gate_kernel(bsel._scores_kernel.fn, arch, pointers, const, "scale", config)


def compile_pool(arch: int, page: int, cached: bool, config: triton.Config) -> dict:
    """Compile the gate's pooling kernel ``_pool_qk_kernel`` (bf16 K and Q, per-position cos/sin
    table) for ``sm_<arch>``, with (``cached``) or without the pooled-key cache."""
    from vllm_seer.kernels.paged_pool import triton as pool

    pointers = {"k_ptr": "*bf16", "bt_ptr": "*i32", "ko_ptr": "*fp32", "q_ptr": "*bf16",
                "cu_ptr": "*i32", "qo_ptr": "*fp32", "lens_ptr": "*i32", "f_ptr": "*fp32",
                "t_ptr": "*fp32"}
    const = dict(HKV=8, HQ=32, HALF=64, BLOCK_HALF=64, PAGE_SIZE=page, BLOCK=64, HAS_ROPE=True,
                 HAS_TABLE=True, LIBDEVICE=True, K_SCALED=False, Q_SCALED=False, CACHED=cached,
                 ENTRY_TOKENS=min(page, 64), ks_ptr=None, qs_ptr=None, **config.kwargs)
    if cached:
        pointers.update(pc_ptr="*fp32", st_ptr="*i32")
    else:
        const.update(pc_ptr=None, st_ptr=None)
    fn = pool._pool_qk_kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # under heuristics and autotune
        fn = fn.fn
    return _compile_gate_kernel(fn, arch, pointers, const, "", config)


def compile_invalidate(arch: int) -> dict:
    """Compile the pooled-key cache's invalidation kernel for ``sm_<arch>`` (int64 slots)."""
    from vllm_seer.kernels.paged_pool import triton as pool

    pointers = {"st_ptr": "*i32", "slot_ptr": "*i64"}
    const = dict(HKV=8, HKV_P2=8, ENTRY_TOKENS=64, BLOCK_T=64)
    return _compile_gate_kernel(pool._invalidate_kernel, arch, pointers, const, "",
                                triton.Config({}, num_warps=4, num_stages=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--kv", default="bf16", help="comma list of bf16 / fp8 / fp8q")
    ap.add_argument("--tma", action="store_true", help="the tensor-descriptor (TMA) K/V loads")
    ap.add_argument("--pairs", action="store_true", help="also the 128-row pair-tile kernel")
    ap.add_argument("--select", action="store_true", help="also the gate's selection kernel")
    ap.add_argument("--pool", action="store_true",
                    help="also the gate's pooling kernel (with / without the pooled-key cache) "
                         "and the cache's invalidation kernel")
    ap.add_argument("--scores", action="store_true",
                    help="also the gate's scores kernel (GQA group 4, gate hidden size 128)")
    ap.add_argument("--max-blocks", type=int, default=2048,
                    help="widest selection row (key blocks; 2048 = 128k tokens)")
    args = ap.parse_args()
    from vllm_seer.kernels.block_select import triton as bsel
    from vllm_seer.kernels.sparse_prefill import triton as sp

    if args.select:
        width = 64
        while width <= triton.next_power_of_2(args.max_blocks):
            for topk in (True, False):
                for cfg in bsel._prune_select(bsel._select_configs(), {}, BLOCK_K=width):
                    r = compile_select(args.arch, width, topk, cfg)
                    print(f"sm_{args.arch} select width={width} "
                          f"{'topk' if topk else 'threshold'} {cfg.kwargs} warps={cfg.num_warps}: "
                          f"regs {r['REG']} stack {r['STACK']} smem {r['smem_dyn']}", flush=True)
            width *= 2

    if args.scores:
        for cfg in bsel._scores_configs():
            r = compile_scores(args.arch, 4, 128, cfg)
            print(f"sm_{args.arch} scores {cfg.kwargs} warps={cfg.num_warps} "
                  f"stages={cfg.num_stages}: regs {r['REG']} stack {r['STACK']} "
                  f"smem {r['smem_dyn']} wgmma {r['wgmma']}", flush=True)

    if args.pool:
        from vllm_seer.kernels.paged_pool import triton as pool

        for cached in (False, True):
            for cfg in pool._qk_configs():
                r = compile_pool(args.arch, args.page, cached, cfg)
                print(f"sm_{args.arch} pool page={args.page} cached={cached} {cfg.kwargs} "
                      f"warps={cfg.num_warps}: regs {r['REG']} stack {r['STACK']} "
                      f"smem {r['smem_dyn']}", flush=True)
        r = compile_invalidate(args.arch)
        print(f"sm_{args.arch} key-cache invalidate: regs {r['REG']} stack {r['STACK']}",
              flush=True)

    from vllm_seer.kernels.sparse_prefill import pairs as pr

    kernels = [("rows", sp._sparse_prefill_kernel)]
    if args.pairs:
        kernels.append(("pairs", pr._pair_kernel))
    for (name, kern), kv in ((k, kv) for k in kernels for kv in args.kv.split(",")):
        for cfg in kern.configs:
            r = compile_sparse_prefill(args.arch, args.head_dim, args.page, cfg, kv, args.tma,
                                       name == "pairs")
            print(f"sm_{args.arch} {name} d={args.head_dim} page={args.page} kv={kv} "
                  f"tma={args.tma} {cfg.kwargs} "
                  f"warps={cfg.num_warps} stages={cfg.num_stages}: regs {r['REG']} stack "
                  f"{r['STACK']} smem {r['smem_dyn']} wgmma {r['wgmma']}", flush=True)


if __name__ == "__main__":
    main()
