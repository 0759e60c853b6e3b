#!/usr/bin/env bash
# Refresh the README's main-job figures in one command: run the main job, then copy its
# summary.json to results/main_job/summary.json and its two README plots to docs/img/, and
# rewrite the README's summary block and quoted numbers from that record.
# Check afterwards: .venv/bin/python scripts/readme_figures.py check (tests/test_readme.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/main_job.sh "$@"
exec .venv/bin/python scripts/readme_figures.py record
