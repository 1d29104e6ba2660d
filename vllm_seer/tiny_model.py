"""A small random-weight Llama with a locally trained tokenizer and random gates, built offline.

Used by the tests and by ``vllm-seer demo`` where no distilled gates are available. Everything is
deterministic (fixed seeds, fixed training text taken from Python's own standard library sources).
"""

from __future__ import annotations

import json
import logging
import sysconfig
from pathlib import Path
from typing import Any

import torch

from vllm_seer.checkpoint import save_gates, seer_config_fields

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QK_SHARPEN = 6.0  # q/k projection scale: attention logits with std ~4 instead of ~0.1
TRAINING_FILES = ("textwrap.py", "string.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py")


def _training_text() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / f).read_text(encoding="utf-8") for f in TRAINING_FILES]


def build_tokenizer(out: Path, vocab_size: int = 2048) -> None:
    """Train a byte-level BPE tokenizer on stdlib sources and save it HF-style into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_tiny_llama(out: str | Path, *, num_layers: int = 4, num_heads: int = 4,
                     num_kv_heads: int = 2, head_dim: int = 64, max_len: int = 8192,
                     dtype: str = "float32", seed: int = 0) -> Path:
    """Write config, tokenizer, safetensors weights and ``gates/`` (upstream format) to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=num_heads * head_dim, intermediate_size=4 * num_heads * head_dim,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=max_len,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
        pad_token_id=0, torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharpen attention: a flat random attention would hide K/V read errors
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SHARPEN)
            layer.self_attn.k_proj.weight.mul_(QK_SHARPEN)
    model = model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out, safe_serialization=True)
    build_random_gates(out / "gates", json.loads((out / "config.json").read_text()), seed=seed + 1)
    logger.info("tiny Llama written to %s", out)
    return out


# tiny models of the other accepted architectures and RoPE variants (tests/e2e/test_model_variants.py):
# (transformers class names, config fields); 4 layers, 4 query / 2 KV heads, served at 4096 tokens
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2-moe-yarn": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256, "use_sliding_window": False, "rope_theta": 1e6,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}),
    "qwen3-moe-yarn": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6,
                         "original_max_position_embeddings": 2048, "attention_factor": 1.25,
                         "beta_fast": 16.0}}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None,
        "rope_theta": 1e6}),
    "phi3-longrope-partial": ("Phi3Config", "Phi3ForCausalLM", {
        "head_dim": 96, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 1024,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 40 for i in range(24)],
                         "long_factor": [1.0 + i / 2 for i in range(24)]}}),
}


def build_tiny_variant(out: str | Path, variant: str, *, num_layers: int = 4, num_heads: int = 4,
                       num_kv_heads: int = 2, max_len: int = 4096, seed: int = 0) -> Path:
    """A tiny random model of :data:`VARIANTS` ``[variant]`` (fp32, random gates in ``gates/``),
    built like :func:`build_tiny_llama` (same tokenizer, sharpened q/k)."""
    import transformers

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r} (known: {', '.join(VARIANTS)})")
    cfg_name, model_name, fields = VARIANTS[variant]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    head_dim = int(fields.get("head_dim", 64))
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab, hidden_size=num_heads * head_dim, intermediate_size=512,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_len,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        torch_dtype="float32", **{"head_dim": head_dim, **fields})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):  # Phi-3: fused [q | k | v]
                qk = num_heads * head_dim + num_kv_heads * head_dim
                attn.qkv_proj.weight[:qk].mul_(QK_SHARPEN)
            else:
                attn.q_proj.weight.mul_(QK_SHARPEN)
                attn.k_proj.weight.mul_(QK_SHARPEN)
    model = model.to(torch.float32)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out, safe_serialization=True)
    build_random_gates(out / "gates", json.loads((out / "config.json").read_text()),
                       seed=seed + 1, base_model=f"vllm-seer/tiny-{variant}")
    logger.info("tiny %s written to %s", variant, out)
    return out


def build_random_gates(out: str | Path, model_config: dict, seed: int = 1,
                       dtype: torch.dtype = torch.bfloat16, *,
                       base_model: str = "vllm-seer/tiny-llama",
                       formats: tuple[str, ...] = ("pth", "safetensors"),
                       **seer_fields: object) -> Path:
    """Random gate weights for ``model_config`` in the upstream layout (+ safetensors), each
    ``[Hq, 3*d, d]`` scaled by ``1/sqrt(3*d)``; ``seer_fields`` go to ``seer_config_fields``."""
    hq = model_config["num_attention_heads"]
    d = model_config.get("head_dim") or model_config["hidden_size"] // hq
    gen = torch.Generator().manual_seed(seed)
    weights = {i: (torch.randn(hq, 3 * d, d, generator=gen) / (3 * d) ** 0.5).to(dtype)
               for i in range(model_config["num_hidden_layers"])}
    fields = seer_config_fields(gate_hidden=d, **seer_fields)  # type: ignore[arg-type]
    config = {**model_config, "base_model": base_model, **fields}
    return save_gates(out, weights, config, formats)
