"""``SeerConfig``: the plugin's settings from ``--additional-config '{"seer": {...}}'``.

Defaults come from the gate checkpoint's ``config.json`` (``seerattn_*`` fields); keys given on the
command line override them. Unknown keys and out-of-range values raise :class:`SeerConfigError`
naming the setting, so a bad flag stops the server at start-up.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vllm_seer.gate import SPARSITY_METHODS, Selection

logger = logging.getLogger(__name__)

ADDITIONAL_CONFIG_KEY = "seer"
# default of ``min_prefill_tokens`` per device type. On CUDA, the crossover measured on the H200 in
# vLLM's default compiled mode (2026-12-06, vLLM 0.26, Llama-3.1-8B shapes, nz_ratio 0.1, every
# prompt forced through the Seer path; benchmarks/results/e2e-ttft-h200-c.md, "Short-prompt
# sweep"): TTFT 0.77x FlashAttention 3 at 1k, 0.97x at 2k, 1.08x at 4k and 8k, 1.23x at 16k, so
# steps whose context is under 4096 tokens stay on FlashAttention (an H100 in eager mode with the
# kernels of 2026-11-22 had put it at 16k). Only nz_ratio 0.1 was swept: a denser setting may
# cross over later (set ``min_prefill_tokens`` then)
DEFAULT_MIN_PREFILL_TOKENS = {"cpu": 2048, "cuda": 4096}
# default of ``pair_max_ratio``: two adjacent query blocks of a head run as one 128-row tile over
# the union of their lists when 2 |A u B| <= ratio * (|A| + |B|) (CUDA kernels only,
# kernels/sparse_prefill/pairs.py). Off: measured on an H100 (2026-12-07,
# benchmarks/results/pair-variants-h100.md) the pair tiles ran 0.78-0.88x the 64-row kernel on
# structured and real selections even at union work ratio 1.01 (8 warps, one CTA per SM)
DEFAULT_PAIR_MAX_RATIO = 0.0

# key -> (checkpoint config.json field or None, documentation)
KEYS: dict[str, tuple[str | None, str]] = {
    "gates": (None, "gate checkpoint: a local folder or a Hugging Face hub id (required)"),
    "sparsity_method": ("seerattn_sparsity_method", "'threshold' or 'nz_ratio' (top-k)"),
    "threshold": ("seerattn_threshold", "keep key blocks whose gate probability > threshold, (0, 1)"),
    "nz_ratio": ("seerattn_nz_ratio", "target density of the causal block triangle, (0, 1]"),
    "last_block_dense": ("seerattn_last_block_dense", "last two query-block rows of a step dense"),
    "sink_blocks": (None, "the first N key blocks are active in every row (integer >= 0; under "
                          "nz_ratio they count in the row's top-k; default 0: upstream's "
                          "selection)"),
    "min_prefill_tokens": (None, "prefills whose context is shorter stay on the dense path (>= 0; "
                                 "default 2048 on CPU, 4096 on CUDA)"),
    "dense_layers": (None, "list of layer indices that always stay dense"),
    "pooled_key_cache": (None, "CUDA: keep the gate's pooled keys of complete blocks across the "
                               "prefill steps of a request (3/64 of a bf16 KV cache's memory at "
                               "64-token pages; default false: measured no faster on an H100)"),
    "pair_max_ratio": (None, "CUDA: run two adjacent query blocks as one 128-row tile when their "
                             "union costs at most this times their own work (0: never; else in "
                             f"[1, 2]; default {DEFAULT_PAIR_MAX_RATIO})"),
}


class SeerConfigError(ValueError):
    """An invalid ``seer`` setting; the message names it."""


@dataclass(frozen=True)
class SeerConfig:
    """Validated plugin settings.

    Attributes:
        gates: resolved local folder of the gate checkpoint.
        gates_source: what the user passed (folder or hub id), for logs and the info metric.
        selection: how active blocks are chosen.
        min_prefill_tokens: prefill rows whose context (``seq_len``) is shorter stay dense;
            ``None`` until :meth:`for_device` picks the device's default.
        dense_layers: layers that never take the sparse path.
        pair_max_ratio: work ratio up to which the CUDA kernels run two adjacent query blocks
            as one 128-row tile (0: never).
        pooled_key_cache: keep the pooled keys of complete key blocks across prefill steps
            (CUDA; :mod:`vllm_seer.kernels.paged_pool.key_cache`).
    """

    gates: Path
    gates_source: str
    selection: Selection
    min_prefill_tokens: int | None = None
    dense_layers: frozenset[int] = field(default_factory=frozenset)
    pair_max_ratio: float = DEFAULT_PAIR_MAX_RATIO
    pooled_key_cache: bool = False

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> SeerConfig:
        """Parse vLLM's ``additional_config`` dict (the ``seer`` entry)."""
        if not additional_config or ADDITIONAL_CONFIG_KEY not in additional_config:
            raise SeerConfigError(
                "the Seer backend needs --additional-config '{\"seer\": {\"gates\": PATH_OR_HUB_ID}}'"
            )
        return cls.from_dict(additional_config[ADDITIONAL_CONFIG_KEY])

    @classmethod
    def from_dict(cls, raw: Any, checkpoint_config: dict[str, Any] | None = None) -> SeerConfig:
        """Validate ``raw`` (the ``seer`` dict) over the checkpoint's ``seerattn_*`` defaults.

        ``checkpoint_config`` is read from the resolved gate folder when not given.
        """
        if not isinstance(raw, dict):
            raise SeerConfigError(f"additional_config['seer'] must be a JSON object, got {raw!r}")
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise SeerConfigError(
                f"unknown seer setting(s) {unknown}; valid settings: {', '.join(KEYS)}"
            )
        if "gates" not in raw:
            raise SeerConfigError("seer setting 'gates' is required (a local folder or a hub id)")
        source = _expect(raw, "gates", str)
        folder = resolve_gates(source)
        if checkpoint_config is None:
            from vllm_seer.checkpoint import read_checkpoint_config

            checkpoint_config = read_checkpoint_config(folder)
        merged = {k: checkpoint_config[f] for k, (f, _) in KEYS.items() if f and f in checkpoint_config}
        # a bad default from the checkpoint names the file and field it came from
        origin = {k: f" (from {folder / 'config.json'} {KEYS[k][0]!r})" for k in merged if k not in raw}
        merged.update({k: v for k, v in raw.items() if k != "gates"})
        selection = Selection(
            method=_choice(merged, "sparsity_method", SPARSITY_METHODS, "threshold", origin),
            threshold=_number(merged, "threshold", 5e-4, origin, lo=0.0, hi=1.0, lo_open=True,
                              hi_open=True),
            nz_ratio=_number(merged, "nz_ratio", 0.1, origin, lo=0.0, hi=1.0, lo_open=True),
            last_block_dense=_flag(merged, "last_block_dense", True, origin),
            sink_blocks=_count(merged, "sink_blocks", 0),
        )
        min_tokens = _count(merged, "min_prefill_tokens", None)
        dense = merged.get("dense_layers", [])
        if not isinstance(dense, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in dense
        ):
            raise SeerConfigError(f"seer setting 'dense_layers' must be a list of layer indices "
                                  f"(integers >= 0), got {dense!r}")
        n_layers = checkpoint_config.get("num_hidden_layers")
        if n_layers is not None and any(i >= int(n_layers) for i in dense):
            raise SeerConfigError(f"seer setting 'dense_layers' {dense} names a layer >= "
                                  f"num_hidden_layers={n_layers}")
        pair_ratio = merged.get("pair_max_ratio", DEFAULT_PAIR_MAX_RATIO)
        if (isinstance(pair_ratio, bool) or not isinstance(pair_ratio, int | float)
                or not (pair_ratio == 0 or 1 <= pair_ratio <= 2)):
            raise SeerConfigError(f"seer setting 'pair_max_ratio' must be 0 (no pair tiles) or a "
                                  f"number in [1, 2], got {pair_ratio!r}")
        key_cache = _flag(merged, "pooled_key_cache", False, origin)
        return cls(folder, source, selection, min_tokens, frozenset(dense), float(pair_ratio),
                   key_cache)

    def for_device(self, device_type: str) -> SeerConfig:
        """This config with ``min_prefill_tokens`` set (the device's default when not given)."""
        if self.min_prefill_tokens is not None:
            return self
        default = DEFAULT_MIN_PREFILL_TOKENS.get(device_type, DEFAULT_MIN_PREFILL_TOKENS["cpu"])
        return replace(self, min_prefill_tokens=default)

    def describe(self) -> dict[str, str]:
        """String labels for the config info metric and logs."""
        s = self.selection
        return {
            "gates": self.gates_source,
            "sparsity_method": s.method,
            "threshold": f"{s.threshold:g}" if s.method == "threshold" else "",
            "nz_ratio": f"{s.nz_ratio:g}" if s.method == "nz_ratio" else "",
            "min_prefill_tokens": str(self.min_prefill_tokens),
            "last_block_dense": str(s.last_block_dense).lower(),
            "sink_blocks": str(s.sink_blocks),
            "pair_max_ratio": f"{self.pair_max_ratio:g}",
            "pooled_key_cache": str(self.pooled_key_cache).lower(),
        }


def resolve_gates(source: str) -> Path:
    """A local folder as is; otherwise a hub id fetched with ``huggingface_hub`` (offline-aware:
    with ``HF_HUB_OFFLINE=1`` only the local hub cache is used)."""
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            return path.resolve()
        exists = path.exists()
    except OSError as e:  # e.g. a parent folder without search permission
        raise SeerConfigError(f"seer setting 'gates': cannot access {source!r} "
                              f"({e.strerror or e})") from e
    if exists:
        raise SeerConfigError(f"seer setting 'gates': {source!r} is a file, expected a folder "
                              "holding config.json and the gate weights (or a hub id 'owner/name')")
    if not source or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise SeerConfigError(f"seer setting 'gates': {source!r} is not a folder and not a hub id "
                              "of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(source, local_files_only=offline,
                                      allow_patterns=["config.json", "*.pth", "*.safetensors"]))
    except HFValidationError as e:
        raise SeerConfigError(f"seer setting 'gates': {source!r} is not a folder and not a valid hub id "
                              f"({e})") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        mode = "offline (HF_HUB_OFFLINE=1), not in the local hub cache" if offline else str(e)
        raise SeerConfigError(f"seer setting 'gates': no local folder {source!r}, and cannot get "
                              f"hub repo {source!r}: {mode}") from e


def _expect(raw: dict[str, Any], key: str, typ: type) -> Any:
    value = raw[key]
    if not isinstance(value, typ):
        raise SeerConfigError(f"seer setting {key!r} must be a {typ.__name__}, got {value!r}")
    return value


def _choice(m: dict[str, Any], key: str, options: tuple[str, ...], default: str,
            origin: dict[str, str]) -> str:
    value = m.get(key, default)
    if value not in options:
        raise SeerConfigError(f"seer setting {key!r} must be one of {list(options)}, got {value!r}"
                              f"{origin.get(key, '')}")
    return str(value)


def _flag(m: dict[str, Any], key: str, default: bool, origin: dict[str, str]) -> bool:
    value = m.get(key, default)
    if not isinstance(value, bool):
        raise SeerConfigError(f"seer setting {key!r} must be true or false, got {value!r}"
                              f"{origin.get(key, '')}")
    return value


def _count(m: dict[str, Any], key: str, default: int | None) -> int | None:
    """An integer >= 0; ``None`` (absent or null) only for a setting whose default is ``None``."""
    value = m.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SeerConfigError(f"seer setting {key!r} must be an integer >= 0, got {value!r}")
    return value


def _number(m: dict[str, Any], key: str, default: float, origin: dict[str, str], *, lo: float,
            hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite number in the interval; NaN and Inf (which JSON parsers accept) are refused."""
    value = m.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SeerConfigError(f"seer setting {key!r} must be a number, got {value!r}"
                              f"{origin.get(key, '')}")
    v = float(value)
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if below or above or not math.isfinite(v):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise SeerConfigError(f"seer setting {key!r} must be in {interval}, got {value!r}"
                              f"{origin.get(key, '')}")
    return v
