#!/usr/bin/env bash
# GPU checks, run from the repository root on a CUDA machine, in one call:
#   bash benchmarks/gpu_check.sh [dispatch] [layer]      (both when none is named)
# dispatch: builds smile._C in place, runs the GPU kernel tests, then the side-by-side dispatch
#           benchmark (dispatch_bench.md / dispatch_bench.json).
# layer:    the grouped-GEMM and single-GPU layer tests on the GPU (compiled Triton kernels, no
#           host synchronisation in the layer), then moe_layer_gpu_bench.py --profile on the
#           ANCHORS shapes (moe_layer.json). DeepSpeed-MoE joins the table when it imports; on a
#           machine without network, put its wheels in .whl/ and they are installed offline.
# Logs and results go to $OUT (default runs/gpu_check). Needs python3 with torch, triton, pytest
# (and nvcc for the dispatch build); no network.
# Exit status: 0 when every step passed.
set -uo pipefail

parts=("$@")
[ "${#parts[@]}" -gt 0 ] || parts=(dispatch layer)
for part in "${parts[@]}"; do
    case "$part" in
        dispatch | layer) ;;
        *) echo "gpu_check: unknown part '$part'; allowed: dispatch, layer" >&2; exit 2 ;;
    esac
done

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

dispatch_checks() {
    step build 200 "$PYTHON" setup.py build_ext --inplace
    step tests 150 "$PYTHON" -m pytest -m gpu tests/moe/test_kernels.py -v -rs -p no:cacheprovider
    step bench 200 "$PYTHON" benchmarks/dispatch_bench.py --device cuda --out "$OUT"
}

layer_checks() {
    if ! "$PYTHON" -c "import deepspeed" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
        step deepspeed 120 "$PYTHON" -m pip install --no-index --no-deps --quiet .whl/*.whl
    fi
    step layer-tests 240 "$PYTHON" -m pytest tests/moe/test_grouped_gemm.py -v -rs -p no:cacheprovider
    step layer-bench 300 "$PYTHON" benchmarks/moe_layer_gpu_bench.py --profile --json "$OUT/moe_layer.json"
}

for part in "${parts[@]}"; do
    "${part}_checks"
done

echo "gpu_check: $([ "$status" -eq 0 ] && echo PASSED || echo FAILED); logs in $OUT"
exit "$status"
