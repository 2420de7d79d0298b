#!/usr/bin/env bash
# Build the docs site. With Quarto installed this is nbdev_docs; without it, every step short of
# the render still runs (quarto config, module index, sidebar, and nbdev's processing of each
# notebook into _proc/), so a broken notebook or doc link fails here too.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v quarto >/dev/null; then exec nbdev_docs; fi
echo "docs: Quarto not found; running nbdev's pre-render steps only"
python scripts/docs_prerender.py
