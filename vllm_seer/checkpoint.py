"""Gate checkpoints: the released upstream format and our safetensors form.

A checkpoint folder holds ``config.json`` (the base model's config plus ``base_model`` and the
``seerattn_*`` fields) and the weights, either ``attn_gate_weights.pth`` (upstream: a ``torch.save``
dict with keys ``model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight``, each
``[Hq, 3 * head_dim, gate_hidden]``) or ``gates.safetensors`` (same keys). Loading is strict: an
unreadable file, a ``config.json`` with a missing or ill-typed field, every missing, extra or
mis-shaped tensor, a non-float tensor and a NaN or Inf weight is an error that names the file and the
key. ``.pth`` files are read with ``torch.load(weights_only=True)``: a pickle that names anything but
tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
PTH_FILE = "attn_gate_weights.pth"
SAFETENSORS_FILE = "gates.safetensors"
KEY_TEMPLATE = "model.layers.{}.self_attn.attn_gate.mask_linear_k.weight"
_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn_gate\.mask_linear_k\.weight$")
SUPPORTED_GATE_TYPES = ("Qavg_Kmaxminavg",)
GATE_BLOCK_SIZES = (16, 32, 64, 128)  # a power of two: it is the Triton kernels' tile


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
        kv = self.config.get("num_key_value_heads")  # absent or null: multi-head attention
        return int(kv) if kv else self.num_q_heads

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


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """Read and check a gate checkpoint's ``config.json`` (without loading the weights).

    Raises:
        GateCheckpointError: the folder or file is missing or unreadable, the file is not a JSON
            object, or a field the loader needs is missing or has the wrong type or value.
    """
    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    try:
        if not folder.is_dir():
            raise GateCheckpointError(f"gate checkpoint {folder}: not a folder")
        if not cfg_path.is_file():
            raise GateCheckpointError(f"gate checkpoint {folder}: no {CONFIG_FILE} (expected the "
                                      "base model's config plus base_model and seerattn_* fields)")
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as e:
        raise GateCheckpointError(f"gate checkpoint {folder}: cannot read {CONFIG_FILE} "
                                  f"({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise GateCheckpointError(f"{cfg_path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise GateCheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise GateCheckpointError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    _check_config(config, cfg_path)
    return config


def _check_config(config: dict[str, Any], cfg_path: Path) -> None:
    """The fields the loader and the backend rely on, with their types and ranges."""
    _positive_int(config, "num_hidden_layers", cfg_path)
    heads = _positive_int(config, "num_attention_heads", cfg_path)
    kv = _optional_positive_int(config, "num_key_value_heads", cfg_path)
    if kv is not None and heads % kv:
        raise GateCheckpointError(f"{cfg_path}: num_attention_heads={heads} is not a multiple of "
                                  f"num_key_value_heads={kv}")
    head_dim = _optional_positive_int(config, "head_dim", cfg_path)
    if head_dim is None:
        hidden = _positive_int(config, "hidden_size", cfg_path)
        if hidden % heads:
            raise GateCheckpointError(f"{cfg_path}: no head_dim, and hidden_size={hidden} is not a "
                                      f"multiple of num_attention_heads={heads}")
        head_dim = hidden // heads
    gate_hidden = _optional_positive_int(config, "seerattn_gate_hidden_size", cfg_path)
    if gate_hidden is not None and gate_hidden != head_dim:
        raise GateCheckpointError(f"{cfg_path}: seerattn_gate_hidden_size={gate_hidden} must equal "
                                  f"head_dim={head_dim} (the Qavg gate has no query projection)")
    gate_type = config.get("seerattn_gate_type", "Qavg_Kmaxminavg")
    if gate_type not in SUPPORTED_GATE_TYPES:
        raise GateCheckpointError(f"{cfg_path}: seerattn_gate_type={gate_type!r} is not supported "
                                  f"(expected one of {SUPPORTED_GATE_TYPES})")
    block = config.get("seerattn_gate_block_size", 64)
    if isinstance(block, bool) or block not in GATE_BLOCK_SIZES:
        raise GateCheckpointError(f"{cfg_path}: seerattn_gate_block_size={block!r} is not supported "
                                  f"(expected one of {list(GATE_BLOCK_SIZES)}; released gates use 64)")
    base = config.get("base_model")
    if not isinstance(base, str) or not base:
        raise GateCheckpointError(f"{cfg_path}: missing required key 'base_model' (the model the "
                                  f"gates were trained for, a non-empty string), got {base!r}")


def _positive_int(config: dict[str, Any], key: str, cfg_path: Path) -> int:
    """``config[key]``, required to be an integer > 0."""
    value = _optional_positive_int(config, key, cfg_path)
    if value is None:
        raise GateCheckpointError(f"{cfg_path}: missing required key {key!r} (a positive integer)")
    return value


def _optional_positive_int(config: dict[str, Any], key: str, cfg_path: Path) -> int | None:
    """``config[key]`` checked to be an integer > 0; ``None`` when absent or null."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GateCheckpointError(f"{cfg_path}: {key!r} must be a positive integer, got {value!r}")
    return value


def load_gates(path: str | Path) -> GateCheckpoint:
    """Load and validate a gate checkpoint folder (upstream ``.pth`` or ``gates.safetensors``)."""
    folder = Path(path)
    config = read_checkpoint_config(folder)
    raw, source = _read_tensors(folder)
    ckpt = GateCheckpoint(weights={}, config=config, path=folder)
    ckpt.weights = _validate(raw, ckpt, source)
    return ckpt


def _read_tensors(folder: Path) -> tuple[dict[str, Any], Path]:
    st, pth = folder / SAFETENSORS_FILE, folder / PTH_FILE
    if st.is_file():  # preferred when both exist; a bad one is an error, never a silent fallback
        try:
            return load_file(str(st)), st
        except (SafetensorError, OSError) as e:
            raise GateCheckpointError(f"{st}: cannot be read as a safetensors file (truncated or "
                                      f"not safetensors?) ({e})") from e
    if pth.is_file():
        try:
            raw = torch.load(pth, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad pickle; re-raise named
            why = " ".join(str(e).split())  # torch's messages span several lines
            raise GateCheckpointError(f"{pth}: cannot be read as a weights-only torch file "
                                      f"(truncated, or it holds objects other than tensors) ({why})") from e
        if not isinstance(raw, dict):
            raise GateCheckpointError(f"{pth}: expected a dict of tensors, got {type(raw).__name__}")
        return raw, pth
    raise GateCheckpointError(f"gate checkpoint {folder}: neither {SAFETENSORS_FILE} nor {PTH_FILE}")


def _validate(raw: dict[str, Any], ckpt: GateCheckpoint, source: Path) -> dict[int, torch.Tensor]:
    expected = (ckpt.num_q_heads, 3 * ckpt.head_dim, ckpt.gate_hidden)
    weights: dict[int, torch.Tensor] = {}
    for key, value in raw.items():
        m = _KEY_RE.match(key) if isinstance(key, str) else None
        if m is None:
            raise GateCheckpointError(f"{source}: unexpected tensor {key!r} (expected only keys "
                                      f"{KEY_TEMPLATE.format('{i}')})")
        if not isinstance(value, torch.Tensor):
            raise GateCheckpointError(f"{source}: {key!r} is not a tensor "
                                      f"(got {type(value).__name__})")
        if not value.is_floating_point():
            raise GateCheckpointError(f"{source}: {key!r} has dtype {value.dtype}, expected a "
                                      "floating-point tensor")
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
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise GateCheckpointError(f"{source}: {key!r} has {bad} NaN or Inf value(s); gate "
                                      "weights must be finite")
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
