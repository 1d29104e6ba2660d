"""``vllm-seer`` command line: inspect, demo, serve, and the trainer / evaluation entry points."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("vllm_seer.cli")

# subcommands implemented in other modules: name -> (module, function taking argv)
DELEGATED = {
    "prepare-model": ("vllm_seer.train.prepare_model", "prepare_model_main"),
    "train-gates": ("vllm_seer.train.cli", "train_gates_main"),
    "eval": ("vllm_seer.eval.cli", "eval_main"),
    "eval-suite": ("vllm_seer.eval.suite_cli", "eval_suite_main"),
}


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cmd_inspect(args: argparse.Namespace) -> int:
    from vllm_seer.checkpoint import GateCheckpointError, load_gates, summarize

    try:
        ckpt = load_gates(args.path)
    except GateCheckpointError as e:
        _out(f"error: {e}")
        return 2
    summary = summarize(ckpt)
    if args.json:
        _out(json.dumps(summary, indent=2))
    else:
        width = max(map(len, summary))
        for k, v in summary.items():
            _out(f"{k:<{width}}  {v}")
    return 0


# demo settings for SmolLM2 + the distilled gates (see the README's demo paragraph)
SMOLLM2_DEMO: dict[str, object] = {"sparsity_method": "nz_ratio", "nz_ratio": 0.3,
                                   "min_prefill_tokens": 512}


def demo_model() -> tuple[Path, Path, dict[str, object]]:
    """The model and gates ``demo`` serves: the distilled SmolLM2 gates when the converted model is
    available (``vllm-seer prepare-model``), else the bundled tiny random Llama and its gates."""
    from vllm_seer.testing import ensure_test_model

    assets = Path(__file__).parent / "assets" / "gates" / "smollm2-135m"
    if not (assets / "config.json").is_file():
        reason = f"the distilled gates are missing ({assets})"
    else:
        prep = importlib.import_module(DELEGATED["prepare-model"][0])
        model = prep.default_model_dir()
        if prep.is_prepared(model):
            return model, assets, dict(SMOLLM2_DEMO)
        reason = f"SmolLM2 is not prepared at {model} (run `vllm-seer prepare-model`)"
    logger.warning("demo: %s; falling back to the tiny random-weight model, whose answer is "
                   "gibberish by design", reason)
    model = ensure_test_model()
    return model, model / "gates", {"sparsity_method": "nz_ratio", "nz_ratio": 0.3,
                                    "min_prefill_tokens": 256}


def cmd_demo(args: argparse.Namespace) -> int:
    from vllm_seer.testing import SeerServer, metric_sum, parse_metrics

    model, gates, cfg = demo_model()
    seer = {"seer": {"gates": str(gates), **cfg}}
    _out(f"model: {model}\ngates: {gates}\n--additional-config '{json.dumps(seer)}'")
    document = Path(__file__).with_name("gate.py").read_text()
    question = args.question or "In one sentence: what does this code compute?"
    flags = ["--enforce-eager", "--max-model-len", "8192"]
    with SeerServer(model, seer, flags, startup_timeout=args.timeout) as srv:
        _out(f"server up at {srv.url} (attention backend: seer)")
        answer = srv.chat(f"{document}\n\n{question}", max_tokens=args.max_tokens)
        samples = parse_metrics(srv.metrics_text())
    computed = metric_sum(samples, "vllm:seer_blocks_computed_total")
    possible = metric_sum(samples, "vllm:seer_blocks_possible_total")
    sparse = metric_sum(samples, "vllm:seer_prefill_tokens_total", path="sparse")
    dense = metric_sum(samples, "vllm:seer_prefill_tokens_total", path="dense")
    _out(f"\nquestion: {question}\nanswer: {answer.strip()}\n")
    _out(f"prefill tokens: sparse {sparse:.0f}, dense {dense:.0f}")
    if possible:
        _out(f"prefill density (from /metrics): {computed:.0f} / {possible:.0f} blocks = "
             f"{computed / possible:.3f}")
    else:
        _out("prefill density: no prefill took the sparse path")
    return 0


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    """``vllm-seer serve MODEL --gates G [vllm flags]`` → ``vllm serve`` with the Seer backend."""
    import os

    seer = {"gates": args.gates, **json.loads(args.seer_json or "{}")}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
           "--attention-backend", "seer", "--additional-config", json.dumps({"seer": seer}), *rest]
    _out(" ".join(cmd))
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _delegate(name: str) -> Callable[[list[str]], int]:
    module, func = DELEGATED[name]
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in DELEGATED:
        return int(_delegate(argv[0])(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="vllm-seer", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="summarise a gate checkpoint folder")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("demo", help="serve the default model with Seer, chat once, show density")
    p.add_argument("--question")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=600.0)
    p = sub.add_parser("serve", help="vllm serve MODEL with --attention-backend seer")
    p.add_argument("model")
    p.add_argument("--gates", required=True)
    p.add_argument("--seer-json", help="more seer settings as JSON, e.g. '{\"nz_ratio\": 0.1}'")
    for name in DELEGATED:
        sub.add_parser(name, help=f"see `vllm-seer {name} --help`")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "serve":
        return cmd_serve(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"inspect": cmd_inspect, "demo": cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
