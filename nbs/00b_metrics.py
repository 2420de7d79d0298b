# %%
#| default_exp metrics

# %% [markdown]
# # Metrics
#
# > How good a model is: accuracy, calibration and the "neither" answer, from probabilities and labels alone.

# %% [markdown]
# Training reports these on the test split, `catsdogs_eval` on any folder as the model is
# served, and the benchmarks print them. They take NumPy arrays, so they run without
# PyTorch; scikit-learn computes what it already does well.
#
# - **Classification**: accuracy, precision, recall and F1 of `dog`, ROC AUC, log loss, the
#   confusion matrix, and the expected calibration error (ECE): the confidence-weighted gap
#   between confidence and accuracy over 15 equal-width bins of `reliability`, which the
#   training notebook's reliability diagram draws.

# %%
#| export
from __future__ import annotations

import numpy as np

# %%
#| hide
from fastcore.test import test_eq, test_close


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
