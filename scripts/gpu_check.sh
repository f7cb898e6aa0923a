#!/usr/bin/env bash
# The prepared GPU check (issue 27): on one CUDA GPU, for every bundle, a few training iterations, one
# volume at the paper's number of steps and a 1-process DDP step, paper-sized networks, precision auto;
# CUDA rows into benchmark.md. Under 8 minutes on an H100. Without CUDA: one line, exit 0.
#   scripts/gpu_check.sh [--out benchmark.md] [--only resdce,d3m] [--device cpu --tiny]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m scripts.benchmarks.gpu "$@"
