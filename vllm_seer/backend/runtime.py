"""The per-process :class:`SeerRuntime` singleton (created by the first attention impl).

Before the runtime loads the gate weights, the settings, the served model and the gates' base model
are checked (:mod:`vllm_seer.validate`): a model the backend would serve wrongly stops start-up here,
in the first worker that builds a Seer attention layer.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_seer.backend import compat
from vllm_seer.backend.common import SeerRuntime
from vllm_seer.backend.stage import PipelineStage
from vllm_seer.checkpoint import read_checkpoint_config
from vllm_seer.config import SeerConfig, SeerConfigError
from vllm_seer.validate import ServedModel, check_gates_fit, check_served_model

_RUNTIME: SeerRuntime | None = None


def served_model(vllm_config: Any) -> ServedModel:
    """The facts :func:`check_served_model` needs, read from vLLM's ``VllmConfig``.

    Attribute names differ across vLLM 0.26 … 0.33; missing ones fall back to the HF config.
    """
    mc = vllm_config.model_config
    hf = getattr(mc, "hf_text_config", None) or mc.hf_config
    attn_type = getattr(mc, "attn_type", None)
    if attn_type is None:  # older vLLM
        attn_type = "encoder_decoder" if getattr(mc, "is_encoder_decoder", False) else "decoder"
    get_window = getattr(mc, "get_sliding_window", None)
    window = get_window() if callable(get_window) else getattr(hf, "sliding_window", None)
    cache_config = getattr(vllm_config, "cache_config", None)
    return ServedModel(
        name=str(mc.model),
        architectures=tuple(getattr(mc.hf_config, "architectures", None) or ()),
        hf_config=hf,
        head_dim=int(mc.get_head_size()),
        max_model_len=int(mc.max_model_len),
        attn_type=str(attn_type),
        use_mla=bool(getattr(mc, "use_mla", False)),
        uses_alibi=bool(getattr(mc, "uses_alibi", False)),
        sliding_window=window,
        cache_dtype=str(getattr(cache_config, "cache_dtype", "auto")),
        device=compat.device_type(vllm_config),
    )


def check_startup(vllm_config: Any) -> SeerConfig:
    """Every start-up check that needs no gate weights: settings, served model, base model.

    Raises:
        SeerConfigError, GateCheckpointError, UnsupportedModelError: naming what is wrong.
    """
    config = SeerConfig.from_additional_config(vllm_config.additional_config)
    model = served_model(vllm_config)
    check_served_model(model)
    if config.pooled_key_cache:
        if getattr(vllm_config, "kv_transfer_config", None) is not None:
            raise SeerConfigError("seer setting 'pooled_key_cache' cannot be used with "
                                  "--kv-transfer-config (or KV offloading, which sets it): a KV "
                                  "connector writes cache pages outside the steps that tell the "
                                  "pooled-key cache which entries are stale")
        if model.device != "cuda":
            raise SeerConfigError(f"seer setting 'pooled_key_cache' is for CUDA (the Triton gate); "
                                  f"this server runs on {model.device}")
    check_gates_fit(read_checkpoint_config(config.gates), config.gates, model)
    return config


def get_runtime(vllm_config: Any = None, num_heads: int = 0, num_kv_heads: int = 0,
                head_dim: int = 0, device: torch.device | None = None) -> SeerRuntime:
    """Return the process's runtime, creating it on the first call (which must pass the config)."""
    global _RUNTIME
    if _RUNTIME is None:
        if vllm_config is None or device is None:
            raise RuntimeError("Seer backend: runtime used before any Seer attention layer was built")
        config = check_startup(vllm_config)
        stage = PipelineStage.of(compat.total_num_layers(vllm_config.model_config),
                                 *compat.pp_rank_and_size())
        _RUNTIME = SeerRuntime(vllm_config, config, num_heads, num_kv_heads, head_dim,
                               compat.tp_rank(), device, stage)
    return _RUNTIME
