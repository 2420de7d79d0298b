"""Compare int8 quantization recipes of one model artifact on its validation split: accuracy, log loss, the share of
cats and dogs kept at the open-set threshold, label agreement with f32, and ONNX Runtime speed (batch 8).

    python benchmarks/bench_int8_recipes.py --model artifacts/model --prepared artifacts/data

Each recipe is written into a copy of the artifact; the artifact itself is left as it is."""
import argparse
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from catsdogs.config import TrainingSettings
from catsdogs.data import load_prepared
from catsdogs.engines import make_runner, measure_int8, quantize_int8
from catsdogs.presets import CLASS_NAMES, ModelConfig, Preset

RECIPES = {"8-bit weights": dict(reduce_range=False), "7-bit weights (reduce_range)": dict(reduce_range=True)}

def cpu_name() -> str:
    "The CPU's model name (Linux), or the machine type."
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.machine()

def images_per_second(model_dir:Path, precision:str, batch:np.ndarray, threads:int, repeats:int=5) -> float:
    "Median images/s of the ONNX Runtime forward pass on one batch."
    run = make_runner("onnx", model_dir, threads=threads, precision=precision)
    run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); run(batch); times.append(time.perf_counter() - start)
    return len(batch) / float(np.median(times))

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/model"))
    parser.add_argument("--prepared", type=Path, default=Path("artifacts/data"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    data = load_prepared(args.prepared)
    train, val = data.split("train"), data.split("val")
    n_calibration = TrainingSettings().int8_calibration_images
    rng = np.random.default_rng(0)
    train_paths = [data.root / p for p in train.path]
    calibration = [train_paths[i] for i in sorted(rng.permutation(len(train_paths))[:n_calibration])]
    val_paths, val_targets = [data.root / p for p in val.path], val.label.map(CLASS_NAMES.index).to_numpy()
    batch = Preset.from_config(ModelConfig.load(args.model / "model_config.json")).stack(val_paths[:8])
    print(f"{date.today()} {cpu_name()}, {args.threads} threads, {len(calibration)} calibration photos, "
          f"{len(val_paths)} validation photos, MinMax, per-channel, u8 activations / s8 weights")
    print("| recipe | val accuracy | log loss | kept at threshold | labels agree | max prob. diff | images/s (batch 8) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "model"
        shutil.copytree(args.model, work, ignore=shutil.ignore_patterns("model.int8.onnx", "data", "*.ts", "*.pt"))
        f32_speed = images_per_second(work, "f32", batch, args.threads)
        for name, options in RECIPES.items():
            quantize_int8(work, calibration, **options)
            report = measure_int8(work, val_paths, val_targets)
            f32, int8 = report["f32"], report["int8"]
            if name == next(iter(RECIPES)):
                print(f"| f32 | {f32['accuracy']:.2%} | {f32['log_loss']:.4f} | {f32.get('open_set_kept', 1):.2%} | | | {f32_speed:.0f} |")
            print(f"| {name} | {int8['accuracy']:.2%} | {int8['log_loss']:.4f} | {int8.get('open_set_kept', 1):.2%} | "
                  f"{report['labels_agree']:.2%} | {report['max_probability_difference']:.3f} | {images_per_second(work, 'int8', batch, args.threads):.0f} |")

if __name__ == "__main__": main()
