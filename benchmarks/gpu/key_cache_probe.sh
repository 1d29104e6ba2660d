#!/usr/bin/env bash
# Pooled-key cache probe on the GPU host, without the vLLM bundle (torch + triton of the host
# image): the kernel GPU tests that need no vLLM (3 concurrent pytest processes: 8 ran out of GPU memory on an H100; tests whose ids
# name vllm deselected) and the gate of a chunked 128k prefill with / without the cache
# (benchmarks/gpu/key_cache_bench.py) at 64- and 16-token pages. Results under $OUT.
set -u -o pipefail
[[ -e vllm_seer/kernels ]] || ln -s ../kernels vllm_seer/kernels
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for page in 64 16; do
    python3 benchmarks/gpu/key_cache_bench.py --page $page --json "$OUT/key-cache-p$page.json" \
        2>&1 | tee "$OUT/key-cache-p$page.txt" | tail -3
done
python3 benchmarks/gpu/gpu_tests.py --jobs 3 --out "$OUT/gpu-tests-kernels.json" -- \
    tests/kernels -k "not vllm" > "$OUT/pytest-kernels.txt" 2>&1
grep -E "passed|failed|FAILED|Error|\"(passed|failed)\"" "$OUT/pytest-kernels.txt" | tail -25
