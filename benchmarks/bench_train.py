"""Training benchmark: `catsdogs_train` with the defaults on a folder, timed end to end.

    python benchmarks/bench_train.py [--data-dir ../shared/data/PetImages-mini] [-- extra catsdogs_train flags]

Runs the real console script (data preparation, both stages, calibration, evaluation, exports,
MLflow logging to a temporary SQLite store), then prints wall time, per-epoch time and
images/s from the run's saved state (checkpoints/last.pt), and the test-split metrics read back from
model_config.json.
Targets on the 2-core CPU: test accuracy >= 98.5% within 10 minutes of wall time."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from catsdogs.training import TrainState
from catsdogs.presets import shared_sample

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", type=Path, default=shared_sample())
parser.add_argument("--model-dir", type=Path, default=None, help="Keep the artifact here (default: a temporary folder)")
parser.add_argument("extra", nargs="*", help="More catsdogs_train flags, after --")
args = parser.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    output = args.model_dir or Path(tmp) / "model"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    cmd = ["catsdogs_train", "--data-dir", str(args.data_dir), "--model-dir", str(output), *args.extra]
    print("$", " ".join(cmd), flush=True)
    cmd[:1] = [sys.executable, "-c", "from catsdogs.training import train_cli; train_cli()"]  # the console script, uninstalled too
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    log = proc.stdout
    print("\n".join(line for line in log.splitlines() if line.startswith(("epoch", "test:", "early stop", "model artifact"))))
    if proc.returncode != 0: sys.exit(f"catsdogs_train failed ({proc.returncode})")
    config = json.loads((output / "model_config.json").read_text())
    metrics = config["metrics"]
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {os.cpu_count()} cores"
    history = TrainState.load(output / "checkpoints" / "last.pt").history  # the run's own record of its epochs
    print(f"\n== training benchmark ({device})")
    for r in history: print(f"epoch {r['epoch']} {r['stage']:>8}: {r['seconds']:5.0f}s  {r['images_per_s']:7.1f} images/s")
    print(f"wall time {wall:.0f}s (target <= 600s: {'met' if wall <= 600 else 'NOT met'})")
    print(f"test accuracy {metrics['accuracy']:.4f} on {metrics['n_images']} images "
          f"(target >= 0.985: {'met' if metrics['accuracy'] >= 0.985 else 'NOT met'}); "
          f"log loss {metrics['log_loss']:.4f}, ROC AUC {metrics['roc_auc']:.4f}, ECE {metrics['ece']:.4f}, T {config['temperature']:.3f}")
