"""Seer under tensor and pipeline parallelism on two GPUs (issue 15): correctness, then TTFT.

Layouts: ``single`` (one GPU), ``tp2`` (``--tensor-parallel-size 2``), ``pp2``
(``--pipeline-parallel-size 2``). Needs two GPUs of one host (``nvidia-h200-x2``) for ``tp2`` /
``pp2``; NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` and the PyTorch / NVSHMEM
switches, set by this script for every server it starts).

Correctness (``--part correctness``, eager, bf16): per model and layout four servers:
``flash`` (FLASH_ATTN), ``triton`` (TRITON_ATTN), ``seer1`` (Seer at density 1, ``nz_ratio`` 1.0)
and ``sparse`` (Seer, threshold 0.08, ``last_block_dense`` off, as in the CPU tests). Each records
the greedy tokens (16) and the teacher-forced prompt log-probabilities of 5 prompts (300 … 3000
tokens), the per-layer Seer block counters and the prefill tokens by path. Models:

* ``tiny``: the project's tiny Llama (``vllm_seer.tiny_model``) in bf16;
* ``8b``: Llama-3.1-8B's attention and MLP shapes (hidden 4096, 32 query / 8 KV heads, head dim
  128, llama3 RoPE) with 4 layers and a 4096-token vocabulary, random weights written to disk
  (~1.8 GB). Not ``--load-format dummy``: vLLM draws dummy weights per parameter shard, so a TP=2
  server would serve another model than the one-GPU server.

Checks (``judge``), per model:

1. density 1 in each layout: ``seer1`` vs ``triton`` within the same layout's FLASH_ATTN vs
   TRITON_ATTN noise floor (2x on the mean, 1.5x on the max absolute log-prob difference);
2. sparse in ``tp2`` / ``pp2`` vs ``single``: prompt log-probs within what the layout change does
   to dense FLASH_ATTN (``flash`` of the layout vs ``flash`` of ``single``, same slack); greedy
   tokens equal (reported per prompt; for ``pp2`` required: the same kernels on the same rows);
3. ``/metrics``: per-layer blocks possible equal to ``single``'s; blocks computed equal for
   ``pp2`` and within 1 % for ``tp2`` (bf16 rounding of gate scores near the threshold may flip a
   block); sparse and dense prefill tokens equal to ``single``'s (not counted once per worker).

TTFT (``--part ttft``): ``benchmarks/bench_e2e_ttft.py`` per layout, compiled mode, FLASH_ATTN
and ``seer@0.1`` at 32k and 128k in the same run (Llama-3.1-8B, dummy weights: speed only);
``--part ttft-report`` tabulates the Seer speed-up over FLASH_ATTN per layout and checks that it is
no worse than on one GPU (``--ttft-tolerance``, default 5 %).

Usage (GPU host, ``. benchmarks/gpu/setup_host.sh``; one 10-minute command each, results gather in
``--dir``)::

    python benchmarks/gpu/parallel_check.py --part correctness --models tiny --layouts single,tp2,pp2
    python benchmarks/gpu/parallel_check.py --part correctness --models 8b --layouts single,tp2
    python benchmarks/gpu/parallel_check.py --part correctness --models 8b --layouts pp2 \\
        --compare earlier/folder
    python benchmarks/gpu/parallel_check.py --part ttft --layouts single   # then tp2, then pp2
    python benchmarks/gpu/parallel_check.py --part ttft-report --compare folder/of/ttft/files
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # e2e_model / e2e_report beside bench_e2e_ttft.py
sys.path.insert(0, str(HERE))  # e2e_check

from e2e_check import lp_diff  # noqa: E402  (after the path set-up above)

LAYOUTS = {"single": [], "tp2": ["--tensor-parallel-size", "2"],
           "pp2": ["--pipeline-parallel-size", "2"]}
MODELS = ("tiny", "8b")
KINDS = ("flash", "triton", "seer1", "sparse")
TTFT_LENGTHS = (32768, 131072 - 64 - 64)
SLACK_MEAN, SLACK_MAX, LP_FLOOR = 2.0, 1.5, 0.02  # as benchmarks/gpu/e2e_check.py
TP_COMPUTED_REL = 0.01
# NVLink multicast stays off (the device host's rule: it can take shared GPUs out of service)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("correctness", "ttft", "ttft-report"), required=True)
    ap.add_argument("--models", default="tiny", help=f"comma-separated, of {','.join(MODELS)}")
    ap.add_argument("--layouts", default="single,tp2,pp2",
                    help=f"comma-separated, of {','.join(LAYOUTS)}")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"servers per model and layout (correctness), of {','.join(KINDS)}")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("OUT", "/tmp")),
                    help="one JSON per run is written here; the comparison reads them")
    ap.add_argument("--compare", nargs="*", type=Path, default=[],
                    help="more folders holding run JSONs of earlier calls")
    ap.add_argument("--model-root", type=Path, default=Path("/tmp"),
                    help="where the model folders are built")
    ap.add_argument("--ttft-tolerance", type=float, default=0.05,
                    help="a layout's Seer speed-up may be this much below one GPU's")
    ap.add_argument("--budget-s", type=float, default=540.0, help="per bench_e2e_ttft invocation")
    args = ap.parse_args(argv)
    args.models = _choices(args.models, MODELS, "--models")
    args.layouts = _choices(args.layouts, tuple(LAYOUTS), "--layouts")
    args.kinds = _choices(args.kinds, KINDS, "--kinds")
    return args


def _choices(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag} {value!r}: expected a comma-separated list of {', '.join(allowed)}")
    return items


def server_plan(kind: str, layout: str, gates: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """``(additional_config, flags)`` of one correctness server."""
    from e2e_check import EAGER, SPARSE

    flags = [*EAGER, *LAYOUTS[layout]]
    if kind in ("flash", "triton"):
        return None, [*flags, "--attention-backend", f"{kind.upper()}_ATTN"]
    if kind == "seer1":
        return {"seer": {"gates": str(gates), "sparsity_method": "nz_ratio", "nz_ratio": 1.0,
                         "min_prefill_tokens": 64}}, flags
    return {"seer": {"gates": str(gates), **SPARSE}}, flags


def build_8b_shaped(folder: Path) -> Path:
    """Llama-3.1-8B-shaped layers (4 of them), random weights on disk, and its random gates."""
    if (folder / "gates" / "config.json").is_file():
        return folder
    import torch
    from e2e_model import build_gates, build_tokenizer, model_config
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_seer.tiny_model import QK_SHARPEN

    cfg = {**model_config(), "num_hidden_layers": 4, "vocab_size": 4096, "bos_token_id": 3840,
           "eos_token_id": 3841}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted build
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    with torch.no_grad():  # not a flat attention (see tiny_model)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SHARPEN)
            layer.self_attn.k_proj.weight.mul_(QK_SHARPEN)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    build_tokenizer(tmp, cfg["vocab_size"])
    build_gates(tmp / "gates", json.loads((tmp / "config.json").read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def model_folder(name: str, root: Path) -> Path:
    from vllm_seer.testing import ensure_test_model

    if name == "tiny":
        return ensure_test_model(root / "tiny-llama")
    return build_8b_shaped(root / "llama31-8b-shaped-4l")


def run_correctness(args: argparse.Namespace) -> None:
    from e2e_check import run as run_server

    for name in args.models:
        model = model_folder(name, args.model_root)
        for layout in args.layouts:
            for kind in args.kinds:
                cfg, flags = server_plan(kind, layout, model / "gates")
                res = run_server(f"{name}-{layout}-{kind}", model, cfg, flags)
                (args.dir / f"parallel_run_{name}_{layout}_{kind}.json").write_text(json.dumps(res))


def load_runs(folders: list[Path]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """``(model, layout, kind) → run`` from the ``parallel_run_*.json`` files in ``folders``."""
    runs = {}
    for folder in folders:
        for f in sorted(folder.glob("parallel_run_*.json")):
            model, layout, kind = f.stem.removeprefix("parallel_run_").split("_")
            runs[(model, layout, kind)] = json.loads(f.read_text())
    return runs


def within(d: dict[str, float], floor: dict[str, float]) -> bool:
    return (d["mean"] <= SLACK_MEAN * max(floor["mean"], LP_FLOOR / 10)
            and d["max"] <= SLACK_MAX * max(floor["max"], LP_FLOOR))


def judge(runs: dict[tuple[str, str, str], dict[str, Any]], model: str) -> dict[str, Any]:
    """The checks of one model over the layouts present; ``ok`` is False where one fails or a
    run it needs is missing (``missing`` names them)."""
    out: dict[str, Any] = {"model": model, "checks": {}, "missing": []}
    layouts = sorted({lay for (m, lay, _) in runs if m == model}, key=list(LAYOUTS).index)
    ok = True

    def get(layout: str, kind: str) -> dict[str, Any] | None:
        run = runs.get((model, layout, kind))
        if run is None:
            out["missing"].append(f"{model}-{layout}-{kind}")
        return run

    for layout in layouts:
        flash, triton, seer1 = get(layout, "flash"), get(layout, "triton"), get(layout, "seer1")
        if flash and triton and seer1:
            floor, d1 = lp_diff(flash, triton), lp_diff(seer1, triton)
            good = within(d1, floor) and seer1["computed"] == seer1["possible"] > 0
            out["checks"][f"{layout}: density 1 vs TRITON_ATTN"] = {
                "ok": good, "lp": d1, "noise_floor": floor}
            ok &= good
        if layout == "single":
            continue
        ref, sparse = get("single", "sparse"), get(layout, "sparse")
        ref_flash = get("single", "flash")
        if not (ref and sparse and flash and ref_flash):
            continue
        floor = lp_diff(flash, ref_flash)
        d = lp_diff(sparse, ref)
        tokens = [a == b for a, b in zip(sparse["outputs"], ref["outputs"], strict=True)]
        layers = compare_layers(sparse, ref, exact=layout.startswith("pp"))
        good = within(d, floor) and layers["metrics_ok"] and (all(tokens) or not layout.startswith("pp"))
        out["checks"][f"{layout}: sparse vs single"] = {
            "lp": d, "layout_floor": floor, "outputs_equal": tokens, **layers, "ok": good}
        ok &= good
    out["ok"] = ok and not out["missing"]
    return out


def compare_layers(run: dict[str, Any], ref: dict[str, Any], exact: bool) -> dict[str, Any]:
    """Per-layer block counters and prefill tokens of a layout vs one GPU."""
    poss_ok = run["per_layer"]["possible"] == ref["per_layer"]["possible"]
    comp, want = run["per_layer"]["computed"], ref["per_layer"]["computed"]
    if exact:
        comp_ok = comp == want
    else:
        comp_ok = len(comp) == len(want) and all(
            abs(a - b) <= TP_COMPUTED_REL * b for a, b in zip(comp, want, strict=True))
    tokens_ok = (run["sparse_tokens"], run["dense_tokens"]) == (ref["sparse_tokens"],
                                                                ref["dense_tokens"])
    return {"metrics_ok": poss_ok and comp_ok and tokens_ok, "blocks_possible_equal": poss_ok,
            "blocks_computed": comp, "blocks_computed_single": want, "tokens_equal": tokens_ok}


def ttft_speedups(path: Path) -> dict[str, float | None]:
    """``{length label: FLASH_ATTN TTFT / Seer TTFT}`` of one ``bench_e2e_ttft.py`` result file."""
    from e2e_report import aggregate
    from e2e_report import load_runs as load_ttft

    agg = aggregate(load_ttft([path]))
    fa, seer = agg.get("FLASH_ATTN", {}), agg.get("seer@0.1", {})
    out: dict[str, float | None] = {}
    for label in sorted(set(fa) | set(seer)):
        a, b = fa.get(label, {}).get("ttft_s"), seer.get(label, {}).get("ttft_s")
        out[label] = a / b if a and b else None
    return out


def ttft_report(folders: list[Path], tolerance: float) -> dict[str, Any]:
    """Speed-ups per layout (``ttft-<layout>.json``) and whether each is no worse than one GPU's."""
    found = {f.stem.removeprefix("ttft-"): f for folder in folders
             for f in sorted(folder.glob("ttft-*.json")) if f.stem.removeprefix("ttft-") in LAYOUTS}
    speed = {layout: ttft_speedups(path) for layout, path in found.items()}
    single = speed.get("single", {})
    checks = {}
    for layout, per_len in speed.items():
        if layout == "single":
            continue
        for label, s in per_len.items():
            ref = single.get(label)
            checks[f"{layout} {label}"] = {
                "speedup": s, "single_gpu_speedup": ref,
                "ok": None if s is None or ref is None else s >= ref * (1 - tolerance)}
    return {"speedups": speed, "checks": checks,
            "ok": bool(checks) and all(c["ok"] for c in checks.values())}


def run_ttft(args: argparse.Namespace) -> int:
    bench = HERE.parent / "bench_e2e_ttft.py"
    failed = 0
    for layout in args.layouts:
        cmd = [sys.executable, str(bench), "--backends", "FLASH_ATTN,seer@0.1",
               "--lengths", ",".join(map(str, TTFT_LENGTHS)), "--budget-s", str(args.budget_s),
               f"--serve-args={' '.join(LAYOUTS[layout])}", "--out", str(args.dir / f"ttft-{layout}.json")]
        print("running:", " ".join(cmd), flush=True)
        failed += subprocess.run(cmd, check=False).returncode != 0
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(NO_MULTICAST)  # inherited by every server this script starts
    args.dir.mkdir(parents=True, exist_ok=True)
    folders = [args.dir, *args.compare]
    if args.part == "ttft":
        return run_ttft(args)
    if args.part == "ttft-report":
        report = ttft_report(folders, args.ttft_tolerance)
        (args.dir / "parallel_ttft.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1), flush=True)
        return 0 if report["ok"] else 1
    run_correctness(args)
    runs = load_runs(folders)
    verdicts = [judge(runs, m) for m in sorted({m for (m, _, _) in runs})]
    (args.dir / "parallel_check.json").write_text(json.dumps(verdicts, indent=1))
    for v in verdicts:
        print(json.dumps({k: v[k] for k in ("model", "ok", "missing")}), flush=True)
        for name, c in v["checks"].items():
            print(f"  {name}: ok={c['ok']} lp={c['lp']}", flush=True)
    return 0 if verdicts and all(v["ok"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
