# %%
#| default_exp evaluation

# %% [markdown]
# # Evaluation
#
# > How good a model artifact is, measured as it is served: metrics, calibration, figures, the mistakes gallery, and `catsdogs_eval`.

# %% [markdown]
# Evaluation goes through the same `Predictor` as serving, so it measures the backend, the
# preprocessing, the temperature and the "neither" threshold that are served, not the PyTorch
# model they came from. `predict_labelled` predicts every labelled photo under a folder (in
# batches, with a progress bar); `evaluate_folder` turns that into the metrics of the training
# stage (`catsdogs.metrics`: accuracy, precision, recall, F1, ROC AUC, log loss, ECE, confusion
# matrix) and, with `ood_dir`, a folder of photos that show neither (any layout), the open-set
# metrics: ROC AUC, FPR at 95% and 99% TPR, the share of those photos refused and the share of
# cats and dogs kept at the threshold. Unreadable files are counted, never fatal. With
# `figures`, it also draws the confusion matrix, ROC curve, reliability diagram, the gallery of
# the worst mistakes and, with `ood_dir`, the open-set figures.
#
# Like inference, this module needs no PyTorch: `pip install "catsdogs[serve]"` evaluates.

# %%
#| export
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from catsdogs.config import MODEL_SOURCE, EvaluationSettings, InferenceSettings, parse_settings, settings_parser
from catsdogs.inference import Prediction, Predictor, heat_picture, predict_files
from catsdogs.metrics import classification_metrics, open_set_figures, open_set_metrics, save_figures
from catsdogs.presets import list_images, load_image

# %%
#| hide
from fastcore.test import test_eq, test_fail
import contextlib, io, tempfile, warnings
from IPython.display import Image as Figure, display  # here: nbdev runs every cell that imports when it renders the docs
from PIL import Image
from catsdogs.config import Settings
from catsdogs.data import load_prepared
from catsdogs.presets import demo_data_dir
from catsdogs.training import train

# %% [markdown]
# The examples evaluate a real model: EfficientNet-Lite0 with its ImageNet weights, its head
# trained for three epochs on the image sample at 128 px (about a minute on two CPU cores), on
# the sample's test split, which it never saw. The default model (288 px, fine-tuned on the
# whole PetImages set) is measured in the README's benchmarks.

# %%
tmp = tempfile.TemporaryDirectory()
with contextlib.redirect_stdout(io.StringIO()):
    trained = train(Settings(data_dir=demo_data_dir(), model_dir=Path(tmp.name)/"model", image_size=128, epochs=3, freeze_epochs=3,
                             num_workers=1), mlflow=False, progress=False)
test_split = Path(tmp.name)/"test"  # the test split as a folder of links, one subfolder per class
for path, label in load_prepared(trained.model_dir/"data").split("test")[["path", "label"]].itertuples(index=False):
    (test_split/label).mkdir(parents=True, exist_ok=True)
    (test_split/label/Path(path).name).symlink_to(demo_data_dir()/path)
predictor = Predictor(trained.model_dir)
predictor, sum(1 for _ in test_split.rglob("*.jpg"))


# %% [markdown]
# ## Predictions of a labelled folder

# %%
#| export
@dataclass
class LabelledPredictions:
    "What a predictor answered for each readable labelled photo under a folder."
    paths: list[Path]
    targets: np.ndarray # (N,) class indices, in the model's class order
    probs: np.ndarray # (N, classes) calibrated probabilities, given a cat or a dog
    p_cat_or_dog: np.ndarray|None # (N,) open-set probability; None without the open set
    n_skipped: int # unreadable files

def _p_cat_or_dog(results:list) -> np.ndarray:
    "p_cat_or_dog of the results that are predictions."
    return np.array([r.p_cat_or_dog for r in results if isinstance(r, Prediction)], dtype=np.float64)

def predict_labelled(predictor:Predictor, # What is evaluated, as it is served
                     data_dir:Path, # One subfolder per class (or Kaggle-style names)
                     batch_size:int=16, progress:bool=True) -> LabelledPredictions:
    "Predict every labelled photo under `data_dir`; unreadable ones are counted and left out."
    names = tuple(predictor.config.class_names)
    files = [(Path(data_dir)/path, label) for path, label in list_images(data_dir, names) if label is not None]
    results = predict_files(predictor, [path for path, _ in files], batch_size, progress, "cats and dogs")
    answered = [(r, path, names.index(label)) for r, (path, label) in zip(results, files) if isinstance(r, Prediction)]
    if not answered: raise ValueError(f"no readable labelled images under {data_dir}")
    probs = np.array([[r.probabilities[c] for c in names] for r, _, _ in answered])
    p_cat_or_dog = _p_cat_or_dog(results) if predictor.open_set is not None else None
    return LabelledPredictions([p for _, p, _ in answered], np.array([t for _, _, t in answered]), probs, p_cat_or_dog,
                               len(results) - len(answered))


# %%
labelled = predict_labelled(predictor, test_split, progress=False)
test_eq((type(labelled), labelled.probs.shape, labelled.n_skipped), (LabelledPredictions, (len(labelled.paths), 2), 0))
f"{(labelled.probs.argmax(1) == labelled.targets).mean():.1%} of {len(labelled.paths)} test photos right"


# %% [markdown]
# ## Metrics, and the figures
#
# The galleries (the worst mistakes, the photos of neither that came closest to passing and the
# cats and dogs that came closest to "neither") show each photo with its heat map blended in,
# where the artifact has heat maps: what made the model give the answer it gave, the wrong one
# included (see the inference notebook for how to read them). `explained_picture` draws one.

# %%
#| export
def explained_picture(predictor:Predictor, # The predictor whose answer is explained
                      draft_size:int=256) -> Callable[[Path], Image.Image]|None: # Decode photos at about this size
    "A function drawing a photo with the heat map of `predictor`'s answer (`heat_picture`), or None when it has no heat maps."
    if not predictor.heat_maps: return None
    def picture(path:Path) -> Image.Image:
        answer = predictor.predict_batch([path], explain=True)[0]
        photo = load_image(path, draft_size=draft_size)
        return photo if isinstance(answer, Exception) else heat_picture(photo, answer.explanation, predictor.settings.heat_map_opacity)
    return picture

def evaluate_folder(predictor:Predictor, # What is evaluated, as it is served
                    data_dir:Path, # One subfolder per class (or Kaggle-style names)
                    ood_dir:Path|None=None, # Photos of neither cats nor dogs, any layout
                    batch_size:int=16, progress:bool=True,
                    figures:Path|None=None) -> dict: # Folder for the figures; None: no figures
    "Metrics of `predictor` on the labelled images under `data_dir` and, with `ood_dir`, open-set metrics."
    if ood_dir is not None and predictor.open_set is None:
        raise ValueError("--ood-dir needs the open set: the model has no open-set head, or it is turned off")
    labelled = predict_labelled(predictor, data_dir, batch_size, progress)
    names = tuple(predictor.config.class_names)
    metrics = {**classification_metrics(labelled.probs, labelled.targets), "n_skipped": labelled.n_skipped}
    picture = explained_picture(predictor) if figures is not None else None
    if figures is not None: save_figures(figures, labelled.probs, labelled.targets, labelled.paths, names, picture=picture)
    if predictor.open_set is None: return metrics
    kept = labelled.p_cat_or_dog >= predictor.threshold
    correct = labelled.probs.argmax(1) == labelled.targets
    metrics.update(open_set_threshold=float(predictor.threshold), open_set_kept=float(kept.mean()),
                   accuracy_kept=float(correct[kept].mean()) if kept.any() else float("nan"))
    if ood_dir is None: return metrics
    outliers = [Path(ood_dir)/p for p, _ in list_images(ood_dir, names)]
    results = predict_files(predictor, outliers, batch_size, progress, "neither")
    p_outliers = _p_cat_or_dog(results)
    if not len(p_outliers): raise ValueError(f"no readable images under {ood_dir}")
    metrics.update(open_set_metrics(labelled.p_cat_or_dog, p_outliers, predictor.threshold))
    metrics["n_outliers_skipped"] = len(outliers) - len(p_outliers)
    if figures is not None:
        readable = [p for p, r in zip(outliers, results) if isinstance(r, Prediction)]
        open_set_figures(figures, labelled.p_cat_or_dog, p_outliers, predictor.threshold, labelled.paths, readable, picture=picture)
    return metrics


# %% [markdown]
# The test split of the sample, and as photos of neither, a few of the sample of other things
# beside it when it is there (ImageNet objects and animals, no cats or dogs), else made-up
# patterns. The calibration bins (the reliability diagram) and the worst mistakes, each with the
# heat map of the answer it got, come with it:

# %%
outlier_sample = demo_data_dir().parent/"not-cats-dogs"
neither = Path(tmp.name)/"neither"; neither.mkdir()
if outlier_sample.is_dir():
    for p in sorted(outlier_sample.rglob("*.jpg"))[::20]: (neither/f"{p.parent.name}-{p.name}").symlink_to(p)
else:
    rng = np.random.default_rng(0)
    for i in range(8): Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(neither/f"noise{i}.jpg")
figures = Path(tmp.name)/"figures"
metrics = evaluate_folder(predictor, test_split, neither, progress=False, figures=figures)
assert metrics["accuracy"] > 0.8, "a real model, well above chance"
display(Figure(filename=figures/"reliability.png"), Figure(filename=figures/"worst_mistakes.png"))
{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}

# %% [markdown]
# The open-set figures: `p_cat_or_dog` of the test cats and dogs and of the photos of neither,
# and the hardest of each:

# %%
display(Figure(filename=figures/"open_set_scores.png"), Figure(filename=figures/"open_set_gallery.jpg"))
sorted(p.name for p in figures.iterdir())

# %% [markdown]
# ## Reading a heat map
#
# `explained_picture` draws what the galleries show: a photo with the heat of the answer it got.
# Below, the three test photos the model got most surely right, then its three worst mistakes.
# The heat is the evidence *for the answer given*, relative to the strongest cell: on a right
# answer it should sit on the animal (a face, fur, ears), and on a mistake it shows what misled
# the model, something other than the animal (a person, a cage, a toy) or the part of the
# animal that looks like the other class. Evidence against the answer is not drawn; the grid in
# `Explanation.grid` has it, as negative cells. The model here is small and quickly trained
# (128 px, head only), so its grid is 4x4 cells of 32 pixels and its heat follows the animal
# only roughly; the default 288 px model has 9x9 cells (the README shows some).

# %%
picture = explained_picture(predictor)
true_prob = labelled.probs[np.arange(len(labelled.targets)), labelled.targets]
chosen = [labelled.paths[i] for i in [*np.argsort(-true_prob)[:3], *np.argsort(true_prob)[:3]]]
drawn = [picture(path) for path in chosen]
test_eq([d.size for d in drawn], [load_image(p, draft_size=256).size for p in chosen])
row = Image.new("RGB", (sum(round(d.width * 160 / d.height) for d in drawn) + 40, 160), "white")
x = 0
for i, d in enumerate(drawn):
    row.paste(d.resize((round(d.width * 160 / d.height), 160)), (x, 0)); x += round(d.width * 160 / d.height) + (40 if i == 2 else 0)
row  # the three surest right answers, a gap, then the three worst mistakes

# %% [markdown]
# Without the open set (`--no-open-set`), the same folder gets the classification metrics
# alone, and asking for outliers is a clear error:

# %%
closed = Predictor(trained.model_dir, InferenceSettings(open_set=False))
test_fail(lambda: evaluate_folder(closed, test_split, neither, progress=False), contains="--ood-dir needs the open set")
sorted(evaluate_folder(closed, test_split, progress=False))


# %% [markdown]
# ## `catsdogs_eval`
#
# It prints the metrics, and with `--json` ends with one line of JSON holding them all; with
# `--figures DIR` it writes the figures there.

# %%
#| export
def eval_cli(argv:list[str]|None=None):
    "Console script `catsdogs_eval`: metrics of a model artifact, as served, on a labelled folder (and outliers)."
    parser = settings_parser("Evaluate a model artifact on a folder with one subfolder per class and, with --ood-dir, "
                             "on photos that show neither.",
                             [InferenceSettings, EvaluationSettings, "data_dir", *MODEL_SOURCE, "max_image_pixels"],
                             aliases={"--model": "model_dir"})
    parser.add_argument("--batch-size", type=int, default=16, help="Images per forward pass")
    parser.add_argument("--figures", type=Path, default=None, help="Write the figures here: confusion, ROC, reliability, and galleries of the mistakes and of the doubtful 'neither' answers with their heat maps")
    parser.add_argument("--json", action="store_true", help="End with one line of JSON holding every metric")
    settings, args = parse_settings(parser, argv)
    if settings.data_dir is None: parser.error("--data-dir is required: a folder of labelled cat and dog photos")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try: predictor = Predictor.from_settings(settings)
    except (OSError, ValueError, RuntimeError) as e: parser.exit(2, f"catsdogs_eval: cannot load the model: {e}\n")
    try: metrics = evaluate_folder(predictor, settings.data_dir, settings.ood_dir, args.batch_size, progress=sys.stderr.isatty(), figures=args.figures)
    except (OSError, ValueError) as e: parser.exit(2, f"catsdogs_eval: {e}\n")
    print(f"{metrics['n_images']} images evaluated with {predictor!r}, {metrics['n_skipped']} unreadable skipped")
    for k, v in metrics.items():
        if isinstance(v, float): print(f"{k:>18}: {v:.4f}")
    print(f"confusion matrix (rows true cat/dog): {metrics['confusion_matrix']}")
    if args.figures: print(f"figures: {args.figures}")
    if args.json: print(json.dumps(metrics))


# %%
with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(io.StringIO()):
    eval_cli(["--model", str(trained.model_dir), "--data-dir", str(test_split), "--backend", "onnx", "--json"])
test_eq(json.loads(stdout.getvalue().splitlines()[-1])["n_images"], len(labelled.paths))
print("\n".join(stdout.getvalue().splitlines()[:-1]))

# %%
tmp.cleanup()
