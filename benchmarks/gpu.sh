#!/usr/bin/env bash
# One call on a machine with a CUDA GPU, with that machine's own torch and triton:
#
#     bash benchmarks/gpu.sh [OUT_DIR]        # default benchmarks/results/gpu-<gpu>-<date>
#
# installs fastkd without dependencies, runs the test suite on the GPU (compiled kernels,
# not the interpreter; FASTKD_TEST_DEVICE=cuda), compute-sanitizer memcheck over the kernel
# tests, the compile and resource check, and the full benchmark sweep with JSON, CSV, plots
# and the floor (roofline) columns; everything goes under OUT_DIR, with summary.txt listing
# each step's exit status and time. Each step has a time limit so the whole fits in about 8 minutes on
# an H100. FASTKD_GPU_DRY_RUN=1 runs only the compile check (no install, no GPU steps).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${FASTKD_GPU_DRY_RUN:-0}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' || true)
OUT=${1:-benchmarks/results/gpu-${GPU:-nogpu}-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
unset TRITON_INTERPRET  # kernels are compiled for the GPU in every step

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc, $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi || true; python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('triton', triton.__version__)"; git rev-parse HEAD 2>/dev/null; } > "$OUT/environment.txt" 2>&1

# The compile check (sm_90 and sm_80), from the working tree: python -m puts it first on sys.path.
step resources 150 python -m fastkd.kernels.resources --arch 90 --arch 80 --check
if [ "$DRY" = 1 ]; then  # the install would repoint this machine's fastkd: skipped too
    echo "dry run: install and GPU steps skipped" | tee -a "$OUT/summary.txt"
    exit 0
fi
step install 120 python -m pip install --no-deps --no-build-isolation -e .
# The tests build CPU tensors: FASTKD_TEST_DEVICE=cuda runs their fastkd.autograd Functions
# (every Triton launch) on the GPU and returns the results (see tests/device_switch.py).
step tests 150 env FASTKD_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests --junitxml="$OUT/tests.xml"
# memcheck is slow: the kernel tests only, with few hypothesis examples.
step memcheck 90 env FASTKD_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=fastkd-sanitizer compute-sanitizer --tool memcheck \
    --error-exitcode 1 --target-processes all python -m pytest -q -x -p no:cacheprovider \
    tests/test_softmax_kl_kernels.py tests/test_elementwise_kernels.py tests/test_feature_map_kernels.py \
    tests/test_contrast_kernels.py tests/test_pairwise_kernels.py tests/test_pairwise_relations_kernels.py
step bench 240 python -m fastkd.bench --sweep full --device cuda --budget 0.3 --min-reps 3 \
    --max-call-seconds 5 --no-progress --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/plots"
cp "$OUT/bench.log" "$OUT/bench.txt" 2>/dev/null || true
echo "results in $OUT"
