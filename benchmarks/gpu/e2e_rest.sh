#!/usr/bin/env bash
# Issue 12's remaining end-to-end measurements in one GPU call (after `. benchmarks/gpu/setup_host.sh`):
# 1. the crossover sweep at nz_ratio 0.05 and 0.3 beside FLASH_ATTN (every prompt on the Seer path),
# 2. the 128k TTFT of seer@0.1 with last_block_dense on (the default: dense last rows in every
#    prefill step) and off. Results under $OUT (join them with bench_e2e_ttft.py --compare).
set -u -o pipefail
B=$REPO/benchmarks/bench_e2e_ttft.py
cd /tmp
python3 "$B" --backends FLASH_ATTN,seer@0.05,seer@0.3 --phases sweep \
    --seer-extra '{"min_prefill_tokens": 64}' --budget-s "${SWEEP_S:-290}" --min-server-s 60 \
    --out "$OUT/e2e-sweep-d005-d03.json" 2>&1 | tail -12
for lbd in true false; do
    python3 "$B" --backends seer@0.1 --phases ttft --lengths 130944 --repeats 2 \
        --seer-extra "{\"last_block_dense\": $lbd}" --budget-s "${LBD_S:-135}" --min-server-s 60 \
        --out "$OUT/e2e-128k-lbd-$lbd.json" 2>&1 | tail -6
done
