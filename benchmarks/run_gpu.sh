#!/usr/bin/env bash
# One command for a GPU machine (offline; torch with CUDA, triton, nvcc, ninja, pybind11, pytest-benchmark
# preinstalled): build the extension with CUDA, run the test suite on the GPU, measure the copy bandwidth and
# run every benchmark, then write benchmarks/results/<date>-<gpu>.{json,md} (and copy them to $OUT if set).
# Each stage has its own time limit so the whole script stays under 8 minutes. TEST_PATHS / TEST_K choose the
# tests (default: the GPU tests of the op and model files); BENCH_SPECS lists "suite:seconds" pairs.
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
BUILD_LOG=/tmp/hope_kernels_build.log
HOPE_KERNELS_FORCE_CUDA=1 timeout 240 $PY setup.py build_ext --inplace > "$BUILD_LOG" 2>&1
rc=$?
echo "build: $rc in $((SECONDS - t0)) s (full log: $BUILD_LOG)"
[ $rc -eq 0 ] || grep -E "error|Error|FAILED" "$BUILD_LOG" | grep -v "^ninja: build stopped" | head -40
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -m hope_kernels.cli backends

echo "== tests on the GPU"
t0=$SECONDS
# SIGINT at the limit, so pytest still prints its summary of what ran; SIGKILL 20 s later (a SIGINT alone left
# pytest waiting on a ptxas compile for the rest of a 560 s call on the H200, 2026-11-26). Only the tests that touch the GPU
# (CI runs the rest), kernels that have never run on a GPU first; the nvcc compile checks are CI's too.
GPU_TESTS="tests/test_titans.py tests/test_dgd.py tests/test_l1_loss.py tests/test_models.py tests/test_rope_attention.py"
timeout -s INT -k 20 ${TEST_TIMEOUT:-80} $PY -m pytest ${TEST_PATHS:-$GPU_TESTS} -q -m "not slow" -p no:cacheprovider \
  -k "${TEST_K:-(gpu or cuda) and not source_compiles}" --tb=line -rfE 2>&1 | tail -40
echo "tests: ${PIPESTATUS[0]} in $((SECONDS - t0)) s"

echo "== benchmarks"
# One pytest per file, each under its own time limit, so a slow baseline cannot starve the others.
# Rows from the shared `bench` fixture go to $BASE.json; every file's pytest-benchmark JSON (with the
# ratios some suites put in extra_info) to $BASE.<suite>.json.
rm -f "$BASE".*json
VERSIONS=$($PY -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")')
# "titans@O1": the Titans suite's eager and Triton rows again with ptxas -O1 (own Triton cache): ptxas' default
# -O3 gives the Titans kernels 32 registers and 8-38 KB of spills per thread, -O1 255 registers and 1-5 KB
# (docs/titans.md); this run says which is faster.
for spec in ${BENCH_SPECS:-device:20 l1_loss:60 rope_attention:80 dgd:80 titans:80 titans@O1:30}; do
  name=${spec%%:*}; limit=${spec##*:}; suite=${name%%@*}; file=benchmarks/test_bench_$suite.py
  [ -f "$file" ] || continue
  extra=(); envs=()
  if [ "$name" != "$suite" ]; then
    extra=(-k "eager_chunked or triton"); envs=(PTXAS_OPTIONS=-${name##*@} TRITON_CACHE_DIR=/tmp/triton_${name##*@})
  fi
  t0=$SECONDS
  # SIGINT at the limit (SIGKILL 20 s later): pytest then still writes the rows measured so far
  env "${envs[@]}" HOPE_BENCH_JSON=$BASE.json timeout -s INT -k 20 $limit $PY -m pytest "$file" -q -s \
    -p no:cacheprovider "${extra[@]}" --benchmark-disable-gc --benchmark-columns=median,rounds \
    --benchmark-json="$BASE.${name//@/-}.json" > "${OUT:-/tmp}/bench_$suite.log" 2>&1
  echo "benchmark $name: rc=$? in $((SECONDS - t0)) s"
  grep -E "^\[|passed|failed|error" "${OUT:-/tmp}/bench_$suite.log" | tail -30
  # summarise after every suite, so a run cut short still leaves the finished suites' numbers
  $PY benchmarks/summarize.py "$BASE.json" "$BASE.md" --extra "$BASE".*.json \
    --title "hope-kernels benchmarks, $GPU, $STAMP" --preamble "$VERSIONS"
  # at most 8 files come back from a lent machine: the table, the rows and one combined log
  [ -n "${OUT:-}" ] && cp "$BASE.md" "$OUT/" && { [ ! -f "$BASE.json" ] || cp "$BASE.json" "$OUT/"; }
  cat "${OUT:-/tmp}/bench_$suite.log" >> "${OUT:-/tmp}/bench_logs.txt" && rm -f "${OUT:-/tmp}/bench_$suite.log"
done
[ -f "$BASE.md" ] && grep -vE "^\| test_" "$BASE.md" | tail -45
echo "== done"
