#!/usr/bin/env bash
# Pair-tile probe on the GPU host, without the vLLM bundle (torch + triton of the host image): the
# kernel GPU tests that need no vLLM (recorded by gpu_tests.py; tests whose ids name vllm are
# deselected) and the pair-tile timings of benchmarks/gpu/pair_variants.py. Results under $OUT.
set -u -o pipefail
[[ -e vllm_seer/kernels ]] || ln -s ../kernels vllm_seer/kernels
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 benchmarks/gpu/pair_variants.py ${PAIR_ARGS:-} --json "$OUT/pair-variants.json" 2>&1 \
    | tee "$OUT/pair-variants.txt" | tail -16
python3 benchmarks/gpu/gpu_tests.py --out "$OUT/gpu-tests-kernels.json" -- tests/kernels \
    -k "not vllm" 2>&1 | tee "$OUT/pytest-kernels.txt" | grep -E "passed|failed|FAILED|Error" \
    | tail -15
