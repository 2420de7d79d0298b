#!/usr/bin/env bash
# The project's test command (README, and CI through .ci/run): set up, then prove that the
# notebook pairs, the package and the notebooks agree, that every notebook runs, and the tests pass.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads sleep instead of spinning, so the servers
# and clients that the tests run side by side on two cores do not starve each other.
# PYTHONFAULTHANDLER: a process that crashes prints its Python stack.
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_WAIT_POLICY=PASSIVE PYTHONFAULTHANDLER=1

echo "== 1/5 notebook pairs (.ipynb <-> percent .py) in sync, README from nbs/index.ipynb"
python scripts/check_pairs.py
python scripts/make_readme.py --check

echo "== 2/5 package is what nbdev_export makes from the notebooks"
snapshot() { git status --porcelain -- catsdogs nbs; git --no-pager diff -- catsdogs nbs | sha256sum; }
before=$(snapshot)  # compared with itself, so uncommitted work that is already in sync passes
nbdev_clean
nbdev_export
if [ "$(snapshot)" != "$before" ]; then
  git status --porcelain -- catsdogs nbs
  echo "FAIL: nbdev_clean/nbdev_export changed the files above: run scripts/sync_notebooks.sh and commit the result" >&2
  exit 1
fi

echo "== 3/5 every notebook runs top to bottom, each in a fresh process (nbdev_test per notebook)"
python scripts/test_notebooks.py

echo "== 4/5 docs: every exported symbol documented with an example and its output, the sidebar complete, then every step short of the Quarto render"
python scripts/check_docs.py
bash scripts/docs.sh

echo "== 5/5 tests (the slow ones, marked \`slow\`, run in benchmarks/slow_tests.sh)"
python -m pytest tests "$@"
