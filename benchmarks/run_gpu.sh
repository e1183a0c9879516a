#!/usr/bin/env bash
# One command for a GPU machine (offline; torch with CUDA, triton, nvcc, ninja, pybind11, pytest-benchmark
# preinstalled): build the extension with CUDA, run the test suite on the GPU, measure the copy bandwidth and
# run every benchmark, then write benchmarks/results/<date>-<gpu>.{json,md} (and copy them to $OUT if set).
# Each stage has its own time limit so the whole script stays under 8 minutes. TEST_PATHS / BENCH_PATHS narrow
# the run (default: tests, benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG=${OUT:-benchmarks/results}/run_gpu.log
mkdir -p benchmarks/results "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace('NVIDIA ', '').replace(' ', '-'))")
STAMP=$(date -u +%Y-%m-%d)
BASE=benchmarks/results/${STAMP}-${GPU}
echo "== $GPU, $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"

echo "== build (CUDA)"
t0=$SECONDS
BUILD_LOG=${OUT:-/tmp}/build.log
HOPE_KERNELS_FORCE_CUDA=1 timeout 240 $PY setup.py build_ext --inplace > "$BUILD_LOG" 2>&1
rc=$?
echo "build: $rc in $((SECONDS - t0)) s (full log: $BUILD_LOG)"
[ $rc -eq 0 ] || grep -E "error|Error|FAILED" "$BUILD_LOG" | grep -v "^ninja: build stopped" | head -40
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -m hope_kernels.cli backends

echo "== tests on the GPU"
t0=$SECONDS
timeout ${TEST_TIMEOUT:-170} $PY -m pytest ${TEST_PATHS:-tests} -q -x -m "not slow" -p no:cacheprovider --junitxml=${OUT:-/tmp}/junit.xml 2>&1 | tail -25
echo "tests: ${PIPESTATUS[0]} in $((SECONDS - t0)) s"

echo "== benchmarks"
t0=$SECONDS
rm -f "$BASE.json"
HOPE_BENCH_JSON=$BASE.json timeout ${BENCH_TIMEOUT:-200} $PY -m pytest ${BENCH_PATHS:-benchmarks} -q -p no:cacheprovider \
  --benchmark-disable-gc --benchmark-columns=median,rounds 2>&1 | sed -n '/benchmark summary/,$p'
echo "benchmarks: ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
if [ -f "$BASE.json" ]; then
  $PY benchmarks/summarize.py "$BASE.json" "$BASE.md" --title "hope-kernels benchmarks, $GPU, $STAMP" \
    --preamble "$($PY -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")')"
  [ -n "${OUT:-}" ] && cp "$BASE.json" "$BASE.md" "$OUT/"
fi
echo "== done"
