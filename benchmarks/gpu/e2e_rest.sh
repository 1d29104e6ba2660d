#!/usr/bin/env bash
# Issue 12's remaining end-to-end measurements, one GPU call per part (after
# `. benchmarks/gpu/setup_host.sh`); each part stays inside one call's 10 minutes:
#   sweep : the crossover sweep at nz_ratio 0.05 and 0.3 beside FLASH_ATTN (every prompt on the
#           Seer path; three servers, ~80-140 s start-up each in compiled mode)
#   lbd   : the 128k TTFT of seer@0.1 with last_block_dense on (the default: dense last rows in
#           every prefill step) and off (two servers)
# Results under $OUT (join them with bench_e2e_ttft.py --compare). A budget below a compiled
# server's start-up measures nothing (2026-12-08: 120 s per lbd server was too little).
set -u -o pipefail
B=$REPO/benchmarks/bench_e2e_ttft.py
part=${1:-}
cd /tmp
case $part in
sweep)
    python3 "$B" --backends FLASH_ATTN,seer@0.05,seer@0.3 --phases sweep \
        --seer-extra '{"min_prefill_tokens": 64}' --budget-s "${SWEEP_S:-560}" --min-server-s 150 \
        --out "$OUT/e2e-sweep-d005-d03.json" 2>&1 | tail -12 ;;
lbd)
    for lbd in true false; do
        python3 "$B" --backends seer@0.1 --phases ttft --lengths 130944 --repeats 2 \
            --seer-extra "{\"last_block_dense\": $lbd}" --budget-s "${LBD_S:-270}" \
            --min-server-s 200 --out "$OUT/e2e-128k-lbd-$lbd.json" 2>&1 | tail -6
    done ;;
*)
    echo "usage: $0 sweep|lbd" >&2
    exit 2 ;;
esac
