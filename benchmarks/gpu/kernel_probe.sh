#!/usr/bin/env bash
# Kernel-only probe on the GPU host, without the vLLM bundle (torch + triton of the host image):
# every gate kernel config timed, the gate profile at 32k / 128k, and Nsight Compute on the sparse
# prefill kernel at 32k (page 64, vLLM's packed K|V layout: the TMA path). Results under $OUT.
set -u -o pipefail
[[ -e vllm_seer/kernels ]] || ln -s ../kernels vllm_seer/kernels
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 benchmarks/gpu/gate_variants.py --seqs 32768,131072 --chunk 8192 \
    --json "$OUT/gate-variants.json" 2>&1 | tee "$OUT/gate-variants.txt" | tail -40
python3 benchmarks/bench_kernels.py --profile-gate --seqs 32768,131072 2>&1 \
    | tee "$OUT/profile-gate.txt" | grep -E "gate \(ms\)|_kernel|bmm|autotuned" | head -20
if [[ "${NCU:-1}" == 1 ]] && command -v ncu >/dev/null; then
    ncu --clock-control none --profile-from-start off -k regex:_sparse_prefill_kernel \
        --set full python3 benchmarks/gpu/profile_sparse.py > "$OUT/ncu-sparse-32k.txt" 2>&1
    grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Stall|Issued" \
        "$OUT/ncu-sparse-32k.txt" | head -40
fi
