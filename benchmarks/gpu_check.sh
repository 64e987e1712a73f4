#!/usr/bin/env bash
# The prepared GPU check: one command for a GPU machine's short window (within 8 minutes).
#
#   bash benchmarks/gpu_check.sh RESULTS_FOLDER
#
# Uses the machine's own PyTorch (this package is installed with --no-deps), then:
#   1. the CUDA tests, and as much of the whole test suite on this PyTorch as fits 3 minutes;
#   2. benchmarks/gpu_check.py: real nn.DataParallel against one device (install()
#      and the explicit classes), timm models with BatchNormAct2d, fp16/bf16 autocast;
#   3. benchmarks/bench_gpu.py: synchronized vs unsynchronized DataParallel, and
#      autosyncbn vs torch.nn.SyncBatchNorm over gloo on one GPU.
# Every step writes its output to RESULTS_FOLDER; a failing step does not stop the others.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

python3 -m pip install --quiet --no-deps --no-build-isolation --no-index . >"$out/install.txt" 2>&1 \
    || { echo "pip install failed, using the source tree"; export PYTHONPATH="$PWD"; }
python3 -c "import torch, autosyncbn; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'|', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| autosyncbn', autosyncbn.__version__)" \
    | tee "$out/environment.txt"

echo "== 1. CUDA tests, then the whole suite on this PyTorch"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$out/cuda_tests.txt" | tail -5 \
    || status=1
timeout 180 python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tee "$out/all_tests.txt" | tail -5 \
    || status=1

echo "== 2. DataParallel, timm and autocast against one device"
timeout 120 python3 benchmarks/gpu_check.py --output "$out" 2>&1 | tee "$out/gpu_check.txt" || status=1

echo "== 3. GPU benchmark"
timeout 100 python3 benchmarks/bench_gpu.py --output "$out" 2>&1 | tee "$out/bench_gpu.txt" || status=1

echo "gpu_check.sh: $([ $status = 0 ] && echo 'every step passed' || echo 'a step failed: see above')"
exit $status
