#!/usr/bin/env bash
# The main job on a fresh machine: set up, prepare the data, train, evaluate, then serve.
#   DATA_DIR=path/to/photos bash scripts/run.sh   # a local folder (one subfolder per class)
#   bash scripts/run.sh                           # downloads Microsoft PetImages (~800 MB) once
# Any CATSDOGS_* variable (see catsdogs/config.py) and MLFLOW_TRACKING_URI apply; PORT sets the port.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # OpenMP threads sleep rather than spin: faster serving on shared cores
out=${OUTPUT:-artifacts}
data_args=()
[ -n "${DATA_DIR:-}" ] && data_args=(--data-dir "$DATA_DIR")
catsdogs_prepare "${data_args[@]}" --out "$out/data"
catsdogs_train --prepared "$out/data" --model-dir "$out/model"   # ends with the test-split metrics
exec catsdogs_serve --model-dir "$out/model" --port "${PORT:-8000}"
