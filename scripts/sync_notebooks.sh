#!/usr/bin/env bash
# After editing either side of a pair in nbs/: jupytext sync (the newer side wins), rewrite
# each .py canonically from its .ipynb, strip notebook noise, and export the package.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
for py in nbs/*.py; do jupytext --sync --quiet "$py"; done
nbdev_clean
for nb in nbs/*.ipynb; do (cd nbs && jupytext --quiet --to py:percent "$(basename "$nb")"); done
nbdev_export
python scripts/check_pairs.py
python scripts/make_readme.py
