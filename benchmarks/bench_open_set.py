"""Open-set benchmark: how well a trained model answers "neither", beside the ImageNet-head baseline.

    python benchmarks/bench_open_set.py --model artifacts/model [--prepared artifacts/model/data]
                                        [--ood-dir ../shared/data/not-cats-dogs]

The model is the one the README's default training command makes (`bench_train.py --output
artifacts/model` makes the same). Its cats and dogs are the validation split of the manifest it
was trained on (`--prepared`, default: the `data/` folder that `catsdogs_train --data-dir`
writes beside the artifact) and the test split. The outlier photos are split in two halves by a
hash of each file name: the "design" half is the one the method's choices (signals, k, weights,
Platt scaling) were made on during development; the "held-out" half was never used for any
choice or fit, and the targets are judged on it alone:

- at the artifact's threshold, at most 1% of validation cats and dogs refused;
- at least 97% of held-out outlier photos refused.

The baseline is the issue's: the pretrained EfficientNet-Lite0 at 224 px with no training, the
sum of its 123 cat and dog class probabilities, thresholded to keep 99% of the same validation
cats and dogs. Predictions go through the `Predictor` that serves (same backend and preprocessing).
The score histograms and the gallery of the hardest cases go to MODEL/figures/open_set_*.png."""
import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from catsdogs.data import find_images, load_prepared
from catsdogs.config import InferenceSettings
from catsdogs.inference import Prediction, Predictor, predict_files
from catsdogs.metrics import open_set_figures, open_set_metrics
from catsdogs.model import IMAGENET_PET_CLASSES, _efficientnet_lite0_imagenet, config_for_backbone
from catsdogs.presets import Preset, shared_sample

HERE = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", type=Path, default=HERE / "artifacts/model")
parser.add_argument("--prepared", type=Path, default=None, help="Manifest folder of the model's training data (default: MODEL/data)")
parser.add_argument("--ood-dir", type=Path, default=shared_sample("not-cats-dogs"))
parser.add_argument("--backend", default="auto")
args = parser.parse_args()

predictor = Predictor(args.model, InferenceSettings(backend=args.backend))
if predictor.open_set is None: sys.exit(f"{args.model} has no open-set head: train it with this version of catsdogs")
prepared = load_prepared(args.prepared or args.model / "data")
pets = {split: [prepared.root / p for p in prepared.split(split).path] for split in ("val", "test")}
outliers = sorted(prepared_path for prepared_path in (args.ood_dir / p for p in find_images(args.ood_dir).path)
                  if prepared_path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
half = {p: "design" if int(hashlib.sha256(p.name.encode()).hexdigest(), 16) % 2 == 0 else "held-out" for p in outliers}
print(f"{predictor!r}\nvalidation cats and dogs: {len(pets['val'])}, test: {len(pets['test'])}; outliers: "
      f"{sum(h == 'design' for h in half.values())} design + {sum(h == 'held-out' for h in half.values())} held-out", flush=True)


def open_set_probabilities(paths: list[Path]) -> np.ndarray:
    "p_cat_or_dog of each readable photo, through the served predictor."
    results = predict_files(predictor, [str(p) for p in paths], progress=True, desc="predicting")
    return np.array([r.p_cat_or_dog if isinstance(r, Prediction) else np.nan for r in results])


@torch.no_grad()
def baseline_probabilities(paths: list[Path], image_size: int = 224) -> np.ndarray:
    "The untrained ImageNet head's summed cat and dog probability (EfficientNet-Lite0, 224 px)."
    model = _efficientnet_lite0_imagenet(pretrained=True).eval()
    preset = Preset.from_config(config_for_backbone("efficientnet_lite0", image_size, 0.875))
    out = []
    for start in range(0, len(paths), 32):
        x = torch.from_numpy(np.stack([preset.eval_array(preset.load(p)) for p in paths[start:start + 32]]))
        out.append(model(x).softmax(1)[:, list(IMAGENET_PET_CLASSES)].sum(1).numpy())
    return np.concatenate(out)


ours = {name: open_set_probabilities(paths) for name, paths in (("val", pets["val"]), ("test", pets["test"]), ("outliers", outliers))}
base = {name: baseline_probabilities(paths) for name, paths in (("val", pets["val"]), ("outliers", outliers))}
base_threshold = float(np.quantile(base["val"], 0.01))
in_half = {h: np.array([half[p] == h for p in outliers]) for h in ("design", "held-out")}

print(f"\n== open set (threshold p_cat_or_dog {predictor.threshold:.3f}; baseline threshold {base_threshold:.3f}, "
      "each keeping 99% of validation cats and dogs)")
print(f"{'':34} {'ROC AUC':>8} {'FPR@95':>8} {'FPR@99':>8} {'refused':>8} {'pets kept':>10}")
for h in ("design", "held-out"):
    for name, p_pets, p_out, thr in (("ours", ours["val"], ours["outliers"], predictor.threshold),
                                     ("baseline (ImageNet head, 224 px)", base["val"], base["outliers"], base_threshold)):
        m = open_set_metrics(p_pets, p_out[in_half[h]], thr)
        print(f"{name + ' / ' + h:34} {m['ood_roc_auc']:8.4f} {m['ood_fpr_at_95_tpr']:8.3f} {m['ood_fpr_at_99_tpr']:8.3f} "
              f"{m['ood_refused']:8.3f} {m['pets_kept']:10.3f}")
print("\nrefused by folder (held-out half):")
folders = np.array([p.parent.relative_to(args.ood_dir).as_posix() for p in outliers])
for folder in sorted(set(folders)):
    mask = (folders == folder) & in_half["held-out"]
    print(f"  {folder:28} ours {(ours['outliers'][mask] < predictor.threshold).mean():.3f}   "
          f"baseline {(base['outliers'][mask] < base_threshold).mean():.3f}   ({mask.sum()} photos)")

val_refused = float((ours["val"] < predictor.threshold).mean())
held_refused = float((ours["outliers"][in_half["held-out"]] < predictor.threshold).mean())
test_kept = float((ours["test"] >= predictor.threshold).mean())
metrics = predictor.config.metrics
print(f"\nvalidation cats and dogs refused: {val_refused:.3%} (target <= 1%: {'met' if val_refused <= 0.01 else 'NOT met'})")
print(f"held-out outliers refused: {held_refused:.3%} (target >= 97%: {'met' if held_refused >= 0.97 else 'NOT met'})")
print(f"test cats and dogs kept: {test_kept:.3%}; test accuracy {metrics['accuracy']:.4f}, log loss {metrics['log_loss']:.4f}, "
      f"ECE {metrics['ece']:.4f} (from model_config.json)")
figures = open_set_figures(args.model / "figures", ours["val"], ours["outliers"], predictor.threshold, pets["val"], outliers)
print("figures: " + ", ".join(str(f) for f in figures))
