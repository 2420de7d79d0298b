# %%
#| default_exp metrics

# %% [markdown]
# # Metrics and figures
#
# > How good a model is: accuracy, calibration and the "neither" answer, from probabilities and labels alone, and the figures that show them.

# %% [markdown]
# Training reports these on the test split, `catsdogs_eval` on any folder as the model is
# served, and the benchmarks print them. They take NumPy arrays, so they run without
# PyTorch; scikit-learn computes what it already does well.
#
# - **Classification**: accuracy, precision, recall and F1 of `dog`, ROC AUC, log loss, the
#   confusion matrix, and the expected calibration error (ECE): the confidence-weighted gap
#   between confidence and accuracy over 15 equal-width bins of `reliability`, which the
#   reliability diagram of `save_figures` draws.
# - **Drift**: the population stability index of the served answers against the validation
#   split's (`drift_reference`, `DriftWindow`), which the service exports to Prometheus.
#
# The figures (`save_figures`, `open_set_figures`) take the same arrays and the photos' paths;
# training draws them for its test split, `catsdogs_eval --figures DIR` for any folder (see the
# evaluation notebook).

# %%
#| export
from __future__ import annotations

import bisect
import threading
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from catsdogs.presets import load_image

# %%
#| hide
from fastcore.test import test_eq, test_close
import tempfile
from IPython.display import Image as Figure, display  # here: nbdev runs every cell that imports when it renders the docs
from catsdogs.presets import demo_data_dir


# %%
#| export
def reliability(probs:np.ndarray, # (N, classes) probabilities
                targets:np.ndarray, # (N,) class indices
                n_bins:int=15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    "Per equal-width bin of confidence (the top probability): mean confidence, accuracy, and share of the images."
    confidence, correct = probs.max(1), probs.argmax(1) == targets
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: NaN
        return (np.bincount(bins, confidence, n_bins) / counts, np.bincount(bins, correct, n_bins) / counts, counts / len(bins))

def expected_calibration_error(probs:np.ndarray, targets:np.ndarray, n_bins:int=15) -> float:
    "ECE: the share-weighted gap between confidence and accuracy over the `reliability` bins."
    confidence, accuracy, share = reliability(probs, targets, n_bins)
    filled = share > 0
    return float((share[filled] * np.abs(accuracy[filled] - confidence[filled])).sum())

def classification_metrics(probs:np.ndarray, targets:np.ndarray) -> dict:
    "Accuracy, precision/recall/F1 of `dog`, ROC AUC, log loss, ECE and the confusion matrix."
    from sklearn import metrics as skm
    predicted = probs.argmax(1)
    out = {"accuracy": skm.accuracy_score(targets, predicted),
           "precision": skm.precision_score(targets, predicted, zero_division=0),
           "recall": skm.recall_score(targets, predicted, zero_division=0),
           "f1": skm.f1_score(targets, predicted, zero_division=0),
           "roc_auc": skm.roc_auc_score(targets, probs[:, 1]) if len(set(targets)) == 2 else float("nan"),
           "log_loss": skm.log_loss(targets, np.clip(probs, 1e-7, 1), labels=[0, 1]),
           "ece": expected_calibration_error(probs, targets),
           "n_images": int(len(targets))}
    out = {k: float(v) if k != "n_images" else v for k, v in out.items()}
    out["confusion_matrix"] = skm.confusion_matrix(targets, predicted, labels=[0, 1]).tolist()
    return out


# %%
probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.05, 0.95]]); targets = np.array([0, 1, 1, 1])
m = classification_metrics(probs, targets)
test_eq((m["accuracy"], m["confusion_matrix"]), (0.75, [[1, 0], [1, 2]]))
test_close(expected_calibration_error(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1])), 0.15)
m

# %%
confidence, accuracy, share = reliability(probs, targets)
test_eq(share.sum(), 1.0)
np.c_[np.arange(15) / 15, confidence, accuracy, share][share > 0].round(3)  # bin start, confidence, accuracy, share


# %% [markdown]
# ## The "neither" answer
#
# Open-set quality is measured as in the literature: ROC AUC of `p_cat_or_dog` between cats and
# dogs and outliers, the share of outliers accepted at the thresholds that keep 95% and 99% of
# the cats and dogs (FPR at 95% and 99% TPR), and, at the model's own threshold, the shares of
# outliers refused and of cats and dogs kept.

# %%
#| export
def open_set_metrics(p_pets:np.ndarray, # p_cat_or_dog of photos of cats and dogs
                     p_outliers:np.ndarray, # p_cat_or_dog of photos of neither
                     threshold:float) -> dict: # The model's threshold
    "ROC AUC, FPR at 95% and 99% TPR, and the shares refused and kept at `threshold`."
    from sklearn.metrics import roc_auc_score
    p_pets, p_outliers = np.asarray(p_pets, dtype=np.float64), np.asarray(p_outliers, dtype=np.float64)
    labels = np.r_[np.ones(len(p_pets)), np.zeros(len(p_outliers))]
    return {"ood_roc_auc": float(roc_auc_score(labels, np.r_[p_pets, p_outliers])),
            "ood_fpr_at_95_tpr": float((p_outliers >= np.quantile(p_pets, 0.05)).mean()),
            "ood_fpr_at_99_tpr": float((p_outliers >= np.quantile(p_pets, 0.01)).mean()),
            "ood_refused": float((p_outliers < threshold).mean()),
            "pets_kept": float((p_pets >= threshold).mean()),
            "n_outliers": int(len(p_outliers))}


# %%
rng = np.random.default_rng(0)
m = open_set_metrics(rng.uniform(0.6, 1, 100), rng.uniform(0, 0.7, 100), threshold=0.62)  # 5% of pets and 15% of outliers overlap
assert 0.9 < m["ood_roc_auc"] < 1 and m["ood_refused"] > 0.8 and m["pets_kept"] > 0.9
m

# %% [markdown]
# ## Drift: are the photos people send still like the training set?
#
# A served model meets photos its validation split never showed it: other cameras, other
# animals, screenshots. Its own answers say so first: the share of confident answers falls and
# `p_cat_or_dog` slides down. The service compares the distribution of two of its outputs over
# its recent answers with the same outputs on the validation split, stored in the artifact at
# training time (`drift_reference`):
#
# - `confidence`: the top cat/dog probability (`max(probabilities)`, whatever the answer),
# - `p_cat_or_dog`: the open-set probability.
#
# The statistic is the **population stability index** (PSI) over the reference's deciles:
# `sum((observed - expected) * ln(observed / expected))` over 10 bins that each hold a tenth of
# the validation answers. PSI rather than a Kolmogorov-Smirnov distance, because it is a sum
# over fixed bins: the service keeps ten counts per signal over a sliding window and updates
# them in constant time per answer, the reference is twenty numbers in `model_config.json`,
# and its scale has conventional readings (below 0.1 stable, 0.1 to 0.25 a shift worth a look,
# above 0.25 a different population: the alert rule in `deploy/` fires there). Sampling noise
# alone gives about `(bins - 1) / window`, 0.02 for the default window of 500 answers. Shares
# are smoothed by half a count per bin, so an empty bin does not make it infinite.

# %%
#| export
DRIFT_SIGNALS = ("confidence", "p_cat_or_dog")
DRIFT_BINS = 10

def drift_reference(values:dict[str, np.ndarray], # Per signal: its values on the validation split
                    n_bins:int=DRIFT_BINS) -> dict:
    "The reference of each signal: inner bin edges at its quantiles, and the share of `values` in each bin."
    reference = {}
    for signal, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        edges = np.unique(np.quantile(v, np.linspace(0, 1, n_bins + 1)[1:-1]))  # ties (many answers at 1.0) merge bins
        counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)
        reference[signal] = {"edges": [float(e) for e in edges], "shares": [float(c) for c in (counts + 0.5) / (len(v) + 0.5 * len(counts))]}
    return reference

def population_stability(expected:np.ndarray, # Reference shares per bin
                         counts:np.ndarray) -> float: # Observed counts per bin
    "PSI of observed `counts` against `expected` shares, each observed share smoothed by half a count."
    expected, counts = np.asarray(expected, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    observed = (counts + 0.5) / (counts.sum() + 0.5 * len(counts))
    return float(((observed - expected) * np.log(observed / expected)).sum())


# %% [markdown]
# On made-up validation answers, a window drawn from the same distribution scores near zero
# and one drawn from lower values scores far above 0.25:

# %%
rng = np.random.default_rng(0)
validation = {"confidence": rng.beta(20, 1, 2000), "p_cat_or_dog": rng.beta(8, 2, 2000)}
reference = drift_reference(validation)
def psi_of(signal, values):
    bins = np.searchsorted(reference[signal]["edges"], values, side="right")
    return population_stability(reference[signal]["shares"], np.bincount(bins, minlength=len(reference[signal]["shares"])))
same, shifted = psi_of("p_cat_or_dog", rng.beta(8, 2, 500)), psi_of("p_cat_or_dog", rng.beta(2, 4, 500))
assert same < 0.05 and shifted > 1
test_close(sum(reference["confidence"]["shares"]), 1.0, eps=1e-9)
{"same distribution": round(same, 3), "shifted": round(shifted, 2), "edges": np.round(reference["p_cat_or_dog"]["edges"], 3).tolist()}


# %% [markdown]
# `DriftWindow` is the service's side: the last `size` answers' bins, their counts, and the
# share of "neither" answers among them. The PSI is NaN until the window is full, so an alert on
# it never fires on the first few answers after a start.

# %%
#| export
class DriftWindow:
    "The bins of the last `size` answers of each drift signal, and their PSI against a `drift_reference`."
    def __init__(self, reference:dict, size:int):
        self.reference, self.size, self.lock = reference, size, threading.Lock()
        self.bins = {s: deque() for s in reference}
        self.counts = {s: np.zeros(len(r["shares"]), dtype=np.int64) for s, r in reference.items()}
        self.neither = deque()

    def observe(self, values:dict[str, float|None], # Per signal its value for one answer (None: not measured)
                neither:bool=False): # Whether the answer was "neither"
        "Add one answer to the window, dropping the oldest once it holds `size`."
        with self.lock:
            for signal, value in values.items():
                if signal not in self.reference or value is None: continue
                b, window = bisect.bisect_right(self.reference[signal]["edges"], value), self.bins[signal]  # as searchsorted(side="right")
                window.append(b); self.counts[signal][b] += 1
                if len(window) > self.size: self.counts[signal][window.popleft()] -= 1
            self.neither.append(neither)
            if len(self.neither) > self.size: self.neither.popleft()

    def psi(self, signal:str) -> float:
        "The signal's PSI over the window; NaN until it holds `size` answers."
        with self.lock:
            if len(self.bins[signal]) < self.size: return float("nan")
            counts = self.counts[signal].copy()
        return population_stability(self.reference[signal]["shares"], counts)

    def neither_share(self) -> float:
        "Share of 'neither' answers in the window (NaN while empty)."
        with self.lock: return sum(self.neither) / len(self.neither) if self.neither else float("nan")


# %%
window = DriftWindow(reference, size=200)
test_eq(np.isnan(window.psi("confidence")), True)
for c, p in zip(rng.beta(20, 1, 200), rng.beta(8, 2, 200)): window.observe({"confidence": c, "p_cat_or_dog": p})
calm = window.psi("p_cat_or_dog")
for c, p in zip(rng.beta(3, 2, 200), rng.beta(1, 6, 200)): window.observe({"confidence": c, "p_cat_or_dog": p}, neither=p < 0.3)
assert calm < 0.1 < 0.25 < window.psi("p_cat_or_dog")
{"calm": round(calm, 3), "after 200 other photos": round(window.psi("p_cat_or_dog"), 2), "neither share": window.neither_share()}


# %% [markdown]
# ## Figures
#
# `save_figures` writes the confusion matrix, the ROC curve, the reliability diagram (the bins of
# the ECE), the gallery of the worst mistakes and, given a training history, the training
# curves, as PNGs. Matplotlib and scikit-learn are imported when a figure is drawn, so the
# serving process never loads them.

# %%
#| export
def _plt():
    "pyplot on the Agg backend (files, no display)."
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

def _save(fig, path:Path, **kwargs) -> Path:
    fig.tight_layout(); fig.savefig(path, **kwargs); _plt().close(fig)
    return path

def training_curves(history:list[dict]):
    "Loss (train and validation) and validation accuracy per epoch, from a training history."
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [r["epoch"] for r in history]
    for col in ("train_loss", "val_loss"):
        if all(col in r for r in history): axes[0].plot(epochs, [r[col] for r in history], marker="o", label=col)
    axes[0].set(xlabel="epoch", title="loss"); axes[0].legend()
    if all("val_accuracy" in r for r in history): axes[1].plot(epochs, [r["val_accuracy"] for r in history], marker="o")
    axes[1].set(xlabel="epoch", title="validation accuracy")
    return fig

def reliability_diagram(probs:np.ndarray, targets:np.ndarray):
    "Accuracy per confidence bin (the bins of the ECE) against the diagonal of perfect calibration."
    fig, ax = _plt().subplots(figsize=(3.6, 3.2))
    _, accuracy, share = reliability(probs, targets)
    starts = np.arange(len(share)) / len(share)
    ax.bar(starts[share > 0], accuracy[share > 0], width=1 / len(share), align="edge", edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0.5, 1], [0.5, 1], "k--", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"reliability (ECE {expected_calibration_error(probs, targets):.3f})",
           xlim=(0.45, 1.0), ylim=(0, 1.02)); ax.legend()
    return fig

def worst_mistakes(probs:np.ndarray, targets:np.ndarray, paths:list[Path], class_names:tuple=("cat", "dog"), n_worst:int=12,
                   picture:Callable[[Path], Image.Image]|None=None): # What to draw of a photo (the evaluation draws its heat map); default: the photo
    "The photos given the lowest probability of their true class, with that probability."
    true_prob = probs[np.arange(len(targets)), targets]
    worst = np.argsort(true_prob)[:n_worst]
    fig, axes = _plt().subplots(2, (len(worst) + 1) // 2 or 1, figsize=(12, 4.6), squeeze=False)
    for ax in axes.flat: ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(picture(paths[i]) if picture else load_image(paths[i], draft_size=256))
        ax.set_title(f"{Path(paths[i]).name}\ntrue {class_names[targets[i]]}, P={true_prob[i]:.2f}", fontsize=8)
    return fig

def save_figures(out:Path, # Folder for the PNGs
                 probs:np.ndarray, targets:np.ndarray, paths:list[Path], class_names:tuple=("cat", "dog"),
                 history:list[dict]|None=None, # Per-epoch records of a training run: adds the training curves
                 n_worst:int=12,
                 picture:Callable[[Path], Image.Image]|None=None) -> list[Path]: # What the mistakes gallery draws of a photo
    "Write the evaluation figures to `out`; returns their paths."
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay
    plt, out = _plt(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if history: written.append(_save(training_curves(history), out/"training_curves.png", dpi=90))
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ConfusionMatrixDisplay.from_predictions(targets, probs.argmax(1), labels=[0, 1], display_labels=class_names, ax=ax, colorbar=False)
    written.append(_save(fig, out/"confusion_matrix.png", dpi=90))
    if len(set(targets)) == 2:
        fig, ax = plt.subplots(figsize=(3.6, 3.2))
        RocCurveDisplay.from_predictions(targets, probs[:, 1], ax=ax, name=class_names[1])
        written.append(_save(fig, out/"roc.png", dpi=90))
    written.append(_save(reliability_diagram(probs, targets), out/"reliability.png", dpi=90))
    written.append(_save(worst_mistakes(probs, targets, paths, class_names, n_worst, picture), out/"worst_mistakes.png", dpi=90))
    return written


# %% [markdown]
# The figures of a made-up test split of twelve sample photos with two epochs of history (the
# evaluation notebook draws them for a real model):

# %%
rng = np.random.default_rng(0)
demo_targets = np.array([0, 1] * 6)
demo_p_dog = np.clip(np.where(demo_targets == 1, 0.75, 0.25) + rng.normal(0, 0.2, 12), 0.01, 0.99)
demo_probs = np.c_[1 - demo_p_dog, demo_p_dog]
demo_paths = sorted((demo_data_dir()/"Cat").glob("cat.*.jpg"))[:6] + sorted((demo_data_dir()/"Dog").glob("dog.*.jpg"))[:6]
demo_history = [{"epoch": 1, "train_loss": 0.6, "val_loss": 0.5, "val_accuracy": 0.8},
                {"epoch": 2, "train_loss": 0.4, "val_loss": 0.45, "val_accuracy": 0.85}]
with tempfile.TemporaryDirectory() as tmp:
    written = save_figures(Path(tmp), demo_probs, demo_targets, demo_paths, history=demo_history)
    display(Figure(filename=Path(tmp)/"reliability.png"))
test_eq([p.name for p in written], ["training_curves.png", "confusion_matrix.png", "roc.png", "reliability.png", "worst_mistakes.png"])
[p.name for p in written]

# %% [markdown]
# Each figure is also a function that returns the Matplotlib figure, to show in a notebook:

# %%
fig = worst_mistakes(demo_probs, demo_targets, demo_paths, n_worst=4)
fig.savefig(Path(tempfile.mkdtemp())/"worst.png"); len(fig.axes)

# %%
fig = training_curves(demo_history); [ax.get_title() for ax in fig.axes]

# %%
fig = reliability_diagram(demo_probs, demo_targets); fig.axes[0].get_title()


# %% [markdown]
# `open_set_figures` shows how the open-set score separates cats and dogs from photos of
# neither: the two distributions of `p_cat_or_dog` on a log-odds axis with the threshold, and a
# gallery of the hardest cases on each side (the outliers that score highest, the cats and dogs
# that score lowest). The training notebook draws them for its model, `catsdogs_eval --figures`
# with `--ood-dir`, and `bench_open_set.py` beside the artifact.

# %%
#| export
def _log_odds(p:np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.log(p) - np.log1p(-p)

def open_set_figures(out:Path, # Folder for the PNGs
                     p_pets:np.ndarray, # p_cat_or_dog of photos of cats and dogs
                     p_outliers:np.ndarray, # p_cat_or_dog of photos of neither
                     threshold:float, pet_paths:list[Path], outlier_paths:list[Path], n_gallery:int=6,
                     picture:Callable[[Path], Image.Image]|None=None) -> list[Path]: # What the gallery draws of a photo; default: the photo
    "Write the score histograms (PNG) and the gallery of the hardest outliers and pets (JPEG) to `out`; returns their paths."
    plt, out = _plt(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 2.8))
    pets, outliers = _log_odds(p_pets), _log_odds(p_outliers)
    bins = np.linspace(min(pets.min(), outliers.min()), max(pets.max(), outliers.max()), 60)
    ax.hist(pets, bins, alpha=0.6, density=True, label=f"cats and dogs ({len(pets)})")
    ax.hist(outliers, bins, alpha=0.6, density=True, label=f"neither ({len(outliers)})")
    ax.axvline(_log_odds(threshold), color="k", linestyle="--", label=f"threshold (p = {threshold:.2f})")
    ax.set(xlabel="log-odds of p_cat_or_dog", ylabel="density", title="open-set score"); ax.legend(fontsize=8)
    scores = _save(fig, out/"open_set_scores.png", dpi=72)
    hardest = [(outlier_paths[i], p_outliers[i]) for i in np.argsort(-np.asarray(p_outliers))[:n_gallery]]
    hardest += [(pet_paths[i], p_pets[i]) for i in np.argsort(p_pets)[:n_gallery]]
    fig, axes = plt.subplots(2, n_gallery, figsize=(1.7 * n_gallery, 4), squeeze=False)
    for ax in axes.flat: ax.axis("off")
    for ax, (path, p) in zip(axes.flat, hardest):
        ax.imshow((picture(path) if picture else load_image(path, draft_size=128)).resize((128, 128)))
        ax.set_title(f"{Path(path).parent.name}\np={p:.2f} {'passes' if p >= threshold else 'refused'}", fontsize=7)
    axes[0, 0].text(-0.1, 0.5, "neither,\nhighest", transform=axes[0, 0].transAxes, ha="right", va="center", fontsize=8)
    axes[1, 0].text(-0.1, 0.5, "cats, dogs,\nlowest", transform=axes[1, 0].transAxes, ha="right", va="center", fontsize=8)
    gallery = _save(fig, out/"open_set_gallery.jpg", dpi=72, pil_kwargs={"quality": 80})
    return [scores, gallery]


# %% [markdown]
# Made-up scores for the twelve sample photos as cats and dogs and as outliers:

# %%
with tempfile.TemporaryDirectory() as tmp:
    written = open_set_figures(Path(tmp), np.linspace(0.5, 0.99, 12), np.linspace(0.01, 0.6, 12), 0.55, demo_paths, demo_paths[::-1])
    display(Figure(filename=written[0]))
[p.name for p in written]
