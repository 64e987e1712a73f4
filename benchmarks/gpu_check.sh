#!/usr/bin/env bash
# The prepared GPU check: one command for a GPU machine's short window.
#
#   bash benchmarks/gpu_check.sh RESULTS_FOLDER
#
# Uses the machine's own PyTorch (this package is installed with --no-deps), then:
#   1. the CUDA tests;
#   2. benchmarks/gpu_check.py: real nn.DataParallel against one device (install()
#      and the explicit classes), timm models with BatchNormAct2d, fp16/bf16 autocast;
#   3. benchmarks/bench_gpu.py, in two parts: DataParallel with the GPU listed 4 times
#      (unsynchronized, barrier floor, classic algorithm, autosyncbn; two toy sizes and
#      a ResNet-50), then 2 processes on the GPU, autosyncbn vs torch.nn.SyncBatchNorm;
#   4. as much of the whole test suite on this PyTorch as the time left allows (3 minutes at most).
# Every step has its own time limit, clipped to what is left of the whole check's
# (GPU_CHECK_SECONDS, default 420 s = 7 minutes); a step with under 15 s left is skipped.
# Every step writes its output to RESULTS_FOLDER/<step>.txt and one line to
# RESULTS_FOLDER/steps.txt (exit status, seconds); a failing step does not stop the others.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
total="${GPU_CHECK_SECONDS:-420}"
status=0

# run_step NAME LIMIT SHOWN COMMAND...: COMMAND under `timeout`, its output in $out/NAME.txt and
# the last SHOWN lines of it here ("+1": all of it, as it comes). Returns the command's exit status
# (124: its time limit, or skipped for lack of time).
run_step() {
    local name=$1 limit=$2 shown=$3
    shift 3
    local left=$((total - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "$name: skipped, ${left}s left of ${total}s" | tee -a "$out/steps.txt"
        return 124
    fi
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt" | tail -n "$shown"
    local rc=${PIPESTATUS[0]}
    local why=""
    ((rc == 124 || rc == 137)) && why=" (time limit)"
    echo "$name: exit $rc$why after $((SECONDS - start))s (limit ${limit}s)" | tee -a "$out/steps.txt"
    return "$rc"
}

: >"$out/steps.txt"
run_step install 45 3 python3 -m pip install --quiet --no-deps --no-build-isolation --no-index . \
    || { echo "pip install failed, using the source tree"; export PYTHONPATH="$PWD"; }
run_step environment 45 +1 python3 -c "import torch, autosyncbn; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, '|', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| autosyncbn', \
autosyncbn.__version__)" || status=1
run_step nvidia_smi 20 0 nvidia-smi || true

echo "== 1. CUDA tests"
run_step cuda_tests 60 5 python3 -m pytest -q -p no:cacheprovider -m cuda tests || status=1

echo "== 2. DataParallel, timm and autocast against one device"
run_step gpu_check 90 +1 python3 benchmarks/gpu_check.py --output "$out" || status=1

echo "== 3. GPU benchmark: DataParallel (floor, classic, autosyncbn), then 2 processes"
run_step bench_gpu_data_parallel 150 +1 python3 benchmarks/bench_gpu.py --output "$out" \
    --part data-parallel --budget 60 || status=1
run_step bench_gpu_processes 110 +1 python3 benchmarks/bench_gpu.py --output "$out" --part processes \
    || status=1

echo "== 4. the whole suite on this PyTorch, in the time left"
run_step all_tests 180 5 python3 -m pytest -q -p no:cacheprovider -x tests
rc=$?
if ((rc == 124 || rc == 137)); then
    echo "all_tests: stopped by the time left (a part of the suite ran; not counted as a failure)"
elif ((rc != 0)); then
    status=1
fi

echo "gpu_check.sh: $([ $status = 0 ] && echo 'every step passed' || echo 'a step failed: see above') \
after ${SECONDS}s; results in $out (steps.txt, gpu.json, gpu_check.json)" | tee -a "$out/steps.txt"
exit $status
