#!/usr/bin/env bash
# Times the quick preset's pre-training on one device: every model of `hope-kernels pretrain --preset quick`
# for STEPS steps (default 200) on DEVICE (default cuda), WORKERS models at once (default 1), into a scratch
# folder (the shipped weights are not touched). Prints each model's training time from the written index (the sum
# of its logged step times) and its time per step. For a lent GPU: the README gives the full
# regeneration's CPU wall time; its GPU time has not been measured yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${STEPS:-200} WORKERS=${WORKERS:-1} DEVICE=${DEVICE:-cuda}
W=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
t0=$SECONDS
$PY -m hope_kernels.cli pretrain --preset quick --device "$DEVICE" --steps "$STEPS" --workers "$WORKERS" \
  --work "$W/work" --assets "$W/assets"
echo "all models: $((SECONDS - t0)) s (data simulation included), $WORKERS at once, on $DEVICE"
$PY - "$W/assets/index.json" "$STEPS" <<'PYEOF'
import json, sys
index, steps = json.load(open(sys.argv[1])), int(sys.argv[2])
for m in index["models"]:
    s = m["wall_seconds"]
    print(f"{m['name']}: {s:.1f} s for {steps} steps ({1000 * s / steps:.1f} ms a step), "
          f"held-out A1 {m['heldout']['A1']['ratio']:.2f}x copy-last")
PYEOF
