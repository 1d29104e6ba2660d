"""``vllm-seer eval-suite MODEL --gates DIR --size ci|full``: the accuracy suite and its report.

Runs :mod:`vllm_seer.eval.suite` offline (transformers, every selector), optionally the same cells
through real ``vllm serve`` processes (``--served dense nz=0.3 ...``,
:mod:`vllm_seer.eval.suite_served`), keeps raw results in ``--results`` (a re-run skips what is
done) and writes ``OUT/NAME.md``, ``OUT/NAME.json`` and the two plots
(:mod:`vllm_seer.eval.suite_report`).

Entry point for the CLI: :func:`eval_suite_main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from vllm_seer.eval.sparse import Selector, register
from vllm_seer.eval.suite import SIZES, Suite, suite_selectors
from vllm_seer.eval.suite_report import write_all

log = logging.getLogger(__name__)
DEFAULT_GATES = Path(__file__).resolve().parent.parent / "assets" / "gates" / "smollm2-135m"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-seer eval-suite", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None,
                   help="local HF model folder (default: the prepared SmolLM2)")
    p.add_argument("--gates", type=Path, default=DEFAULT_GATES)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--results", type=Path, default=None,
                   help="raw results JSON (default: OUT/raw/NAME-results.json)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="fidelity-smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="offline model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--served", nargs="*", default=None, metavar="SETTING",
                   help="also run through vllm serve with these settings (dense, nz=R, thr=T, "
                        "optionally +sink=N)")
    p.add_argument("--served-dtype", default="float32", help="the served model's --dtype")
    p.add_argument("--timeout", type=float, default=600.0, help="server start-up timeout (s)")
    p.add_argument("--train-record", type=Path, default=None,
                   help="training metadata JSON of the gates (default: GATES/train_record.json)")
    p.add_argument("--no-heatmap", action="store_true")
    p.add_argument("--heatmap-only", action="store_true",
                   help="only the per-layer x per-head density heatmap of the gates on held-out "
                        "text (results in OUT/raw/NAME-heatmap.json unless --results; writes "
                        "OUT/NAME-heatmap.png, not the report)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the results file as it is (no model, no runs)")
    return p.parse_args(argv)


def heatmap_selector(gates: Path, weights: dict[int, torch.Tensor], inv: torch.Tensor,
                     block_size: int) -> Selector:
    """Seer with the checkpoint's own sparsity setting (``seerattn_*`` in its config.json)."""
    from vllm_seer.checkpoint import read_checkpoint_config

    cfg = read_checkpoint_config(gates)
    method = cfg.get("seerattn_sparsity_method", "threshold")
    return Selector("seer", method, threshold=float(cfg.get("seerattn_threshold", 5e-4)),
                    nz_ratio=float(cfg.get("seerattn_nz_ratio", 0.1)), block_size=block_size,
                    weights=weights, inv_freq=inv)


def load(model_dir: Path, gates: Path, device: torch.device, dtype: torch.dtype
         ) -> tuple[Any, Any, dict[int, torch.Tensor], torch.Tensor, int]:
    """(model with ``seer_eval`` attention, tokenizer, gate weights, inv_freq, block size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_seer.checkpoint import load_gates
    from vllm_seer.rope import RopeSpec

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=register())
    model = model.to(device).eval()
    ckpt = load_gates(gates)
    ckpt.check_against(num_layers=model.config.num_hidden_layers,
                       num_q_heads=model.config.num_attention_heads,
                       num_kv_heads=model.config.num_key_value_heads, head_dim=ckpt.head_dim)
    inv = RopeSpec.from_hf_config(model.config, ckpt.head_dim).inv_freq().to(device)
    weights = {i: w.to(device, torch.float32) for i, w in ckpt.weights.items()}
    return model, tok, weights, inv, ckpt.block_size


def _model_dir(arg: str | None) -> Path | None:
    if arg is not None:
        return Path(arg)
    from vllm_seer.train.prepare_model import default_model_dir, is_prepared

    path = default_model_dir()
    if not is_prepared(path):
        log.error("no model given and %s is not prepared: run `vllm-seer prepare-model`", path)
        return None
    return path


def eval_suite_main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status."""
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from vllm_seer.eval.served import ServedEvalError, Setting

    try:
        settings = [Setting.parse(s) for s in a.served or []]
    except ServedEvalError as e:
        log.error("--served: %s", e)
        return 2
    if a.heatmap_only and (a.no_heatmap or a.report_only or settings):
        log.error("--heatmap-only runs the heatmap alone: not with --no-heatmap, --report-only "
                  "or --served")
        return 2
    results = a.results or a.out / "raw" / f"{a.name}-results.json"
    if a.report_only:
        if not results.is_file():
            log.error("--report-only: no results file %s", results)
            return 2
        summ = write_all(json.loads(results.read_text()), a.out, a.name, a.gates, a.train_record)
        log.info("wrote %s/%s.{md,json} from %s; goals: %s", a.out, a.name, results, summ["goals"])
        return 0
    model_dir = _model_dir(a.model)
    if model_dir is None:
        return 2
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = SIZES[a.size]
    model, tok, weights, inv, bs = load(model_dir, a.gates, device, dtype)
    if a.heatmap_only:
        return _heatmap_only(a, model, tok, weights, inv, bs, device, dtype)
    sels = suite_selectors(weights, inv, size.nz_ratios, size.thresholds, bs)
    meta = {"model": str(model_dir), "gates": str(a.gates), "device": _device_name(device),
            "dtype": str(dtype).removeprefix("torch.")}
    suite = Suite(model, tok, sels, size, results,
                  None if a.no_heatmap else heatmap_selector(a.gates, weights, inv, bs), meta)
    suite.run()
    if settings:
        from vllm_seer.eval.suite_served import run_served

        del model
        suite.model = None
        run_served(suite, model_dir, a.gates, settings, a.served_dtype, a.timeout)
    summ = write_all(suite.results, a.out, a.name, a.gates, a.train_record)
    log.info("wrote %s/%s.{md,json}; goals: %s", a.out, a.name, summ["goals"])
    return 0


def _heatmap_only(a: argparse.Namespace, model: Any, tok: Any, weights: dict[int, torch.Tensor],
                  inv: torch.Tensor, bs: int, device: torch.device, dtype: torch.dtype) -> int:
    """``--heatmap-only``: the suite's heatmap cell alone (its own results file, so a full
    results file's selector list is not rewritten) and its plot."""
    from vllm_seer.eval.suite_report import plot_heatmap

    path = a.results or a.out / "raw" / f"{a.name}-heatmap.json"
    meta = {"model": str(a.model or _model_dir(None)), "gates": str(a.gates),
            "device": _device_name(device), "dtype": str(dtype).removeprefix("torch.")}
    suite = Suite(model, tok, [], SIZES[a.size], path,
                  heatmap_selector(a.gates, weights, inv, bs), meta)
    suite.run_heatmap()
    png = a.out / f"{a.name}-heatmap.png"
    plot_heatmap(suite.results, png)
    grid = torch.tensor(suite.results["heatmap"]["density"])
    log.info("heatmap %s: density per layer min %.3f / mean %.3f / max %.3f; wrote %s and %s",
             suite.results["heatmap"]["selector"], float(grid.mean(1).min()),
             float(grid.mean()), float(grid.mean(1).max()), path, png)
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
