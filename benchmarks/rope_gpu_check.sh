#!/usr/bin/env bash
# Short GPU check of the fused RoPE attention (Triton only: no extension build), for a lent machine with a few
# minutes left: (1) the GPU tests of rope attention (no CUDA-extension cases) and of the predictors, then a
# compile warm-up of every swept launch configuration in parallel processes (side by side with the tests, on
# an H200 the tests did not finish in 55 s; alone they took 25 s); (2) the launch sweep at the clip and the 8x clip
# (benchmarks/sweep_gpu.py --only rope); (3) the rope benchmark's GPU rows (eager, triton, then torch.compile)
# with the fastest configuration per pass from (2). Stage limits: T_TESTS, T_WARM, T_SWEEP, T_BENCH, T_COMPILE
# seconds.
# Logs and tables go to $OUT (else /tmp) and the sweep/bench tables to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
unset TRITON_INTERPRET
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
O=${OUT:-/tmp}
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace('NVIDIA ', '').replace(' ', '-'))")
BASE=benchmarks/results/$(date -u +%Y-%m-%d)-$GPU-rope
echo "== $GPU, $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"

t0=$SECONDS
timeout -s INT -k 10 "${T_TESTS:-60}" $PY -m pytest tests/ops/test_rope_attention.py tests/models/test_models.py -q \
  -p no:cacheprovider -n 12 -k "gpu and not cuda" --tb=short -rfE > "$O/rope_tests.log" 2>&1
trc=$?
echo "tests: rc=$trc in $((SECONDS - t0)) s"
grep -E "passed|failed|FAILED|Error" "$O/rope_tests.log" | tail -15
t0=$SECONDS
warm_pids=()
for c in 64,64,4,2 64,64,4,3 128,64,8,3 128,64,4,3 64,32,4,3 32,32,4,2; do
  # same L divisibility, d and dtype as the swept shapes: the sweep finds these kernels compiled
  HOPE_ROPE_CONFIG=$c timeout -k 5 "${T_WARM:-45}" $PY -c "
import torch
from hope_kernels.ops.rope_attention.reference import rope_freqs
from hope_kernels.ops.rope_attention.triton import rope_attention_bwd_triton as bwd, rope_attention_fwd_triton as fwd
pos = torch.tensor([(0, 0, 0)] * 2064, device='cuda')
q, k, v, g = (torch.randn(1, 1, 2064, 64, device='cuda', dtype=torch.bfloat16) for _ in range(4))
w = rope_freqs(64, None)
o, lse = fwd(q, k, v, pos, w, 0, 0.125)
bwd(g, q, k, v, o, lse, pos, w, 0, 0.125)
torch.cuda.synchronize()" > /dev/null 2>&1 &
  warm_pids+=($!)
done
for p in "${warm_pids[@]}"; do wait "$p"; done
echo "compile warm-up: $((SECONDS - t0)) s"

echo "== sweep"
t0=$SECONDS
timeout -s INT -k 10 "${T_SWEEP:-70}" $PY benchmarks/sweep_gpu.py --only rope --rope-env /tmp/rope.env \
  --md "$BASE-sweep.md" --json "$BASE-sweep.json"
echo "sweep: rc=$? in $((SECONDS - t0)) s"
cp "$BASE-sweep.md" "$BASE-sweep.json" "$O/" 2>/dev/null
[ -f /tmp/rope.env ] && cat /tmp/rope.env && set -a && . /tmp/rope.env && set +a

echo "== benchmark (eager, triton, then torch.compile)"
t0=$SECONDS
timeout -s INT -k 10 "${T_BENCH:-60}" $PY -m pytest benchmarks/test_bench_rope_attention.py -q -s \
  -p no:cacheprovider -k "test_bench_gpu and (eager or triton)" --benchmark-columns=median,rounds \
  > "$O/rope_bench.log" 2>&1
echo "bench: rc=$? in $((SECONDS - t0)) s"
timeout -s INT -k 10 "${T_COMPILE:-45}" $PY -m pytest benchmarks/test_bench_rope_attention.py -q -s \
  -p no:cacheprovider -k "test_bench_gpu and (eager or compile)" --benchmark-columns=median,rounds \
  >> "$O/rope_bench.log" 2>&1
echo "bench with torch.compile: rc=$? in $((SECONDS - t0)) s"
grep -E "TFLOP/s|passed|failed" "$O/rope_bench.log"
cp "$O/rope_bench.log" "$BASE-bench.log" 2>/dev/null
echo "== done"
