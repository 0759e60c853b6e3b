#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with the CPU build of torch (installed first,
# so that pip does not pull a multi-GB CUDA build), then ode_reg with its dev extra.
# Set ODE_REG_TORCH to install another torch spec (e.g. a CUDA build on a GPU machine).
# The editable install is skipped when it is already done for the current pyproject.toml
# (.venv/.ode_reg_setup holds its checksum), so later calls take a second and need no network.
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
stamp="$(.venv/bin/python -c "import hashlib, os; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest(), os.getcwd())")"
# Where the venv finds ode_reg, asked from outside the tree (find_spec imports nothing).
here="$(cd / && "$OLDPWD/.venv/bin/python" -c "import importlib.util as u, os; s = u.find_spec('ode_reg'); print(os.path.dirname(os.path.dirname(s.origin)) if s else '')" 2>/dev/null || true)"
if [ "$(cat .venv/.ode_reg_setup 2>/dev/null || true)" != "$stamp" ] || [ "$here" != "$(pwd)" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$stamp" > .venv/.ode_reg_setup
fi
