#!/usr/bin/env bash
# After editing either side of a pair in nbs/: jupytext sync (the newer side wins), rewrite
# each .py canonically from its .ipynb, strip notebook noise, export the package, and render README.md from
# nbs/index.ipynb (nbdev_readme, with Quarto).
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
for py in nbs/*.py; do jupytext --sync --quiet "$py"; done
nbdev_clean
for nb in nbs/*.ipynb; do (cd nbs && jupytext --quiet --to py:percent "$(basename "$nb")"); done
nbdev_export
python scripts/check_pairs.py
if command -v quarto >/dev/null; then nbdev_readme; else echo "sync: README.md not rebuilt: nbdev_readme needs Quarto" >&2; fi
