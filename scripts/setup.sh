#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with the CPU build of torch (installed first,
# so that pip does not pull a multi-GB CUDA build), then ode_reg with its dev extra.
# Set ODE_REG_TORCH to install another torch spec (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${ODE_REG_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
