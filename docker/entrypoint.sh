#!/bin/sh
# vllm serve with the Seer backend: `vllm-seer-entrypoint MODEL [vllm serve flags...]`.
# SEER_ADDITIONAL_CONFIG, when set, is passed as --additional-config (JSON, {"seer": {...}}).
set -eu
[ "$#" -ge 1 ] || { echo "usage: MODEL [vllm serve flags...]" >&2; exit 2; }
# The model goes first: argparse can mis-assign an optional positional placed after flags.
model=$1
shift
if [ -n "${SEER_ADDITIONAL_CONFIG:-}" ]; then
  set -- "$@" --additional-config "$SEER_ADDITIONAL_CONFIG"
fi
exec vllm serve "$model" --port "${VLLM_PORT_HTTP:-8000}" --attention-backend seer "$@"
