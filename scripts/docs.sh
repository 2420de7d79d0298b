#!/usr/bin/env bash
# Build the docs site into _docs/ and README.md from nbs/index.ipynb with nbdev and Quarto, then check the site as a
# reader sees it (scripts/check_site.py: no machine paths, progress bars, warnings or cut-off content; figures load;
# the sidebar lists every page). Fails on any warning of nbdev or Quarto.
# Without Quarto, every step short of the render runs (quarto config, module index, sidebar, and nbdev's processing
# of each notebook into _proc/), so a broken notebook or doc link fails here too.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
if ! command -v quarto >/dev/null; then
  echo "docs: Quarto not found; running nbdev's pre-render steps only (install Quarto to render the site and README.md)"
  exec python scripts/docs_prerender.py
fi
log=$(mktemp); trap 'rm -f "$log"' EXIT
nbdev_readme 2>&1 | tee "$log"  # always: nbdev_docs rebuilds README.md only when it is older than the notebook
nbdev_docs 2>&1 | tee -a "$log"
if grep -nE "WARN|[Ww]arning" "$log" >&2; then
  echo "docs: FAIL: nbdev or Quarto warned (above)" >&2
  exit 1
fi
python scripts/check_site.py _docs
