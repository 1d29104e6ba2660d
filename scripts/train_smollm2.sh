#!/usr/bin/env bash
# Train SmolLM2-135M-Instruct's prefill gates on a machine with a CUDA GPU (one command, resumable).
#   scripts/train_smollm2.sh [more `vllm-seer train-gates` options, e.g. --time-budget-s 1800]
# Steps: convert the model (`vllm-seer prepare-model`, once), fetch prose (scripts/get-prose.sh,
# when present and not fetched yet), pack the corpus (once), train at 8k context with the default
# settings (docs/training.md). Interrupt it at any point and run it again: it continues.
# On the offline GPU test host use benchmarks/gpu/train_gates_gpu.py instead (pieces <= 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
VS=${VLLM_SEER:-.venv/bin/vllm-seer}
WORK=${WORK:-.cache/train-smollm2}
MODEL=$($VS prepare-model | tail -n 1)
if [[ -x scripts/get-prose.sh && ! -d .cache/prose/text ]]; then
  scripts/get-prose.sh
fi
if [[ ! -f $WORK/data/manifest.json ]]; then
  $VS train-gates pack --tokenizer "$MODEL" --out "$WORK/data"
fi
$VS train-gates "$MODEL" --out "$WORK/gates" --state "$WORK/state" --data "$WORK/data" \
  --seq-len 8192 --time-budget-s "${TIME_BUDGET_S:-1800}" "$@"
echo "gates: $WORK/gates  record: $WORK/state/log.json  loss curve: $WORK/state/loss.png"
