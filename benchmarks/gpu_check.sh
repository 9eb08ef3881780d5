#!/usr/bin/env bash
# The prepared GPU check: one command, under 8 minutes on one GPU, no download. It runs every CUDA
# code path once (the standard profile's epoch, a paper-profile NONE cell, a Ray grid at half a GPU
# per cell, the throughput benchmark) and appends a dated section to BENCHMARKS.md; see
# benchmarks/gpu_check.py. Usage: bash benchmarks/gpu_check.sh [--out FILE.md] [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3  # a GPU image with torch installed, as the lent GPU machines have
fi
export BENCH_PROGRESS=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
