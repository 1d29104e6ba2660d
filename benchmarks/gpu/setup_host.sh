#!/usr/bin/env bash
# Source on the GPU test host after `.gpu/install-bundle.sh` (see ../../README.md "GPU runs"):
# puts vLLM 0.26 (the bundle) and this package (with its entry points) on the path.
set -u
. /tmp/vsite/env.sh
# every call: the working tree of this call may differ from the last one's
rm -rf /tmp/vsite/vllm_seer /tmp/vsite/vllm_seer-*.dist-info
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/vsite . 2>&1 | grep -v WARNING
# the source tree's vllm_seer must see the kernels too (pytest imports it from the repo root)
[[ -e vllm_seer/kernels ]] || ln -s ../kernels vllm_seer/kernels
export REPO=$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import vllm, torch, triton; print('vllm', vllm.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
