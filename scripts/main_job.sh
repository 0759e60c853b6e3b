#!/usr/bin/env bash
# The main job: set up (once), then train the `digits` recipe (antisymmetric ODE-RNN with the
# adjoint-magnitude regularizer and the three monitors), W&B offline unless an account is
# configured. Extra arguments go to `ode-reg fit` (e.g. --trainer.max_epochs 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ode-reg fit --config recipes/digits.yaml "$@"
