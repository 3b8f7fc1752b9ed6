#!/usr/bin/env bash
# One call on a machine with a CUDA GPU, with that machine's own torch and triton:
#
#     bash benchmarks/gpu.sh [RESULTS_DIR]     # default benchmarks/results/gpu-<gpu>-<date>
#
# installs fastkd without dependencies, runs the test suite on the GPU (compiled kernels,
# not the interpreter; FASTKD_TEST_DEVICE=cuda; parallel when pytest-xdist is there), then
# the benchmark: the full sweep of the eager reference against fastkd, with JSON, CSV,
# plots and the floor (roofline) columns; the collection's own calls, also with fastkd in
# CUDA graphs, and the per-call host cost; the reference under torch.compile against fastkd
# at one realistic shape per loss (torch.compile takes seconds per case, too long for every
# shape of the sweep); and compute-sanitizer memcheck over every loss's kernels at small
# shapes; and FusedLinearSoftTarget's LM-head cases in bfloat16, then FusedLinearDistillation's
# divergences and generalized_jsd_loss at 8,192 x 128k. Everything goes under RESULTS_DIR, with
# summary.txt listing each step's exit status and time. Each step has a time limit; all of
# them take up to about 23 minutes, more than a lease's device time, so by default one call
# runs the core steps (install tests bench bench-collection host: at most 580 s), and
# FASTKD_GPU_STEPS names the others for the calls a lease has room for (FASTKD_GPU_STEPS=all:
# every step). The benchmarks write their JSON after every case, so a step stopped at its
# limit keeps what it measured.
# FASTKD_GPU_RESOURCES=1 adds the compile and resource check (about 2.5 minutes, CPU only;
# CI runs it too). FASTKD_GPU_DRY_RUN=1 runs only that check (no install, no GPU steps).
# FASTKD_GPU_STEPS="bench-compile bench-lm ..." runs only the steps named (default: the core
# steps above; "all": every step); FASTKD_GPU_TESTS replaces the test
# step's selection (default: tests, less the CPU-only compile test), e.g. a rerun of failures;
# FASTKD_GPU_LIMITS="bench=100 tests=200" changes steps' time limits (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${FASTKD_GPU_DRY_RUN:-0}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' || true)
RESULTS=${1:-benchmarks/results/gpu-${GPU:-nogpu}-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
: > "$RESULTS/summary.txt"
unset TRITON_INTERPRET  # kernels are compiled for the GPU in every step
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to RESULTS/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    local steps=${FASTKD_GPU_STEPS:-install tests bench bench-collection host}
    if [ "$steps" != all ] && [[ " $steps " != *" $name "* ]]; then return; fi
    for kv in ${FASTKD_GPU_LIMITS:-}; do [ "${kv%%=*}" = "$name" ] && limit=${kv#*=}; done
    start=$(date +%s)
    timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc$([ $rc = 124 ] && echo ' (stopped at its limit)'), $(( $(date +%s) - start ))s (limit ${limit}s)" \
        | tee -a "$RESULTS/summary.txt"
}

{ nvidia-smi || true; python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('triton', triton.__version__)"; git rev-parse HEAD 2>/dev/null; } > "$RESULTS/environment.txt" 2>&1

if [ "$DRY" = 1 ] || [ "${FASTKD_GPU_RESOURCES:-0}" = 1 ]; then
    # The compile check (sm_90 and sm_80), from the working tree: python -m puts it first on sys.path.
    step resources 150 python -m fastkd.kernels.resources --arch 90 --arch 80 --check
fi
if [ "$DRY" = 1 ]; then  # the install would repoint this machine's fastkd: skipped too
    echo "dry run: install and GPU steps skipped" | tee -a "$RESULTS/summary.txt"
    exit 0
fi
step install 40 python -m pip install --no-deps --no-build-isolation -e .
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the working tree's fastkd even if the install failed

# The tests build CPU tensors: FASTKD_TEST_DEVICE=cuda runs their fastkd.autograd Functions
# (every Triton launch) on the GPU and returns the results (see tests/device_switch.py).
# tests/test_compile_kernels.py compiles for sm_90/sm_80 on the CPU (minutes, cold): CI and
# the optional resources step above run it, not this one.
# -v names every test as it ends (pytest's summary comes only at the end, which a time limit
# can cut off); loadfile keeps a file's tests, and so the kernels they compile, on one worker.
PARALLEL=()
python -c "import xdist" 2>/dev/null && PARALLEL=(-n 14 --dist loadfile)
read -r -a SELECTION <<< "${FASTKD_GPU_TESTS:-tests --deselect tests/test_compile_kernels.py}"
step tests 240 env FASTKD_TEST_DEVICE=cuda FASTKD_TEST_FAILURES="$RESULTS/tests-failures.txt" python -m pytest -v -rfE --tb=short -p no:cacheprovider "${PARALLEL[@]}" \
    "${SELECTION[@]}" --durations=15 --junitxml="$RESULTS/tests.xml"
[ -f "$RESULTS/tests.log" ] && grep -E "(FAILED|ERROR) tests/" "$RESULTS/tests.log" | sed 's/^.*\(FAILED\|ERROR\) /\1 /' \
    | sort -u > "$RESULTS/tests-failed.txt"
step bench 150 python -m fastkd.bench --sweep full --device cuda --variants eager,fastkd --budget 0.05 --min-reps 3 \
    --max-call-seconds 3 --wide --no-progress --json "$RESULTS/bench.json" --csv "$RESULTS/bench.csv" --plot "$RESULTS/plots"
# The collection's own calls (CIFAR-100, batch 128): eager against fastkd, then with fastkd
# under torch.compile(mode="reduce-overhead") (CUDA graphs) at its rb3/out/feat calls, and the
# per-call host cost harness (CPU work, the launch counts that the timings above explain).
step bench-collection 90 python -m fastkd.bench --sweep collection --device cuda --variants eager,fastkd \
    --budget 0.05 --min-reps 5 --no-progress --json "$RESULTS/bench-collection.json" --csv "$RESULTS/bench-collection.csv"
step bench-graphs 150 python -m fastkd.bench --sweep collection --device cuda --variants eager,fastkd,fastkd-graphs \
    --cases ' (out|rb3|feat|attacked out|rb2>rb3|factor|rb2,rb3,feat,out) ' --budget 0.05 --min-reps 5 --no-progress \
    --json "$RESULTS/bench-graphs.json" --csv "$RESULTS/bench-graphs.csv"
step host 60 python -m fastkd.bench --host --json "$RESULTS/host.json"
# One realistic shape per loss, in the sweep's order of losses.
ONE_SHAPE='x32000$|C=512 28x28|N=1024 D=512|256x56x56>512x28x28|CRD B=256 |^(Sobolev|LwM) B=256 '
step bench-compile 130 python -m fastkd.bench --sweep full --device cuda --variants compile,fastkd,fastkd-compile --cases "$ONE_SHAPE" \
    --budget 0.05 --min-reps 3 --max-call-seconds 3 --wide --no-progress --json "$RESULTS/bench-compile.json" \
    --csv "$RESULTS/bench-compile.csv"
# The LM head (bfloat16, 1,024 and 8,192 tokens, H=4096, V=32k/128k): eager, compiled,
# fastkd eager and compiled (its operator), and Liger-Kernel's fused linear JSD beside them
# where liger_kernel imports.
LM_VARIANTS=eager,compile,fastkd,fastkd-compile
python -c "import liger_kernel" 2>/dev/null && LM_VARIANTS=$LM_VARIANTS,liger
step bench-lm 110 python -m fastkd.bench --sweep full --device cuda --losses FusedLinearSoftTarget \
    --variants "$LM_VARIANTS" --budget 0.2 --min-reps 3 --max-call-seconds 5 --no-progress \
    --json "$RESULTS/bench-lm.json" --csv "$RESULTS/bench-lm.csv"
# FusedLinearDistillation's six divergences and generalized_jsd_loss (TRL's GKD loss on logits)
# at 8,192 tokens, H=4096, V=128k, bfloat16: eager, compiled, fastkd, and Liger-Kernel where it
# has the divergence (its fused linear JSD: kl, reverse_kl, jsd; its JSD on logits).
LLM_VARIANTS=eager,compile,fastkd
python -c "import liger_kernel" 2>/dev/null && LLM_VARIANTS=$LLM_VARIANTS,liger
step bench-divergences 240 python -m fastkd.bench --sweep full --device cuda \
    --losses FusedLinearDistillation,generalized_jsd_loss --cases 'BT=8192 H=4096 V=128000|L=4096 V=128000' \
    --variants "$LLM_VARIANTS" --budget 0.2 --min-reps 3 --max-call-seconds 5 --no-progress \
    --json "$RESULTS/bench-divergences.json" --csv "$RESULTS/bench-divergences.csv"
# The LM head taken apart: the four head products alone (the floor), the rows kernel alone,
# chunk sizes, both fast paths, and bfloat16 errors against float64.
step lm-profile 75 python benchmarks/lm_head_profile.py --rows-sweep --json "$RESULTS/lm-profile.json"
# The global-batch losses, one simulated rank of W (fastkd.bench.global_batch): per-rank time
# and peak memory against W on this GPU.
step global-bench 60 python -m fastkd.bench.global_batch --device cuda --N 2048 --D 512 --world 1,2,4,8 \
    --json "$RESULTS/global-bench.json"
# RKD's float32 angle forward at its launcher's registers (180 a thread: one program per SM)
# and capped at 128 (two programs per SM, about 5% more instructions), side by side
# (fastkd.bench.launch): the occupancy trade docs/gpu.md leaves to a measurement.
RKD_CASES='RKD N=(1024|4096) D=512$'
step rkd-launch 120 sh -c "python -m fastkd.bench --sweep full --device cuda --losses RKD --cases '$RKD_CASES' \
    --variants fastkd --budget 0.2 --min-reps 3 --no-progress --json '$RESULTS/rkd-launch-default.json' && \
    python -m fastkd.bench --sweep full --device cuda --losses RKD --cases '$RKD_CASES' --variants fastkd \
    --budget 0.2 --min-reps 3 --no-progress --launch _rkd_angle_fwd_fast_kernel:maxnreg=128 \
    --json '$RESULTS/rkd-launch-maxnreg128.json'"
# Last, as the slowest to start: every loss of fastkd once at the tiny shapes, forward and
# backward, under memcheck (the whole test suite under it takes far longer than a lease).
step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 python -m fastkd.bench --sweep tiny \
    --device cuda --variants fastkd --budget 0.001 --min-reps 1 --max-reps 1 --warmup 0 --no-progress
echo "results in $RESULTS"
