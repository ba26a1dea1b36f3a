#!/usr/bin/env bash
# Sets up the project on a fresh machine: system tools, then .venv with torch first, then the rest.
# Idempotent and quick when nothing changed (a stamp of requirements.txt skips pip).
#   PYTHON=python3.11 scripts/setup.sh      # choose the interpreter (3.10+)
#   TORCH_SPEC="torch==2.5.1" scripts/setup.sh   # another torch (>=2.4), e.g. a CUDA build on a GPU cluster
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

# espeak-ng speaks the sample corpus's transcripts
if ! command -v espeak-ng >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing espeak-ng (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends espeak-ng >/dev/null 2>&1 || {
      apt-get update >/dev/null 2>&1
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends espeak-ng >/dev/null
    }
  else
    echo "setup: espeak-ng is missing; install it (e.g. sudo apt-get install espeak-ng) and rerun" >&2
    exit 1
  fi
fi

# headless Chromium renders the run report (launch.py report) in its browser test; optional elsewhere
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium (apt; for the report's browser test)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || {
      apt-get update >/dev/null 2>&1
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null ||
        echo "setup: chromium could not be installed: the report's browser test will skip (and fail in CI)" >&2
    }
  else
    echo "setup: no chromium: the report's browser test will skip (sudo apt-get install chromium)" >&2
  fi
fi

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
  echo "setup: $PY is $("$PY" --version 2>&1); Python >= 3.10 is needed (set PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha
want=$(cat requirements.txt | sha256sum | cut -d' ' -f1)-$TORCH_SPEC
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on these machines
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > $stamp
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)' 2>/dev/null))"
