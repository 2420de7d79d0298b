#!/usr/bin/env bash
# The tests marked `slow` (the default `pytest` run skips them to stay under 15 minutes): the open-set
# ("neither") suite on a model trained on the whole sample, exact resume, and DDP with two processes.
# About 8 minutes on the 2-core CPU machine.   Usage: bash benchmarks/slow_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_WAIT_POLICY=PASSIVE
python -m pytest tests -m slow "$@"
