#!/usr/bin/env bash
# Idempotent setup: system packages (Chromium for the browser test, Prometheus for the drift test), a virtual
# environment in .venv, and catsdogs installed in it (editable, with the dev extras).
# Usage: bash scripts/setup.sh            (sourcing it also activates the venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()

[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || command -v chromium >/dev/null || need_apt+=(chromium)  # CHROMIUM: another browser binary
command -v prometheus >/dev/null || need_apt+=(prometheus)  # the drift test scrapes the service with a real Prometheus; promtool checks the alert rules
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
    echo "setup: installing ${need_apt[*]}"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null; } ||
      echo "setup: could not install ${need_apt[*]}; the browser test needs Chromium, the drift test Prometheus" >&2
  else
    echo "setup: please install ${need_apt[*]} (Chromium runs the browser test, Prometheus the drift test)" >&2
  fi
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
stamp=.venv/.catsdogs-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ settings.ini -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
