#!/usr/bin/env bash
# One device `run` call that trains the gates (benchmarks/gpu/train_gates_gpu.py run, host Python)
# while a part of the GPU test group runs beside it (the vLLM bundle's Python, after
# .gpu/install-bundle.sh): the tests are correctness checks, not timings, and mostly compile
# kernels on the CPU, so they share the GPU with the training. The tests stop after TESTS_S
# seconds (default 520) so the call ends inside the 10-minute limit with both results written.
#   bash benchmarks/gpu/train_with_tests.sh NAME TEST_PATH...   (code trees recorded from the files)
# Writes $OUT/gpu-tests-NAME.json (benchmarks/gpu/gpu_tests.py) and $OUT/gpu-tests-NAME.log.
set -u
name=$1; shift
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
(
  . benchmarks/gpu/setup_host.sh
  timeout "${TESTS_S:-520}" python3 benchmarks/gpu/gpu_tests.py --out "$OUT/gpu-tests-$name.json" "$@"
) > "$OUT/gpu-tests-$name.log" 2>&1 &
tests=$!
python3 benchmarks/gpu/train_gates_gpu.py run
rc=$?
wait "$tests"
echo "tests rc $?"
tail -5 "$OUT/gpu-tests-$name.log"
exit $rc
