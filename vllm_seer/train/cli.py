"""``vllm-seer train-gates MODEL --out DIR``: distil prefill gates for a transformers model.

Stage 1 extracts features (one no-grad forward per sequence) into a resumable on-disk cache;
stage 2 trains the gates from that cache; the result is written with
:func:`vllm_seer.checkpoint.save_gates` (upstream ``.pth``, ``gates.safetensors``,
``config.json``).

Entry point for the CLI: :func:`train_gates_main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_seer.checkpoint import load_gates, save_gates, seer_config_fields
from vllm_seer.rope import RopeSpec
from vllm_seer.train.data import sequences
from vllm_seer.train.features import ModelShape, sequence_features
from vllm_seer.train.trainer import GateModel, TrainConfig, train

log = logging.getLogger(__name__)


def load_base_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of a local HF folder, eval mode, eager attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False), tok


def build_cache(model: Any, tok: Any, split: str, count: int, seq_len: int, cache: Path,
                block_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Features of ``count`` sequences of ``split``, read from / added to ``cache/<split>/``."""
    folder = cache / split
    folder.mkdir(parents=True, exist_ok=True)
    shape = ModelShape.from_hf_config(model.config)
    spec = RopeSpec.from_hf_config(model.config, shape.head_dim)
    out = []
    bar = tqdm(total=count, desc=f"features[{split}]", unit="seq")
    for i, (sid, ids) in enumerate(sequences(tok, split, seq_len, count, seed=seed)):
        f = folder / f"{i:05d}.pt"
        if f.is_file():
            item = torch.load(f, map_location="cpu", weights_only=True)
        else:
            item = sequence_features(model, ids, shape, spec, block_size)
            item["input_ids"] = ids
            torch.save(item, f.with_suffix(".tmp"))
            f.with_suffix(".tmp").replace(f)
            (folder / "index.jsonl").open("a").write(json.dumps({"i": i, "id": sid}) + "\n")
        out.append({k: item[k] for k in ("q_gate", "k_pooled", "target")})
        bar.update(1)
    bar.close()
    if len(out) < count:
        log.warning("%s split gave only %d of %d sequences of %d tokens", split, len(out), count,
                    seq_len)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-seer train-gates", description=__doc__.split("\n")[0])
    p.add_argument("model", help="local HF model folder (e.g. from `vllm-seer prepare-model`)")
    p.add_argument("--out", type=Path, required=True, help="gate checkpoint folder to write")
    p.add_argument("--cache", type=Path, default=None,
                   help="feature cache + resumable train state (default ~/.cache/vllm-seer/...)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--train-seqs", type=int, default=400)
    p.add_argument("--eval-seqs", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--base-model", default=None, help="hub id recorded as base_model")
    p.add_argument("--extract-only", action="store_true", help="stop after building the cache")
    p.add_argument("--fresh", action="store_true", help="ignore a saved train state")
    return p.parse_args(argv)


def train_gates_main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status."""
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_base_model(a.model, device, dtype)
    rope = RopeSpec.from_hf_config(model.config, ModelShape.from_hf_config(model.config).head_dim,
                                   model.config.max_position_embeddings)
    if rope.partial or rope.attention_scale() != 1.0:
        log.error("train-gates: %s has RoPE %s (rotary_dim %d, mscale %.4f); distillation supports "
                  "full-dim RoPE without an attention scale only (default / linear / llama3)",
                  a.model, rope.rope_type, rope.rotary_dim, rope.attention_scale())
        return 2
    cache = a.cache or Path.home() / ".cache" / "vllm-seer" / "features" / (
        f"{Path(a.model).name}-T{a.seq_len}-B{a.block_size}")
    t0 = time.time()
    ev = build_cache(model, tok, "heldout", a.eval_seqs, a.seq_len, cache, a.block_size, a.seed)
    tr = build_cache(model, tok, "train", a.train_seqs, a.seq_len, cache, a.block_size, a.seed)
    t_feat = time.time() - t0
    log.info("features ready in %.0f s (%d train, %d held-out)", t_feat, len(tr), len(ev))
    if a.extract_only:
        return 0
    if not tr or not ev:
        log.error("no training or held-out sequences of %d tokens were found", a.seq_len)
        return 1
    shape = ModelShape.from_hf_config(model.config)
    spec = RopeSpec.from_hf_config(model.config, shape.head_dim)
    del model
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                      eval_every=a.eval_every, save_every=a.save_every, seed=a.seed)
    gates = GateModel(shape.num_layers, shape.num_q_heads, shape.head_dim, shape.head_dim,
                      spec.inv_freq(), a.block_size, seed=a.seed)
    state = cache / "train_state.pt"
    if a.fresh:
        state.unlink(missing_ok=True)
    bar = tqdm(total=cfg.steps, desc="train", unit="step")
    result = train(gates, tr, ev, cfg, device, state,
                   progress=lambda s, loss: (bar.update(s - bar.n), bar.set_postfix(loss=loss)))
    bar.close()
    config = _checkpoint_config(a.model, a.base_model, a.block_size, shape.head_dim)
    weights = {i: gates.weight[i].detach().to("cpu", torch.bfloat16)
               for i in range(shape.num_layers)}
    out = save_gates(a.out, weights, config)
    load_gates(out)  # the written checkpoint must load strictly
    record = {"steps": result.steps, "train_seconds": round(result.seconds, 1),
              "feature_seconds": round(t_feat, 1), "train_sequences": len(tr),
              "eval_sequences": len(ev), "seq_len": a.seq_len,
              "tokens_seen": result.steps * cfg.batch_size * a.seq_len,
              "distinct_train_tokens": len(tr) * a.seq_len,
              "initial_eval_loss": result.initial_eval,
              "final_eval_loss": result.final_eval, "final_train_loss": result.final_train,
              "history": result.history, "device": str(device)}
    (cache / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %s; eval loss %.4f -> %.4f; record %s", out, result.initial_eval,
             result.final_eval, cache / "train_record.json")
    return 0


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
