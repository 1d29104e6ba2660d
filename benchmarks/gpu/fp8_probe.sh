#!/usr/bin/env bash
# FP8 KV cache probe on the GPU host, without the vLLM bundle (torch + triton of the host image):
# the kernel bench at Llama-3.1-8B shapes on a bf16 and an FP8 cache (bf16 = the baseline in the
# same run), random gates, page 64, at ${SEQS:-32768,131072}; then the FP8 kernel GPU tests;
# then, with KERNEL_TESTS=1, the other kernel GPU tests that need no vLLM (3 pytest processes,
# cut at ${TESTS_S:-300} s). Results under $OUT.
set -u -o pipefail
[[ -e vllm_seer/kernels ]] || ln -s ../kernels vllm_seer/kernels
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 benchmarks/bench_kernels.py --seqs "${SEQS:-32768,131072}" --kinds random --pages 64 \
    --kv-dtype bf16,fp8 --no-flex --out "$OUT/kernels-fp8.md" 2>&1 | tail -22
python3 -m pytest -q -m gpu tests/kernels/test_fp8_kv.py > "$OUT/pytest-fp8.txt" 2>&1
tail -6 "$OUT/pytest-fp8.txt"
if [[ "${KERNEL_TESTS:-0}" == 1 ]]; then
    timeout "${TESTS_S:-300}" python3 benchmarks/gpu/gpu_tests.py --jobs 3 \
        --out "$OUT/gpu-tests-kernels.json" -- tests/kernels -k "not vllm and not fp8" \
        > "$OUT/pytest-kernels.txt" 2>&1
    grep -E "passed|failed|FAILED|\"(passed|failed)\"" "$OUT/pytest-kernels.txt" | tail -15
fi
