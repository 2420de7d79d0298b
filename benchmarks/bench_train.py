"""Training benchmark: `catsdogs_train` with the defaults on a folder, timed end to end, for one seed or several.

    python benchmarks/bench_train.py [--data-dir ../shared/data/PetImages-mini] [--seeds 42 43 44] [-- extra catsdogs_train flags]

Runs the real console script (data preparation, the pixel cache, both stages, calibration, evaluation, exports,
MLflow logging to a temporary SQLite store) once per seed, then prints wall time, per-epoch time and images/s from
the run's saved state (checkpoints/last.pt), the validation figures of the epoch it kept, and the test-split metrics
read back from model_config.json. The seed also draws the split, so each seed is its own split of the sample; with
several seeds it ends with their mean and spread.
Targets on the 2-core CPU: test accuracy >= 98.5% within 10 minutes of wall time."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from catsdogs.training import TrainState
from catsdogs.presets import shared_sample


def train_once(data_dir:Path, output:Path, tmp:Path, extra:list[str]) -> dict:
    "Run catsdogs_train into `output`; print its epoch lines and figures; return them."
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    cmd = ["catsdogs_train", "--data-dir", str(data_dir), "--model-dir", str(output), *extra]
    print("$", " ".join(cmd), flush=True)
    cmd[:1] = [sys.executable, "-c", "from catsdogs.training import train_cli; train_cli()"]  # the console script, uninstalled too
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("epoch", "test:", "early stop", "model artifact"))))
    if proc.returncode != 0: sys.exit(f"catsdogs_train failed ({proc.returncode})")
    config = json.loads((output / "model_config.json").read_text())
    metrics = config["metrics"]
    history = TrainState.load(output / "checkpoints" / "last.pt").history  # the run's own record of its epochs
    kept = min(history, key=lambda r: r["val_calibrated_loss"])  # the epoch whose weights the artifact has
    for r in history: print(f"epoch {r['epoch']} {r['stage']:>8}: {r['seconds']:5.0f}s  {r['images_per_s']:7.1f} images/s")
    finetune = [r["images_per_s"] for r in history if r["stage"] == "finetune"]
    result = {"wall": wall, "finetune_images_per_s": statistics.median(finetune) if finetune else float("nan"),
              "val_accuracy": kept["val_accuracy"], "val_calibrated_loss": kept["val_calibrated_loss"], "kept_epoch": kept["epoch"],
              "test_accuracy": metrics["accuracy"], "test_log_loss": metrics["log_loss"], "n_test": metrics["n_images"]}
    print(f"wall time {wall:.0f}s (target <= 600s: {'met' if wall <= 600 else 'NOT met'})")
    print(f"kept epoch {kept['epoch']}: validation accuracy {kept['val_accuracy']:.4f}, calibrated log loss {kept['val_calibrated_loss']:.4f}")
    print(f"test accuracy {metrics['accuracy']:.4f} on {metrics['n_images']} images "
          f"(target >= 0.985: {'met' if metrics['accuracy'] >= 0.985 else 'NOT met'}); "
          f"log loss {metrics['log_loss']:.4f}, ROC AUC {metrics['roc_auc']:.4f}, ECE {metrics['ece']:.4f}, T {config['temperature']:.3f}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=shared_sample())
    parser.add_argument("--model-dir", type=Path, default=None, help="Keep the artifact here (default: a temporary folder; "
                                                                       "with several seeds, one subfolder per seed)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="Train once per seed (default: the settings' seed)")
    parser.add_argument("extra", nargs="*", help="More catsdogs_train flags, after --")
    args = parser.parse_args()
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {os.cpu_count()} cores"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = args.model_dir or Path(tmp) / "model"
        for seed in args.seeds or [None]:
            output = base / f"seed-{seed}" if seed is not None and len(args.seeds) > 1 else base
            extra = [*args.extra, *(["--seed", str(seed)] if seed is not None else [])]
            print(f"\n== training benchmark ({device}){f', seed {seed}' if seed is not None else ''}", flush=True)
            results[seed] = train_once(args.data_dir, output, Path(tmp), extra)
    if len(results) > 1:
        print(f"\n== {len(results)} seeds (each its own split): seed, wall, fine-tuning images/s, kept epoch, "
              "validation accuracy and calibrated log loss, test accuracy")
        for seed, r in results.items():
            print(f"seed {seed}: {r['wall']:4.0f}s  {r['finetune_images_per_s']:5.1f} images/s  epoch {r['kept_epoch']}  "
                  f"val {r['val_accuracy']:.4f} / {r['val_calibrated_loss']:.4f}  test {r['test_accuracy']:.4f} (n={r['n_test']})")
        for key in ("val_accuracy", "val_calibrated_loss", "test_accuracy", "finetune_images_per_s", "wall"):
            values = [r[key] for r in results.values()]
            print(f"{key}: mean {statistics.mean(values):.4f}, standard deviation {statistics.stdev(values):.4f}")


if __name__ == "__main__":
    main()
