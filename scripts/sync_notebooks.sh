#!/usr/bin/env bash
# Bring notebook pairs and the package in line after editing either side of a pair:
# jupytext sync (newer side wins) -> nbdev_clean -> nbdev_export.
set -euo pipefail
cd "$(dirname "$0")/.."
jupytext --sync --quiet nbs/*.ipynb nbs/*.py 2>/dev/null || jupytext --sync --quiet nbs/*.py
nbdev_clean
nbdev_export
