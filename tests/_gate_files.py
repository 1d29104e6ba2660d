"""Shared by the checkpoint tests: a small model config and in-place edits of a gate folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_seer.checkpoint import PTH_FILE, SAFETENSORS_FILE

MODEL_CFG = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "hidden_size": 256, "head_dim": 64}


def edit_json(path: Path, **changes: Any) -> Path:
    """Rewrite the JSON object in ``path`` with ``changes`` (a ``None`` value removes the key)."""
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
    return path


def rewrite_pth(gates: Path, fn: Callable[[dict[str, Any]], Any]) -> Path:
    """Drop the safetensors copy and rewrite the upstream .pth through ``fn`` (edits in place)."""
    (gates / SAFETENSORS_FILE).unlink()
    raw = torch.load(gates / PTH_FILE, weights_only=True)
    fn(raw)
    torch.save(raw, gates / PTH_FILE)
    return gates / PTH_FILE
