#!/usr/bin/env bash
# Pair-tile probe on the GPU host, without the vLLM bundle (torch + triton of the host image): the
# GPU kernel tests of the sparse prefill (64-row and pair tiles) and the pair-tile timings of
# benchmarks/gpu/pair_variants.py. Results under $OUT.
set -u -o pipefail
[[ -e vllm_seer/kernels ]] || ln -s ../kernels vllm_seer/kernels
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_pairs.py \
    tests/kernels/test_sparse_prefill.py 2>&1 | tee "$OUT/pytest-pairs.txt" | tail -15
python3 benchmarks/gpu/pair_variants.py ${PAIR_ARGS:-} --json "$OUT/pair-variants.json" 2>&1 \
    | tee "$OUT/pair-variants.txt" | tail -30
