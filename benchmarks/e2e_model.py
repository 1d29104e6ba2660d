"""The served model of ``bench_e2e_ttft.py``: the Llama-3.1-8B architecture (``--arch llama31-8b``)
or the Qwen2.5-7B architecture with YaRN RoPE (``--arch qwen25-7b-yarn``, factor 4 over 32k
positions, as Qwen's model cards tell users to serve it beyond 32k), or a CPU-sized variant of
either, as a folder with ``config.json``, a project-made tokenizer and random top-k gates; no
weights (the server runs with ``--load-format dummy``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

SCHEMA = 1  # of the model spec and of the result records

LLAMA31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
# Qwen2.5-7B-Instruct's config.json with the YaRN entry its model card adds for contexts past 32k;
# max_position_embeddings says 131072 = 4 x 32768 outright (vLLM 0.32 with transformers 5 did not
# derive the longer limit from the YaRN factor: "max_model_len (2048) is greater than the derived
# max_model_len (max_position_embeddings=512.0)" in the dry run); the YaRN blend uses
# original_max_position_embeddings either way. The tokenizer is the project-made one, so the
# special ids are this file's
QWEN25_7B_YARN: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151808,
    "eos_token_id": 151809,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
ARCHS: dict[str, dict[str, Any]] = {"llama31-8b": LLAMA31_8B, "qwen25-7b-yarn": QWEN25_7B_YARN}
ARCH_DESCRIPTIONS = {"llama31-8b": "Llama-3.1-8B architecture",
                     "qwen25-7b-yarn": "Qwen2.5-7B architecture, YaRN RoPE (factor 4 over 32k positions)"}
# same kind, CPU-sized (dry run): llama3 / YaRN RoPE scaling kept, vocab small enough for a fast CPU server
TINY_OVERRIDES: dict[str, Any] = {
    "head_dim": 64, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "torch_dtype": "float32", "vocab_size": 4096,
    "bos_token_id": 3840, "eos_token_id": 3841,
}
NUM_SPECIAL = 256  # Llama 3 layout: the last 256 ids are special tokens
LLAMA3_SPECIAL_NAMES = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                        "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|> "
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|> {% endif %}"
)
MODEL_STAMP = ".bench-model.json"


def model_config(tiny: bool = False, arch: str = "llama31-8b") -> dict[str, Any]:
    """The served model's ``config.json`` (``arch`` of ``ARCHS``, or its CPU-sized variant; the
    tiny YaRN variant keeps factor 4 over 512 positions, so the dry run's prompts pass the
    original window; its limit is the dry run's 2048)."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: expected one of {sorted(ARCHS)}")
    cfg = {**ARCHS[arch], **(TINY_OVERRIDES if tiny else {})}
    if tiny and cfg["rope_scaling"].get("type") == "yarn":
        cfg["max_position_embeddings"] = 2048
        cfg["rope_scaling"] = {**cfg["rope_scaling"], "original_max_position_embeddings": 512}
    return cfg


def special_tokens(vocab_size: int) -> list[str]:
    """Names of the last ``NUM_SPECIAL`` ids, Llama-3 style (named first, then reserved ones)."""
    names = list(LLAMA3_SPECIAL_NAMES)
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL - len(names))]
    assert len(names) == NUM_SPECIAL and vocab_size > NUM_SPECIAL
    return names


def regular_token_range(config: dict[str, Any]) -> tuple[int, int]:
    """``[lo, hi)`` of ordinary token ids (what random prompts are drawn from)."""
    return 0, int(config["vocab_size"]) - NUM_SPECIAL


def build_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering every model id: ``w0 … w{n-1}`` then Llama-3 special tokens.

    Built in code (no download, no training), saved HF-style (``tokenizer.json`` +
    ``tokenizer_config.json``). It covers the whole vocabulary, so every id a random model samples
    detokenizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n_regular = vocab_size - NUM_SPECIAL
    specials = special_tokens(vocab_size)
    vocab = {f"w{i}": i for i in range(n_regular)}
    vocab.update({name: n_regular + i for i, name in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|reserved_special_token_0|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[4], unk_token=specials[2],
                                   model_max_length=131072)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # the class name both transformers 4.x and 5.x resolve (5.x writes its own "TokenizersBackend")
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_gates(out: Path, config: dict[str, Any], seed: int = 1) -> Path:
    """Random gate weights for ``config`` (``[Hq, 3*d, d]`` per layer, bf16), top-k mode;
    safetensors only (an 8B model's gates are ~100 MB per format)."""
    from vllm_seer.tiny_model import build_random_gates

    base = ("vllm-seer/llama-3.1-8b-dummy" if config["model_type"] == "llama"
            else "vllm-seer/qwen2.5-7b-yarn-dummy")
    return build_random_gates(out, config, seed, base_model=base,
                              formats=("safetensors",), method="nz_ratio", nz_ratio=0.1)


def ensure_model(folder: Path, tiny: bool = False, arch: str = "llama31-8b") -> Path:
    """Build (once; idempotent, keyed by a hash of the spec) the model folder with ``gates/``.

    No weights are written: the server runs with ``--load-format dummy``. Read in vLLM 0.26.0 and
    0.32.0: ``DummyModelLoader.download_model`` is a no-op and ``load_weights`` initialises every
    parameter randomly; the dtype comes from ``config.json`` / ``--dtype`` (the safetensors
    fallback reads ``*.safetensors`` of the folder and finds none)."""
    config = model_config(tiny, arch)
    spec = json.dumps({"config": config, "schema": SCHEMA, "gate_seed": 1}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    stamp = folder / MODEL_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("digest") == digest:
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    build_tokenizer(tmp, int(config["vocab_size"]))
    build_gates(tmp / "gates", config)
    (tmp / MODEL_STAMP).write_text(json.dumps({"digest": digest, "tiny": tiny}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
