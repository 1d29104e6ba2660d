"""Gate checkpoints: the released upstream format and our safetensors form.

A checkpoint folder holds ``config.json`` (the base model's config plus ``base_model`` and the
``seerattn_*`` fields) and the weights, either ``attn_gate_weights.pth`` (upstream: a ``torch.save``
dict with keys ``model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight``, each
``[Hq, 3 * head_dim, gate_hidden]``) or ``gates.safetensors`` (same keys). Loading is strict: every
missing, extra or mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
PTH_FILE = "attn_gate_weights.pth"
SAFETENSORS_FILE = "gates.safetensors"
KEY_TEMPLATE = "model.layers.{}.self_attn.attn_gate.mask_linear_k.weight"
_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn_gate\.mask_linear_k\.weight$")
SUPPORTED_GATE_TYPES = ("Qavg_Kmaxminavg",)


class GateCheckpointError(ValueError):
    """A gate checkpoint is missing, malformed or does not fit the served model."""


@dataclass
class GateCheckpoint:
    """Gate weights of every layer plus the checkpoint's ``config.json``.

    Attributes:
        weights: layer index → ``[Hq, 3 * head_dim, gate_hidden]``.
        config: the whole ``config.json`` dict.
        path: the folder it came from.
    """

    weights: dict[int, torch.Tensor]
    config: dict[str, Any]
    path: Path

    @property
    def num_layers(self) -> int:
        return int(self._cfg("num_hidden_layers"))

    @property
    def num_q_heads(self) -> int:
        return int(self._cfg("num_attention_heads"))

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads", self.num_q_heads))

    @property
    def head_dim(self) -> int:
        hd = self.config.get("head_dim")
        return int(hd) if hd else int(self._cfg("hidden_size")) // self.num_q_heads

    @property
    def gate_hidden(self) -> int:
        return int(self.config.get("seerattn_gate_hidden_size", self.head_dim))

    @property
    def block_size(self) -> int:
        return int(self.config.get("seerattn_gate_block_size", 64))

    @property
    def gate_type(self) -> str:
        return str(self.config.get("seerattn_gate_type", "Qavg_Kmaxminavg"))

    def _cfg(self, key: str) -> Any:
        if key not in self.config:
            raise GateCheckpointError(f"{self.path / CONFIG_FILE}: missing required key {key!r}")
        return self.config[key]

    def check_against(self, *, num_layers: int, num_q_heads: int, num_kv_heads: int,
                      head_dim: int, where: str = "the served model") -> None:
        """Refuse a checkpoint whose shapes do not fit ``where`` (layers, heads, head_dim)."""
        theirs = (self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim)
        ours = (num_layers, num_q_heads, num_kv_heads, head_dim)
        names = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
        for name, a, b in zip(names, theirs, ours, strict=True):
            if a != b:
                raise GateCheckpointError(
                    f"gate checkpoint {self.path}: {name}={a} but {where} has {name}={b}"
                )


def seer_config_fields(method: str = "threshold", threshold: float = 5e-4, nz_ratio: float = 0.1,
                       block_size: int = 64, gate_hidden: int = 128,
                       last_block_dense: bool = True) -> dict[str, Any]:
    """The ``seerattn_*`` fields of a prefill-gate ``config.json``."""
    return {
        "seerattn_sparsity_method": method,
        "seerattn_threshold": threshold,
        "seerattn_nz_ratio": nz_ratio,
        "seerattn_gate_type": "Qavg_Kmaxminavg",
        "seerattn_gate_block_size": block_size,
        "seerattn_gate_hidden_size": gate_hidden,
        "seerattn_last_block_dense": last_block_dense,
        "seerattn_gate_force_double": False,
    }


def load_gates(path: str | Path) -> GateCheckpoint:
    """Load and validate a gate checkpoint folder (upstream ``.pth`` or ``gates.safetensors``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise GateCheckpointError(f"gate checkpoint {folder}: not a folder")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise GateCheckpointError(f"gate checkpoint {folder}: no {CONFIG_FILE}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise GateCheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise GateCheckpointError(f"{cfg_path}: expected a JSON object")
    raw, source = _read_tensors(folder)
    ckpt = GateCheckpoint(weights={}, config=config, path=folder)
    ckpt.weights = _validate(raw, ckpt, source)
    return ckpt


def _read_tensors(folder: Path) -> tuple[dict[str, Any], Path]:
    st, pth = folder / SAFETENSORS_FILE, folder / PTH_FILE
    if st.is_file():
        return load_file(str(st)), st
    if pth.is_file():
        try:
            raw = torch.load(pth, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad pickle; re-raise named
            raise GateCheckpointError(f"{pth}: cannot be read as a weights-only torch file ({e})") from e
        if not isinstance(raw, dict):
            raise GateCheckpointError(f"{pth}: expected a dict of tensors, got {type(raw).__name__}")
        return raw, pth
    raise GateCheckpointError(f"gate checkpoint {folder}: neither {SAFETENSORS_FILE} nor {PTH_FILE}")


def _validate(raw: dict[str, Any], ckpt: GateCheckpoint, source: Path) -> dict[int, torch.Tensor]:
    if ckpt.gate_type not in SUPPORTED_GATE_TYPES:
        raise GateCheckpointError(
            f"{ckpt.path / CONFIG_FILE}: seerattn_gate_type={ckpt.gate_type!r} is not supported "
            f"(expected one of {SUPPORTED_GATE_TYPES})"
        )
    if ckpt.gate_hidden != ckpt.head_dim:
        raise GateCheckpointError(
            f"{ckpt.path / CONFIG_FILE}: seerattn_gate_hidden_size={ckpt.gate_hidden} must equal "
            f"head_dim={ckpt.head_dim} (the Qavg gate has no query projection)"
        )
    expected = (ckpt.num_q_heads, 3 * ckpt.head_dim, ckpt.gate_hidden)
    weights: dict[int, torch.Tensor] = {}
    for key, value in raw.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise GateCheckpointError(f"{source}: unexpected tensor {key!r}")
        if not isinstance(value, torch.Tensor):
            raise GateCheckpointError(f"{source}: {key!r} is not a tensor")
        layer = int(m.group(1))
        if layer >= ckpt.num_layers:
            raise GateCheckpointError(
                f"{source}: {key!r} is beyond num_hidden_layers={ckpt.num_layers}"
            )
        if tuple(value.shape) != expected:
            raise GateCheckpointError(
                f"{source}: {key!r} has shape {list(value.shape)}, expected {list(expected)} "
                "[num_attention_heads, 3*head_dim, seerattn_gate_hidden_size]"
            )
        weights[layer] = value
    missing = [KEY_TEMPLATE.format(i) for i in range(ckpt.num_layers) if i not in weights]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise GateCheckpointError(f"{source}: missing {', '.join(missing[:3])}{more}")
    return weights


def save_gates(out_dir: str | Path, weights: dict[int, torch.Tensor], config: dict[str, Any],
               formats: tuple[str, ...] = ("pth", "safetensors")) -> Path:
    """Write ``config.json`` and the weights in the requested formats; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(formats) - {"pth", "safetensors"}
    if unknown:
        raise ValueError(f"save_gates: unknown formats {sorted(unknown)} (expected pth, safetensors)")
    tensors = {KEY_TEMPLATE.format(i): w.detach().contiguous().cpu() for i, w in sorted(weights.items())}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if "pth" in formats:
        torch.save(tensors, out / PTH_FILE)
    if "safetensors" in formats:
        save_file(tensors, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    return out


def summarize(ckpt: GateCheckpoint) -> dict[str, Any]:
    """A JSON-able summary for ``vllm-seer inspect``."""
    first = ckpt.weights[0]
    return {
        "path": str(ckpt.path),
        "base_model": ckpt.config.get("base_model"),
        "layers": ckpt.num_layers,
        "q_heads": ckpt.num_q_heads,
        "kv_heads": ckpt.num_kv_heads,
        "head_dim": ckpt.head_dim,
        "gate_hidden": ckpt.gate_hidden,
        "block_size": ckpt.block_size,
        "dtype": str(first.dtype).removeprefix("torch."),
        "parameters": sum(w.numel() for w in ckpt.weights.values()),
        **{k: v for k, v in sorted(ckpt.config.items()) if k.startswith("seerattn_")},
    }
