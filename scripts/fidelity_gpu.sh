#!/usr/bin/env bash
# The accuracy suite (vllm-seer eval-suite, docs/accuracy-suite.md) for SmolLM2 on the GPU test host,
# through the device `run` tool. The GGUF (98 MB) exceeds one call's 64 MiB carry, so it travels in
# two calls, like scripts/train_smollm2.sh; results persist in /tmp/fid while the machine stays warm,
# and every `run` call resumes where the last stopped (each call stays under the 10-minute limit).
#   call 1 : carry .cache/gpu/s1             scripts/fidelity_gpu.sh stage
#   call 2+: carry .cache/gpu/b              scripts/fidelity_gpu.sh run      (repeat until "done")
# Every call copies the GGUF parts it carries (.cache/gpu/*/partNN) to /tmp/keep, and `run`
# joins all parts kept so far in name order (checked by sha256), so the parts may also travel in
# smaller pieces beside other calls (`bash scripts/fidelity_gpu.sh stage` after another command).
#   served : after `.gpu/install-bundle.sh` (README "GPU runs"), carry .cache/gpu/b and .vb:
#            SERVED="dense nz=0.1 nz=0.3 nz=0.5 nz=0.1+sink=1 thr=5e-4" scripts/fidelity_gpu.sh run
# Prepare the carried parts here (once; needs `make setup`'s .venv):
#   bash scripts/fidelity_gpu.sh prepare [MiB ...]
#   splits the GGUF into .cache/gpu/s1/part00, s2/part01, ... of the sizes given (default: one
#   piece of 47 MiB, i.e. the two-call layout above with s1 as "a") and the rest into
#   .cache/gpu/b/partNN, with the gguf wheel (.cache/gpu/b/w/) and the held-out prose documents
#   (.cache/gpu/b/prose-heldout.tar.gz). Sizes that fit beside the vLLM bundle's pieces (the
#   repo takes ~18 MB of each call's 64 MiB): `prepare 6 6 23 46` rides along the three
#   install calls and one more (README "GPU runs"), leaving ~12 MB for the run call.
# Env: SIZE (full|ci, default full), GATES (default the bundled gates), TRAIN_RECORD (gate training
# metadata JSON), SUITE_TIMEOUT (seconds per call, default 540), SERVED_DTYPE (default bfloat16,
# like the offline model on CUDA). Files back: $OUT/fidelity-smollm2.*
set -euo pipefail
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT=${OUT:-/tmp/out}
FID=/tmp/fid
M=/tmp/models/SmolLM2-135M-Instruct
if [[ ${1:-} == prepare ]]; then
  shift
  PY=${PYTHON:-.venv/bin/python}
  "$PY" - "$GGUF_SHA" "${@:-47}" <<'PYEOF'
import hashlib, shutil, sys
from pathlib import Path
from vllm_seer.train.prepare_model import find_gguf
data = Path(find_gguf()).read_bytes()
if hashlib.sha256(data).hexdigest() != sys.argv[1]:
    sys.exit(f"prepare: {find_gguf()} is not the GGUF this script expects (sha256 {sys.argv[1]})")
sizes = [int(float(x) * 2**20) for x in sys.argv[2:]]
if min(sizes) <= 0 or sum(sizes) >= len(data):
    sys.exit(f"prepare: sizes {sys.argv[2:]} MiB must be > 0 and leave a rest of the "
             f"{len(data)}-byte GGUF for .cache/gpu/b")
shutil.rmtree(".cache/gpu", ignore_errors=True)
Path(".cache/gpu/b/w").mkdir(parents=True)
off = 0
for i, size in enumerate(sizes):
    d = Path(f".cache/gpu/s{i + 1}")
    d.mkdir(parents=True, exist_ok=True)
    (d / f"part{i:02d}").write_bytes(data[off:off + size])
    off += size
Path(f".cache/gpu/b/part{len(sizes):02d}").write_bytes(data[off:])
PYEOF
  "$PY" -m pip download -q gguf==0.19.0 --no-deps -d .cache/gpu/b/w
  "$PY" -c "
import tarfile; from vllm_seer.train.data import list_documents, prose_root
with tarfile.open('.cache/gpu/b/prose-heldout.tar.gz', 'w:gz') as t:
    [t.add(d.path, arcname=d.name) for d in list_documents('heldout', root=prose_root(),
                                                             suffixes=('.txt',), min_bytes=0)]"
  du -sb .cache/gpu/*
  exit 0
fi
# every call (stage or run) keeps the GGUF parts it carries (.cache/gpu/*/partNN) in /tmp/keep
mkdir -p /tmp/keep
shopt -s nullglob
for part in .cache/gpu/*/part[0-9][0-9]; do cp "$part" /tmp/keep/; done
shopt -u nullglob
if [[ ${1:-} == stage ]]; then
  ls -la /tmp/keep && nvidia-smi -L
  exit 0
fi
[[ ${1:-} == run ]] || { echo "usage: $0 prepare [MiB ...]|stage|run" >&2; exit 2; }
if [[ -n ${SERVED:-} ]]; then
  . benchmarks/gpu/setup_host.sh   # vLLM 0.26 from the bundle + this package with its entry points
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
[[ -e vllm_seer/kernels ]] || ln -s ../kernels vllm_seer/kernels   # editable-install layout
if [[ ! -f $M/vllm_seer_prepared.json ]]; then
  cat /tmp/keep/part[0-9][0-9] > /tmp/model.gguf
  echo "$GGUF_SHA  /tmp/model.gguf" | sha256sum -c || {
    echo "the GGUF parts in /tmp/keep ($(ls /tmp/keep)) do not join to the expected file: some are"
    echo "missing (the machine went cold between calls?) or stale (staged from another prepare layout;"
    echo "rm -rf /tmp/keep and stage again)"
    exit 3; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .cache/gpu/b/w/*.whl
  python3 -c "import sys; from vllm_seer.train.prepare_model import prepare_model_main as m; \
sys.exit(m(['--out', '$M', '--gguf', '/tmp/model.gguf']))"
fi
if [[ ! -d /tmp/prose ]]; then
  mkdir -p /tmp/prose.part && tar xzf .cache/gpu/b/prose-heldout.tar.gz -C /tmp/prose.part
  mv /tmp/prose.part /tmp/prose
fi
export VLLM_SEER_PROSE=/tmp/prose
mkdir -p "$FID" "$OUT"
args=("$M" --gates "${GATES:-vllm_seer/assets/gates/smollm2-135m}" --size "${SIZE:-full}"
      --results "$FID/raw.json" --out "$FID" --name fidelity-smollm2)
[[ -n ${TRAIN_RECORD:-} ]] && args+=(--train-record "$TRAIN_RECORD")
entry="import sys; from vllm_seer.eval.suite_cli import eval_suite_main as m; sys.exit(m(sys.argv[1:]))"
start=$(date +%s)
rc=0
# shellcheck disable=SC2086  # SERVED is a list of settings
timeout "${SUITE_TIMEOUT:-540}" python3 -c "$entry" "${args[@]}" \
  ${SERVED:+--served $SERVED --served-dtype "${SERVED_DTYPE:-bfloat16}"} || rc=$?
if [[ $rc == 0 ]]; then echo "done"; else echo "not finished (rc $rc): call again to resume"; fi
python3 -c "$entry" "${args[@]}" --report-only || true   # a partial report when not finished
echo "wall $(( $(date +%s) - start )) s"
cp "$FID"/fidelity-smollm2.md "$FID"/fidelity-smollm2.json "$FID"/fidelity-smollm2-*.png "$OUT/" 2>/dev/null || true
if [[ -f $FID/raw.json ]]; then gzip -c "$FID/raw.json" > "$OUT/fidelity-smollm2-raw.json.gz"; fi
