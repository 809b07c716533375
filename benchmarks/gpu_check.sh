#!/usr/bin/env bash
# GPU check of the fused dispatch kernels, run from the repository root on a CUDA machine:
# builds smile._C in place, runs the GPU kernel tests, then the side-by-side dispatch benchmark.
# Logs, the benchmark table (dispatch_bench.md) and JSON (dispatch_bench.json) go to $OUT
# (default runs/gpu_check). Needs python3 with torch, triton, pytest and nvcc; no network.
# Exit status: 0 when the build, the tests and every benchmark check passed.
set -uo pipefail

OUT="${OUT:-runs/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
status=0

step() {  # step NAME TIMEOUT_S CMD...: run CMD under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee "$OUT/$name.log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nvcc --version | tail -n 2
    "$PYTHON" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"

step build 200 "$PYTHON" setup.py build_ext --inplace
step tests 150 "$PYTHON" -m pytest -m gpu tests/test_kernels.py -v -rs -p no:cacheprovider
step bench 200 "$PYTHON" benchmarks/dispatch_bench.py --device cuda --out "$OUT"

echo "gpu_check: $([ "$status" -eq 0 ] && echo PASSED || echo FAILED); logs in $OUT"
exit "$status"
