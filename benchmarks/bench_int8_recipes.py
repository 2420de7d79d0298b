"""Compare int8 quantization recipes of one model artifact on its validation split, on ONNX Runtime and OpenVINO:
accuracy, log loss, the share of cats and dogs kept at the open-set threshold, label agreement with f32, and speed
(forward pass, batch 8). The first line names the CPU and whether it has VNNI or AMX, which decide whether full
8-bit weights overflow.

    python benchmarks/bench_int8_recipes.py --model artifacts/model --prepared artifacts/data

Each recipe is written into a copy of the artifact; the artifact itself is left as it is."""
import argparse
import platform
import shutil
import tempfile
from datetime import date
from pathlib import Path

from catsdogs.config import TrainingSettings
from catsdogs.data import load_prepared
from catsdogs.engines import calibration_photos, make_runner, measure_int8, quantize_int8
from catsdogs.presets import CLASS_NAMES, ModelConfig, Preset

from bench_engines import forward_rate  # the engines benchmark's forward-pass timing

RECIPES = {  # name -> quantize_int8 options; the last is the default
    "8-bit weights": dict(reduce_range=False, float_ends=False),
    "8-bit weights, s8 activations": dict(activations="s8", reduce_range=False, float_ends=False),
    "7-bit weights": dict(depthwise_8bit=False, float_ends=False),
    "7-bit weights, first and last layers in float": dict(depthwise_8bit=False),
    "7-bit weights (8 in depthwise), first and last layers in float (default)": dict(),
}

def cpu_name() -> str:
    "The CPU's model name (Linux), or the machine type."
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.machine()

def cpu_units() -> str:
    "The CPU's integer dot-product units that decide how u8 x s8 products add up: VNNI/AMX (32-bit sums) or none (16-bit pairs)."
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    found = [name for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX")) if flag in flags]
    return ", ".join(found) or "no VNNI or AMX"

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/model"))
    parser.add_argument("--prepared", type=Path, default=Path("artifacts/data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["onnx", "openvino"])
    args = parser.parse_args()
    data = load_prepared(args.prepared)
    train, val = data.split("train"), data.split("val")
    calibration = calibration_photos([data.root / p for p in train.path], TrainingSettings())
    val_paths, val_targets = [data.root / p for p in val.path], val.label.map(CLASS_NAMES.index).to_numpy()
    batch = Preset.from_config(ModelConfig.load(args.model / "model_config.json")).stack(val_paths[:8])
    print(f"{date.today()} {cpu_name()} ({cpu_units()}), {args.threads} threads, {len(calibration)} calibration photos, "
          f"{len(val_paths)} validation photos; static QDQ, per-channel s8 weights, u8 activations unless named, MinMax")
    print("| recipe | engine | val accuracy | log loss | kept at threshold | labels agree | max prob. diff | images/s (batch 8) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "model"
        shutil.copytree(args.model, work, ignore=shutil.ignore_patterns("model.int8.onnx", "data", "*.ts", "*.pt"))
        for name, options in RECIPES.items():
            quantize_int8(work, calibration, **options)
            report = measure_int8(work, val_paths, val_targets, backends=args.backends)
            f32 = report["f32"]
            for backend in args.backends:
                if name == next(iter(RECIPES)):
                    speed = forward_rate(make_runner(backend, work, threads=args.threads), batch, len(batch))
                    print(f"| f32 | {backend} | {f32['accuracy']:.2%} | {f32['log_loss']:.4f} | {f32.get('open_set_kept', 1):.2%} | | | {speed:.0f} |")
                measured, int8 = report[backend], report[backend]["int8"]
                speed = forward_rate(make_runner(backend, work, threads=args.threads, precision="int8"), batch, len(batch))
                print(f"| {name} | {backend} | {int8['accuracy']:.2%} | {int8['log_loss']:.4f} | {int8.get('open_set_kept', 1):.2%} | "
                      f"{measured['labels_agree']:.2%} | {measured['max_probability_difference']:.3f} | {speed:.0f} |", flush=True)

if __name__ == "__main__": main()
