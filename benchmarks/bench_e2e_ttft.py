"""End-to-end TTFT, decode ITL and throughput of ``vllm serve`` with Seer vs FLASH_ATTN (issues 4, 12).

Model: the Llama-3.1-8B architecture with random weights (``--load-format dummy``: the model folder
holds only ``config.json`` and a project-made tokenizer, no weights file), plus a random gate
checkpoint of the right shapes in top-k (``nz_ratio``) mode, so the density is fixed by the setting.
Everything is built offline and deterministically on first use (a few seconds).

Mode: vLLM's defaults, torch.compile + CUDA graphs (what users run), unless ``--eager``
(``--enforce-eager``). For each backend of ``--backends`` (default ``FLASH_ATTN,seer@0.1,seer@0.05``;
also ``TRITON_ATTN``, ``seer@<d>``, ``default`` = no ``--attention-backend`` flag) the script starts
one real ``vllm serve`` (bf16, ``--max-model-len 131072``, default chunked prefill, prefix caching
on, seed 0), warms it up, and runs the phases of ``--phases`` (default all) on it:

* ``ttft``: per prompt length (default 16k / 32k / 64k / 128k; 128k = 130944 = 131072 - 64 decode
  tokens - 64, whole 64-token blocks) ``--repeats`` (2) single streamed requests of random token
  ids (unique per backend, length and repeat: never a prefix-cache hit): client-side TTFT, the gaps
  between later tokens (decode ITL at batch 1), vLLM's own TTFT / ITL histograms and, for Seer, the
  achieved density and gate / sparse-attention time as per-request deltas of ``/metrics``. The
  first and second request of a length on the same server give the first-request penalty.
* ``batch``: 32 streams decoding together on 32k-token contexts (they share all but 256 prompt
  tokens, so the KV cache holds them): decode ITL at batch 32 (:mod:`e2e_load`).
* ``short``: 64 requests of 1024 tokens at once: request throughput of ordinary traffic.
* ``mixed``: 48 short requests arriving at 8/s (seeded Poisson) and 4 long (32k) prompts among them:
  request throughput, TTFT and ITL percentiles per class.
* ``sweep``: single requests at 1k / 2k / 4k / 8k / 16k for the crossover length where Seer starts
  to win; run it with ``--seer-extra '{"min_prefill_tokens": 64}'`` so that the Seer path is taken
  at every length (otherwise the short prompts take the dense path by the CUDA default).

Results are appended to ``--out`` after every request or workload (a run cut short keeps what it
measured). A wall-clock budget (``--budget-s``) skips what would not fit, so one invocation stays
inside a 10-minute limit: on the GPU host run one backend (or a few phases / lengths) per call,
then join the calls' JSONs with ``--compare``, which writes the goals JSON
(``benchmarks/results/e2e-ttft-h200.json``: device, date, versions, mode, goals, ...; see
:mod:`e2e_goals`) and the markdown tables (``.md`` beside it). ``--dry-run`` runs the whole flow on a
CPU machine with a tiny model of the same kind (2 layers, float32, 512 / 1024-token prompts, the CPU
default backend and ``seer@0.3``, small workloads).

GPU host (vLLM 0.26; compiled start-up ~2 min; one command per call)::

    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends FLASH_ATTN --out $OUT/fa.json
    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends seer@0.1 --out $OUT/s01.json
    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends seer@0.05 \\
        --phases ttft --out $OUT/s005.json
    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends FLASH_ATTN,seer@0.1 \\
        --phases sweep --seer-extra '{"min_prefill_tokens": 64}' --out $OUT/sweep.json
    cd /tmp && python /path/to/benchmarks/bench_e2e_ttft.py --backends FLASH_ATTN,seer@0.1 \\
        --phases ttft,batch --lengths 32768 --speculative-config \\
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}' --out $OUT/spec.json
    python benchmarks/bench_e2e_ttft.py --compare fa.json s01.json s005.json sweep.json

(the speculative run answers part 5's decode ITL with speculation; keep it out of ``--compare``'s
goals, which are for plain decoding)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from e2e_client import collect_env
from e2e_goals import goals_markdown, summary, workloads_markdown
from e2e_model import ARCHS, ensure_model
from e2e_report import load_runs, parse_backend, render_report
from e2e_run import Clock, make_prompt, run_backend

__all__ = ["make_prompt", "main", "parse_args"]

K = 1024
GPU_LENGTHS = (16 * K, 32 * K, 64 * K, 131072 - 64 - 64)  # 128k: 130944 = 2046 blocks
DRY_LENGTHS = (512, 1024)
SWEEP_LENGTHS = (K, 2 * K, 4 * K, 8 * K, 16 * K)
PHASES = ("ttft", "batch", "short", "mixed", "sweep")
DEFAULT_PHASES = ("ttft", "batch", "short", "mixed")
ALL_GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "seer@0.3", "seer@0.1", "seer@0.05")
RESULTS = Path(__file__).resolve().parent / "results"

def _csv(text: str, what: str, cast: Any = str) -> list[Any]:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"{what}: {text!r} is not a comma-separated list ({e})") from e


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated, any of {','.join(ALL_GPU_BACKENDS)} or default (no flag); "
                    "default FLASH_ATTN,seer@0.1,seer@0.05 (dry run: default,seer@0.3); a suffix "
                    "/pN serves that one with --block-size N (e.g. FLASH_ATTN/p64,seer@0.1/p16: "
                    "decode ITL on the other backend's page size)")
    ap.add_argument("--eager", action="store_true",
                    help="serve with --enforce-eager (default: vLLM's torch.compile + CUDA graphs)")
    ap.add_argument("--serve-args", default="",
                    help="more vLLM flags for every server, e.g. '--tensor-parallel-size 2' (the "
                    "layouts of benchmarks/gpu/parallel_check.py)")
    ap.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                    help=f"comma-separated, any of {','.join(PHASES)} (default "
                    f"{','.join(DEFAULT_PHASES)}; sweep wants its own call, see the module doc)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "ttft.json",
                    help="JSON file results are appended to (server logs are copied beside it)")
    ap.add_argument("--lengths", default=None,
                    help="ttft phase prompt lengths in tokens (default 16384,32768,65536,130944)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--repeat-limit-s", type=float, default=30.0,
                    help="a request slower than this is not repeated (TRITON_ATTN at 128k)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="decode tokens per request, for the ITL (default 64; dry run 16)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="warm-up prompt (default 20000: longer than the Seer path's CUDA default "
                         "min_prefill_tokens and than one 8192-token chunk, so every kernel, split "
                         "and unsplit, has run before timing)")
    ap.add_argument("--batch-streams", type=int, default=32, help="batch phase: streams")
    ap.add_argument("--batch-length", type=int, default=None,
                    help="batch phase: context per stream (default 32768; dry run 512)")
    ap.add_argument("--short-requests", type=int, default=None,
                    help="short phase: requests sent at once (default 64; dry run 8)")
    ap.add_argument("--short-length", type=int, default=None,
                    help="short and mixed phases: short prompt length (default 1024; dry run 128)")
    ap.add_argument("--mixed-short", type=int, default=None,
                    help="mixed phase: short requests (default 48; dry run 8)")
    ap.add_argument("--mixed-rate", type=float, default=8.0,
                    help="mixed phase: short-request arrivals per second (Poisson, seeded)")
    ap.add_argument("--mixed-long", type=int, default=None,
                    help="mixed phase: long requests among them (default 4; dry run 2)")
    ap.add_argument("--mixed-long-length", type=int, default=None,
                    help="mixed phase: long prompt length (default 32768; dry run 1024)")
    ap.add_argument("--sweep-lengths", default=None,
                    help="sweep phase lengths (default 1024,2048,4096,8192,16384; dry run 128,512)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget of this invocation; what would not fit is skipped")
    ap.add_argument("--min-server-s", type=float, default=200.0,
                    help="do not start a server with less budget left than this")
    ap.add_argument("--startup-timeout", type=float, default=420.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="model folder (built if missing; default $TMPDIR/vllm-seer-bench-<arch>)")
    ap.add_argument("--arch", default="llama31-8b", choices=sorted(ARCHS),
                    help="served architecture (dummy weights): Llama-3.1-8B, or Qwen2.5-7B with "
                         "YaRN RoPE (factor 4 over 32k)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default 131072 (dry run 2048)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="chunk size; not set by default (vLLM's default chunked prefill)")
    ap.add_argument("--speculative-config", default=None,
                    help="vLLM's --speculative-config JSON for every server, e.g. "
                    '\'{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}\'')
    ap.add_argument("--seer-extra", default="{}", help="more Seer settings as JSON, e.g. "
                    '\'{"last_block_dense": false}\'')
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU check of the whole flow: tiny model, 512/1024 tokens, default + seer@0.3")
    ap.add_argument("--compare", nargs="+", type=Path, default=None, metavar="JSON",
                    help="join the JSON files of earlier calls: write --summary-out and --report-out")
    ap.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSON",
                    help="like --compare, but only print the markdown (unless --report-out)")
    ap.add_argument("--summary-out", type=Path, default=None,
                    help=f"goals JSON of --compare (default {RESULTS.name}/e2e-ttft-h200.json)")
    ap.add_argument("--report-out", type=Path, default=None,
                    help=f"markdown of --compare (default {RESULTS.name}/e2e-ttft-h200.md)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.phases = _csv(args.phases, "--phases")
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        ap.error(f"--phases: unknown phase(s) {bad}; expected some of {','.join(PHASES)}")
    if dry:
        args.lengths = args.lengths or ",".join(map(str, DRY_LENGTHS))
        args.budget_s = max(args.budget_s, 1800.0)
        args.min_server_s = min(args.min_server_s, 60.0)
        seer_extra = {"min_prefill_tokens": 256, **json.loads(args.seer_extra)}
        args.seer_extra = json.dumps(seer_extra)
    for name, value in (("--seer-extra", args.seer_extra),
                        ("--speculative-config", args.speculative_config or "{}")):
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            ap.error(f"{name}: not JSON ({e})")
    args.backends = args.backends or ("default,seer@0.3" if dry else "FLASH_ATTN,seer@0.1,seer@0.05")
    args.max_model_len = args.max_model_len or (2048 if dry else 131072)
    args.max_tokens = args.max_tokens or (16 if dry else 64)
    args.dtype = args.dtype or ("float32" if dry else "bfloat16")
    args.warmup_tokens = args.warmup_tokens or (300 if dry else 20000)
    args.batch_length = args.batch_length or (512 if dry else 32 * K)
    args.batch_streams = args.batch_streams if not dry else min(args.batch_streams, 4)
    args.short_requests = args.short_requests or (8 if dry else 64)
    args.short_length = args.short_length or (128 if dry else K)
    args.mixed_short = args.mixed_short or (8 if dry else 48)
    args.mixed_long = args.mixed_long or (2 if dry else 4)
    args.mixed_long_length = args.mixed_long_length or (1024 if dry else 32 * K)
    args.sweep_lengths = _csv(args.sweep_lengths or ",".join(
        map(str, (128, 512) if dry else SWEEP_LENGTHS)), "--sweep-lengths", int)
    args.lengths = _csv(args.lengths or ",".join(map(str, GPU_LENGTHS)), "--lengths", int)
    longest = max([*args.lengths, args.batch_length, args.mixed_long_length, *args.sweep_lengths])
    if longest + args.max_tokens > args.max_model_len:
        ap.error(f"prompt length {longest} + max_tokens {args.max_tokens} exceeds --max-model-len "
                 f"{args.max_model_len}")
    if args.model_dir is None:
        import tempfile

        name = f"vllm-seer-bench-{'tiny-' if dry else ''}{args.arch}"
        args.model_dir = Path(tempfile.gettempdir()) / name
    return args


def compare(paths: list[Path], summary_out: Path | None, report_out: Path | None,
            print_only: bool = False) -> str:
    """Join the runs of ``paths``: the markdown (returned; written to ``report_out``) and, unless
    ``print_only``, the goals JSON (``summary_out``)."""
    runs = load_runs(paths)
    goals = summary(runs)
    text = (render_report(runs, f"End-to-end TTFT, decode ITL and throughput ({goals['mode']})")
            + workloads_markdown(runs) + goals_markdown(goals))
    if not print_only:
        summary_out = summary_out or RESULTS / "e2e-ttft-h200.json"
        report_out = report_out or summary_out.with_suffix(".md")
    for path, content in ((summary_out, json.dumps(goals, indent=1) + "\n"), (report_out, text)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return text


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
    if args.compare or args.report:
        print(compare(args.compare or args.report, args.summary_out, args.report_out,
                      print_only=args.report is not None and args.compare is None), flush=True)
        return 0
    clock = Clock(args.budget_s)
    signal.signal(signal.SIGTERM, _on_sigterm)  # `timeout` sends SIGTERM: stop the servers cleanly
    backends = _csv(args.backends, "--backends")
    for b in backends:
        parse_backend(b)  # fail early on a bad name
    args.out = args.out.resolve()
    clock.log(f"building / checking the model folder {args.model_dir}")
    ensure_model(args.model_dir, tiny=args.dry_run, arch=args.arch)
    env_info = collect_env()
    clock.log(f"env: {json.dumps(env_info)}; GPU memory used now: {gpu_memory_used()}")
    clock.log(f"backends {backends}, {'eager' if args.eager else 'compiled'}, phases {args.phases}, "
              f"lengths {args.lengths}, repeats {args.repeats}, max_tokens {args.max_tokens}, "
              f"budget {args.budget_s:.0f} s, results → {args.out}")
    failed = 0
    for b in backends:
        rec = run_backend(b, args, env_info, clock, args.lengths)
        failed += rec["error"] is not None
    clock.log(f"done; {failed} backend(s) with errors; results in {args.out}")
    print(compare([args.out], None, None, print_only=True), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
