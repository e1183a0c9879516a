#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and builds the compiled extension (C++ CPU kernels; CUDA kernels
# too when torch has CUDA and nvcc is found). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip setuptools wheel
.venv/bin/pip install -q -r requirements.txt
# --no-build-isolation: compile against the torch installed above (an isolated build would fetch another torch).
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/pip install -q --no-build-isolation -e .
.venv/bin/hope-kernels backends
