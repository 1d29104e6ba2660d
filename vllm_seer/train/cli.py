"""``vllm-seer train-gates``: distil prefill gates for a transformers model (resumable).

Three forms::

    vllm-seer train-gates pack --tokenizer MODEL --out DATA [--corpus NAME:DIR:SFX,...]
    vllm-seer train-gates MODEL --out GATES --state STATE [--data DATA] [options]
    vllm-seer train-gates export --state STATE --out GATES

``pack`` tokenizes the corpus once into compressed shards (:mod:`vllm_seer.train.pack`). Training
reads the shards (packing them first into ``--data`` when that folder has none), extracts features
on the fly (:class:`~vllm_seer.train.features.ModelSource`), trains the gates, evaluates the
held-out loss every ``--eval-every`` steps, and stops at the plateau rule, ``--steps`` or
``--time-budget-s``. Everything needed to continue lives in ``--state``: running the same command
again continues where the last run stopped (or was killed). ``STATE/log.json`` and
``STATE/loss.png`` are the record and the loss curve; ``GATES`` is written with
:func:`vllm_seer.checkpoint.save_gates` at the end of every invocation.

Entry point for the CLI: :func:`train_gates_main`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_seer.checkpoint import load_gates, save_gates, seer_config_fields
from vllm_seer.rope import RopeSpec
from vllm_seer.train.features import ModelShape, ModelSource
from vllm_seer.train.pack import PackedCorpus, PackError, pack, parse_corpora
from vllm_seer.train.report import plot_losses, write_json
from vllm_seer.train.state import StateError, load_checkpoint
from vllm_seer.train.trainer import GateModel, TrainConfig, train

log = logging.getLogger(__name__)

GATE_CONFIG = "gate_config.json"
PLATEAU_RULE = ("held-out loss evaluated every --eval-every steps; an evaluation improves when it "
                "is below best * (1 - --min-rel-improve); stop after --patience evaluations in a "
                "row without improvement")


def load_base_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of a local HF folder, eval mode, SDPA attention, frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False), tok


def _cache_root() -> Path:
    return Path.home() / ".cache" / "vllm-seer"


def pack_main(argv: list[str] | None = None) -> int:
    """``vllm-seer train-gates pack``: tokenize the corpus into ``--out``."""
    p = argparse.ArgumentParser(prog="vllm-seer train-gates pack",
                                description="tokenize a corpus once into compressed shards")
    p.add_argument("--tokenizer", required=True, help="HF model folder whose tokenizer to use")
    p.add_argument("--out", type=Path, required=True, help="packed-data folder to write")
    p.add_argument("--corpus", default=None,
                   help="NAME:DIR:SUFFIXES[,...] (default: stdlib code, plus prose from "
                        "scripts/get-prose.sh when present)")
    p.add_argument("--max-train-tokens", type=float, default=24e6,
                   help="cap on training tokens over all corpora (default 24M)")
    p.add_argument("--shard-tokens", type=int, default=4 << 20)
    p.add_argument("--heldout-permille", type=int, default=100)
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    try:
        corpora = parse_corpora(a.corpus)
        tok = AutoTokenizer.from_pretrained(a.tokenizer)
        m = pack(tok, corpora, a.out, a.shard_tokens, int(a.max_train_tokens), a.heldout_permille,
                 tokenizer_name=Path(a.tokenizer).name)
    except PackError as e:
        log.error("%s", e)
        return 2
    t = m["totals"]
    if t["train_tokens"] < 20e6:
        log.warning("only %.1fM training tokens (the SmolLM2 recipe aims at >= 20M): add a corpus, "
                    "e.g. scripts/get-prose.sh", t["train_tokens"] / 1e6)
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """``vllm-seer train-gates export --state DIR --out GATES``: checkpoint from a saved state."""
    p = argparse.ArgumentParser(prog="vllm-seer train-gates export",
                                description="write the gate checkpoint of a training state")
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        export_gates(a.state, a.out)
    except (StateError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    return 0


def export_gates(state: Path, out: Path) -> Path:
    """Write the upstream-format checkpoint (bf16) of the weights saved in ``state``."""
    ck = load_checkpoint(state)
    cfg_path = state / GATE_CONFIG
    if ck is None or not cfg_path.is_file():
        raise FileNotFoundError(f"{state} holds no training state (state.json / {GATE_CONFIG})")
    config = json.loads(cfg_path.read_text())
    weights = {i: ck.weight[i].to(torch.bfloat16) for i in range(ck.weight.shape[0])}
    path = save_gates(out, weights, config)
    load_gates(path)  # the written checkpoint must load strictly
    log.info("wrote %s from %s (step %d)", path, state, ck.step)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-seer train-gates", description=__doc__.split("\n")[0],
                                epilog="also: `vllm-seer train-gates pack --help`, "
                                       "`vllm-seer train-gates export --help`")
    p.add_argument("model", help="local HF model folder (e.g. from `vllm-seer prepare-model`)")
    p.add_argument("--out", type=Path, required=True, help="gate checkpoint folder to write")
    p.add_argument("--state", type=Path, default=None,
                   help="resumable state + log.json + loss.png (default ~/.cache/vllm-seer/train/..)")
    p.add_argument("--data", type=Path, default=None,
                   help="packed corpus folder (default ~/.cache/vllm-seer/packed/<model>; packed "
                        "from --corpus when it has no manifest)")
    p.add_argument("--corpus", default=None, help="corpus to pack when --data is empty "
                   "(NAME:DIR:SUFFIXES[,...]; default stdlib code + prose if fetched)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the model's context, at most 8192)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=float, default=4.0,
                   help="schedule length in passes over the training windows (see --steps)")
    p.add_argument("--steps", type=int, default=None, help="schedule length (overrides --epochs)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--min-rel-improve", type=float, default=0.005)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="cumulative training wall-clock cap over all resumed runs")
    p.add_argument("--stop-after-s", type=float, default=None,
                   help="pause this invocation after this many seconds (state saved; rerun "
                        "continues), counted from the command's start")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="pause this invocation after this many steps")
    p.add_argument("--max-train-windows", type=int, default=None, help="use at most N windows")
    p.add_argument("--forward-batch", type=int, default=4, help="windows per base-model forward")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--base-model", default=None, help="hub id recorded as base_model")
    p.add_argument("--fresh", action="store_true", help="delete a saved state and start over")
    return p.parse_args(argv)


def train_gates_main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "pack":
        return pack_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    t_start = time.time()
    a = parse_args(argv)
    try:
        return _train(a, t_start)
    except (PackError, StateError) as e:
        log.error("%s", e)
        return 2


def _train(a: argparse.Namespace, t_start: float) -> int:
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_base_model(a.model, device, dtype)
    shape = ModelShape.from_hf_config(model.config)
    rope = RopeSpec.from_hf_config(model.config, shape.head_dim,
                                   model.config.max_position_embeddings)
    if rope.partial or rope.attention_scale() != 1.0:
        log.error("train-gates: %s has RoPE %s (rotary_dim %d, mscale %.4f); distillation supports "
                  "full-dim RoPE without an attention scale only (default / linear / llama3)",
                  a.model, rope.rope_type, rope.rotary_dim, rope.attention_scale())
        return 2
    seq_len = a.seq_len or min(8192, int(model.config.max_position_embeddings))
    name = Path(a.model).name
    data_dir = a.data or _cache_root() / "packed" / name
    if not (data_dir / "manifest.json").is_file():
        log.info("no packed corpus in %s: packing it now", data_dir)
        pack(tok, parse_corpora(a.corpus), data_dir, tokenizer_name=name)
    corpus = PackedCorpus(data_dir)
    if corpus.manifest["vocab_size"] != len(tok):
        raise PackError(f"{data_dir} was packed with a vocabulary of {corpus.manifest['vocab_size']}"
                        f" tokens, {a.model}'s tokenizer has {len(tok)}")
    train_w = corpus.windows("train", seq_len)[:a.max_train_windows]
    held_w = corpus.windows("heldout", seq_len, limit=a.eval_windows)
    if not train_w or not held_w:
        raise PackError(f"{data_dir}: {len(train_w)} train / {len(held_w)} held-out windows of "
                        f"{seq_len} tokens; a corpus with longer or more documents is needed")
    steps = a.steps or max(1, int(a.epochs * len(train_w) // a.batch_size))
    state = a.state or _cache_root() / "train" / f"{name}-T{seq_len}-B{a.block_size}"
    if a.fresh and state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    log.info("%d train windows (%.2fM distinct tokens), %d held-out, %d steps of %d x %d tokens",
             len(train_w), len(train_w) * seq_len / 1e6, len(held_w), steps, a.batch_size, seq_len)
    src = ModelSource(model, train_w, rope, a.block_size, a.forward_batch)
    t0 = time.time()
    eval_feats = ModelSource(model, held_w, rope, a.block_size, a.forward_batch).features(
        list(range(len(held_w))))
    log.info("held-out features: %d windows in %.1f s", len(held_w), time.time() - t0)
    spent = time.time() - t_start
    cfg = TrainConfig(steps=steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                      eval_every=a.eval_every, save_every=a.save_every, seed=a.seed,
                      patience=a.patience, min_rel_improve=a.min_rel_improve,
                      time_budget_s=a.time_budget_s,
                      stop_after_s=None if a.stop_after_s is None else a.stop_after_s - spent,
                      stop_after_steps=a.stop_after_steps)
    gates = GateModel(shape.num_layers, shape.num_q_heads, shape.head_dim, shape.head_dim,
                      rope.inv_freq(), a.block_size, seed=a.seed)
    shas = sorted(s["sha256"] for s in corpus.manifest["shards"])
    key = {"model": name, "shape": [shape.num_layers, shape.num_q_heads, shape.num_kv_heads,
                                    shape.head_dim], "seq_len": seq_len, "block_size": a.block_size,
           "data_sha256": shas}
    config = _checkpoint_config(a.model, a.base_model, a.block_size, shape.head_dim)
    write_json(state / GATE_CONFIG, config)
    bar = tqdm(total=steps, desc="train", unit="step")

    def progress(step: int, loss: float, stats: dict[str, float]) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.2f}", feat_tok_s=f"{stats['feature_tok_s']:.0f}",
                        train_tok_s=f"{stats['train_tok_s']:.0f}")

    ck = load_checkpoint(state)
    bar.update(ck.step if ck else 0)
    res = train(gates, src, eval_feats, cfg, device, state, progress, run_key=key)
    bar.close()
    out = export_gates(state, a.out)
    best = min(h["eval"] for h in res.history if h.get("eval") is not None)
    record = {"date": datetime.date.today().isoformat(), "device": _device_name(device),
              "model": name, "base_model": config["base_model"], "data": str(data_dir),
              "corpora": corpus.manifest["corpora"], "data_totals": corpus.manifest["totals"],
              "seq_len": seq_len, "train_windows": len(train_w),
              "distinct_train_tokens": len(train_w) * seq_len, "heldout_windows": len(held_w),
              "batch_size": a.batch_size, "schedule_steps": steps, "steps": res.steps,
              "tokens_seen": res.tokens_seen, "epochs_seen": res.tokens_seen / (len(train_w)
                                                                                 * seq_len),
              "stop_reason": res.stop_reason, "finished": res.stop_reason is not None,
              "early_stop_rule": PLATEAU_RULE, "patience": a.patience,
              "min_rel_improve": a.min_rel_improve, "time_budget_s": a.time_budget_s,
              "initial_eval_loss": res.initial_eval, "final_eval_loss": res.final_eval,
              "best_eval_loss": best, "final_train_loss": res.final_train,
              **{k: round(v, 2) for k, v in res.stats.items()}, "history": res.history,
              "gates": str(out)}
    write_json(state / "log.json", record)
    plot_losses(res.step_losses, res.history, state / "loss.png",
                f"{name} gates, {seq_len}-token windows")
    log.info("%s after %d steps (%.1fM tokens): held-out %.3f -> %.3f (best %.3f); features "
             "%.0f tok/s, training %.0f tok/s; state %s", res.stop_reason or "paused", res.steps,
             res.tokens_seen / 1e6, res.initial_eval, res.final_eval, best,
             res.stats["feature_tok_s"], res.stats["train_tok_s"], state)
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def _checkpoint_config(model_path: str, base_model: str | None, block_size: int,
                       head_dim: int) -> dict[str, Any]:
    folder = Path(model_path)
    config = json.loads((folder / "config.json").read_text())
    marker = folder / "vllm_seer_prepared.json"
    if base_model is None and marker.is_file():
        base_model = json.loads(marker.read_text()).get("base_model")
    config["base_model"] = base_model or str(folder.name)
    config.update(seer_config_fields(block_size=block_size, gate_hidden=head_dim))
    return config
