#!/usr/bin/env bash
# The prepared GPU check (issue 14, target 4): run from the repo root on a machine with a CUDA GPU.
#   bash bench/gpu_check.sh              # < 8 min on one GPU; one figure a line
#   bash bench/gpu_check.sh --cpu-dry    # each step tiny on CPU (checks the script itself)
#   PYTHON=/path/to/python bash bench/gpu_check.sh   # an interpreter with this project's requirements
# Needs the project's Python requirements with a CUDA build of torch (scripts/setup.sh with
# TORCH_SPEC=... on a GPU machine); generates all its inputs, downloads nothing. See bench/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import torch, fairseq, omegaconf' 2>/dev/null; then
  echo "error: $PY cannot import torch, fairseq and omegaconf: set up the project first (scripts/setup.sh, with TORCH_SPEC=<a CUDA torch> on a GPU machine) or set PYTHON=" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec "$PY" bench/gpu_check.py "$@"
