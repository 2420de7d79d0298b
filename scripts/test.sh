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

echo "== 1/6 notebook pairs (.ipynb <-> percent .py) in sync"
python scripts/check_pairs.py

echo "== 2/6 package is what nbdev_export makes from the notebooks"
snapshot() { git status --porcelain -- "$@"; git --no-pager diff -- "$@" | sha256sum; }
before=$(snapshot catsdogs nbs)  # compared with itself, so uncommitted work that is already in sync passes
nbdev_clean
nbdev_export
if [ "$(snapshot catsdogs nbs)" != "$before" ]; then
  git status --porcelain -- catsdogs nbs
  echo "FAIL: nbdev_clean/nbdev_export changed the files above: run scripts/sync_notebooks.sh and commit the result" >&2
  exit 1
fi

echo "== 3/6 every notebook runs top to bottom, each in a fresh process (nbdev_test per notebook)"
python scripts/test_notebooks.py

echo "== 4/6 docs: every exported symbol documented with an example and its output; the site rendered and checked page by page; README.md is nbdev_readme's"
python scripts/check_docs.py
before=$(snapshot README.md)
bash scripts/docs.sh
if ! command -v quarto >/dev/null; then
  echo "docs: README.md not checked against nbs/index.ipynb (nbdev_readme needs Quarto)"
elif [ "$(snapshot README.md)" != "$before" ]; then
  git --no-pager diff --stat -- README.md
  echo "FAIL: README.md is not what nbdev_readme makes of nbs/index.ipynb: run scripts/sync_notebooks.sh and commit it" >&2
  exit 1
fi

echo "== 5/6 deployment files: GitHub workflows (actionlint), Kubernetes manifest (its schemas)"
bash scripts/lint_deploy.sh

echo "== 6/6 tests (the slow ones, marked \`slow\`, run in benchmarks/slow_tests.sh; the container test runs where podman or docker is)"
python -m pytest tests "$@"
