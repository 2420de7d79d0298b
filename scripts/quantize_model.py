"""Write model.int8.onnx for a model artifact and record how it compares with f32 (what `catsdogs_train` does
at the end of training), for an artifact trained without it.

    python scripts/quantize_model.py artifacts/model                     # its prepared data: artifacts/model/data
    python scripts/quantize_model.py artifacts/model --prepared artifacts/data --int8-calibration-images 256
    python scripts/quantize_model.py artifacts/model --export             # export model.onnx and model.ts first

`--export` writes the graphs again from `weights.pt` with the outputs this version of catsdogs exports (the heat
maps among them), for an artifact whose graphs lack them.

Calibrates on training photos of the prepared split the model was trained on, measures int8 against f32 on its
validation split, and stores the figures in model_config.json (`int8`), which `--precision auto` reads."""
import argparse
import sys
from pathlib import Path

from catsdogs.config import TrainingSettings
from catsdogs.data import load_prepared
from catsdogs.engines import quantize_artifact
from catsdogs.presets import CLASS_NAMES, ModelConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model_dir", type=Path, help="The model artifact (a folder written by catsdogs_train)")
parser.add_argument("--prepared", type=Path, help="The prepared data it was trained on (default: MODEL_DIR/data)")
parser.add_argument("--int8-calibration-images", type=int, help="Training photos to calibrate on (default: the setting's)")
parser.add_argument("--export", action="store_true", help="Export model.onnx and model.ts again from weights.pt first")
args = parser.parse_args()
prepared_dir = args.prepared or args.model_dir / "data"
data = load_prepared(prepared_dir) if (prepared_dir / "manifest.csv").is_file() else None
if data is None and ((args.model_dir / "model.int8.onnx").is_file() or not args.export):  # checked before anything changes
    sys.exit(f"quantize_model: no prepared data at {prepared_dir} to calibrate the int8 model on; pass --prepared")
version = ModelConfig.load(args.model_dir / "model_config.json").dataset_version
if data is not None and version and version != data.version:
    sys.exit(f"quantize_model: {prepared_dir} is dataset {data.version[:12]}, the model was trained on {version[:12]}")
if args.export:
    from catsdogs.model import export_artifact, load_model, output_names
    model, model_config = load_model(args.model_dir)
    export_artifact(model, args.model_dir, model_config)
    print(f"{args.model_dir}: graphs exported with the outputs {', '.join(output_names(model_config))}")
    if data is None: sys.exit(0)  # no int8 model to quantize again, and no data to make one
settings = TrainingSettings(**({"int8_calibration_images": args.int8_calibration_images} if args.int8_calibration_images else {}))
train, val = data.split("train"), data.split("val")
config = quantize_artifact(args.model_dir, [data.root / p for p in train.path], [data.root / p for p in val.path],
                           val.label.map(CLASS_NAMES.index).to_numpy(), settings)
report = config.int8
for backend in ("onnx", "openvino"):
    if backend not in report: continue
    int8, f32 = report[backend]["int8"], report["f32"]
    print(f"{args.model_dir}/model.int8.onnx on {backend}: validation accuracy {int8['accuracy']:.2%} (f32 {f32['accuracy']:.2%}), "
          f"log loss {int8['log_loss']:.4f} (f32 {f32['log_loss']:.4f}), labels agree {report[backend]['labels_agree']:.2%}, "
          f"kept at the threshold {int8.get('open_set_kept', 1):.2%} (f32 {f32.get('open_set_kept', 1):.2%})")
print(f"{report['method']}; {report['calibration_images']} calibration photos")
