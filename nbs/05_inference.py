# %%
#| default_exp inference

# %% [markdown]
# # Inference
#
# > A `Predictor` that loads a model artifact with the fastest engine that agrees with the reference on real photos, answers "cat", "dog" or "neither", and `catsdogs_predict` on top of it; no PyTorch needed.

# %% [markdown]
# The predictor is what the CLI, the HTTP service and the benchmarks share. It
#
# 1. reads the artifact written by `export_artifact` (`model_config.json`, `weights.pt`,
#    `model.ts`, `model.onnx`, and `check_images/`, a few real validation photos);
# 2. runs it on one **engine** from `catsdogs.engines` (ONNX Runtime or OpenVINO in f32, bf16
#    or int8, or PyTorch): with `auto`, the fastest on this machine that agrees with the
#    reference on the artifact's check photos (see the engines notebook);
# 3. turns bytes into a model input with the artifact's own `Preset` (`catsdogs.presets`), the
#    preprocessing training used: nothing about image size or normalisation is typed here;
# 4. applies the stored softmax temperature and, optionally, flip test-time augmentation;
# 5. turns the open-set score into `p_cat_or_dog` and answers `"neither"` below the artifact's
#    threshold (or `open_set_threshold`), unless `open_set` is off.
#
# Nothing in this module imports PyTorch unless the `eager` or `torchscript` backend is asked
# for, so `pip install "catsdogs[serve]"` (ONNX Runtime and OpenVINO, no PyTorch) is enough to
# predict, evaluate and serve.

# %%
#| export
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from catsdogs.config import MODEL_SOURCE, DataSettings, InferenceSettings, ModelSettings, Settings, parse_settings, settings_parser
from catsdogs.engines import default_threads, load_engine, softmax
from catsdogs.presets import CLASS_NAMES, NEITHER, ImageError, ModelConfig, OpenSetConfig, Preset, load_image

# %%
#| hide
import contextlib, io
import mlflow
from IPython.display import display
from nbdev.showdoc import show_doc
import torch
from fastcore.test import test_eq, test_fail, test_close
from catsdogs.engines import BACKENDS, PRECISIONS, TOLERANCES
from catsdogs.presets import demo_data_dir
from catsdogs.model import demo_artifact

# %%
#| hide
logging.getLogger("mlflow").setLevel(logging.WARNING)  # MLflow's notes on creating a store are not this page's output
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # nor its download progress bars

# %%
#| export
logger = logging.getLogger("catsdogs.inference")

# %% [markdown]
# Examples run on a small untrained artifact in a temporary folder, its open-set head fitted on
# a few sample photos (its predictions are meaningless, but every backend must still agree
# with the reference), and on the image sample.

# %%
tmp = tempfile.TemporaryDirectory()
data_dir = demo_data_dir()
cat_jpg, dog_jpg = sorted((data_dir/"Cat").glob("cat.*.jpg"))[0], sorted((data_dir/"Dog").glob("dog.*.jpg"))[0]
photos = sorted((data_dir/"Cat").glob("cat.*.jpg"))[:12] + sorted((data_dir/"Dog").glob("dog.*.jpg"))[:12]
artifact = demo_artifact(Path(tmp.name)/"model", "small_cnn", 96, check_images=photos[::3], open_set_photos=photos)
config = ModelConfig.load(artifact/"model_config.json")
preset = Preset.from_config(config)
sorted(p.name for p in artifact.iterdir())


# %% [markdown]
# ## One prediction

# %%
#| export
@dataclass
class Explanation:
    "Where an answer comes from: each cell's evidence for `label`, on a grid over the part of the photo the model saw."
    label: str # The answer it explains
    grid: list[list[float]] # Rows top to bottom; each cell's evidence for `label`, in log-odds: positive speaks for it
    box: tuple[float, float, float, float] # The region of the photo the grid covers: left, top, right, bottom, as fractions of its sides
    size: tuple[int, int] # The photo's width and height in pixels
    pet_grid: list[list[float]]|None = None # Each cell's evidence that the photo shows a cat or a dog at all, in log-odds; None: closed set

@dataclass
class Prediction:
    "The answer for one image: the label, its probability, every class's probability given a cat or dog, P(dog), P(cat or dog)."
    label: str # "cat", "dog", or "neither" when the photo does not look like a cat or a dog
    confidence: float # The probability of `label`: P(class | cat or dog), or 1 - p_cat_or_dog for "neither"
    probabilities: dict[str, float] # Each class's probability, given that the photo shows one of them
    p_dog: float
    p_cat_or_dog: float|None = None # Probability that the photo shows a cat or a dog at all; None: closed set
    explanation: Explanation|None = None # Where the answer comes from, when asked for (`predict_batch(explain=True)`)
    views_agree: bool|None = None # Under flip TTA: whether the photo and its mirror got the same answer; None: no TTA

    def to_dict(self) -> dict: return asdict(self)

def to_predictions(probs:np.ndarray, # (N, classes) probabilities
                   class_names:Sequence[str]=CLASS_NAMES,
                   p_cat_or_dog:np.ndarray|None=None, # (N,) open-set probabilities; None: closed set
                   threshold:float=0.5) -> list[Prediction]: # "neither" below this p_cat_or_dog
    "One `Prediction` per row of `probs`; the last class is the positive one (`dog`)."
    out = []
    for i, row in enumerate(np.asarray(probs, dtype=np.float64)):
        best = int(row.argmax())
        label, confidence = class_names[best], float(row[best])
        p_any = None if p_cat_or_dog is None else float(p_cat_or_dog[i])
        if p_any is not None and p_any < threshold: label, confidence = NEITHER, 1 - p_any
        out.append(Prediction(label, confidence, {c: float(p) for c, p in zip(class_names, row)}, float(row[-1]), p_any))
    return out



# %% [markdown]
# A temperature above 1 (fitted on the validation set during training) softens over-confident logits:

# %%
preds = to_predictions(softmax(np.array([[0.0, 2.0], [3.0, 0.0]]), temperature=2.0))
test_eq([p.label for p in preds], ["dog", "cat"])
test_close(preds[0].p_dog, 1/(1 + np.exp(-1)), eps=1e-9)
test_close(preds[1].probabilities["cat"] + preds[1].probabilities["dog"], 1.0, eps=1e-9)
test_eq(isinstance(preds[0], Prediction), True)
preds[0].to_dict()

# %% [markdown]
# With the open-set probability, a photo below the threshold is `"neither"`, and its
# confidence is the probability that it is neither; `probabilities` and `p_dog` still say
# which of the two it would be:

# %%
preds = to_predictions(softmax(np.array([[0.0, 2.0], [3.0, 0.0]])), p_cat_or_dog=np.array([0.98, 0.1]), threshold=0.6)
test_eq([p.label for p in preds], ["dog", "neither"])
test_close(preds[1].confidence, 0.9, eps=1e-9)
preds[1]

# %% [markdown]
# ## Evidence, cell by cell
#
# The exported graph's last output, `maps`, holds each class's logit cell by cell and the
# open-set score cell by cell (see the model notebook). `evidence_grids` turns them into the
# evidence for each answer, in the units the answer is decided in, log-odds:
#
# - for "cat" (or "dog"): the class's logit minus the other's, over the temperature (the
#   log-odds of cat against dog), plus, with the open-set head, the cell's log-odds of "cat or
#   dog at all" measured from the "neither" threshold, `slope * score + offset - logit(threshold)`:
#   positive where the cell pushes the photo above the threshold;
# - for "neither": minus that last one.
#
# Without TTA, the grid's mean is `logit(confidence) + logit(p_cat_or_dog) - logit(threshold)`
# for "cat" and "dog" (the margins of the two decisions that lead to the answer), and
# `logit(threshold) - logit(p_cat_or_dog)` for "neither". A positive cell speaks for the
# answer, a negative one against it; cells are 32 pixels of the model's 288 px input.

# %%
#| export
NO_HEAT_MAPS = ("{model_dir} has no heat maps: its graphs were exported without the `maps` output; "
                "export them again with: python scripts/quantize_model.py {model_dir} --export")

def _logit(p:float) -> float: return float(np.log(p) - np.log1p(-p))

def evidence_grids(maps:np.ndarray, # The graph's `maps` `(N, classes (+1 with the open-set head), h, w)`
                   labels:Sequence[str], # The answers to explain
                   temperature:float=1.0,
                   open_set:OpenSetConfig|None=None, # The fitted open-set head; None: closed set
                   threshold:float|None=None, # The "neither" threshold on p_cat_or_dog (default: the head's)
                   class_names:Sequence[str]=CLASS_NAMES) -> tuple[np.ndarray, np.ndarray|None]:
    "Each answer's evidence for its label `(N, h, w)`, and for \"cat or dog\" against \"neither\" (None when closed set), in log-odds per cell."
    maps = np.asarray(maps, dtype=np.float64)
    logits = maps[:, :len(class_names)] / temperature
    pet = None
    if open_set is not None:
        margin = _logit(min(max(open_set.threshold if threshold is None else threshold, 1e-9), 1 - 1e-9))
        pet = open_set.slope * maps[:, len(class_names)] + open_set.offset - margin
    grids = []
    for i, label in enumerate(labels):
        if label == NEITHER: grids.append(-pet[i]); continue
        k = class_names.index(label)
        against = np.delete(logits[i], k, axis=0).max(0)  # two classes: the other one
        grids.append(logits[i, k] - against + (0 if pet is None else pet[i]))
    return np.stack(grids), pet

def _rounded(grid:np.ndarray) -> list[list[float]]:
    "A grid as nested lists of floats with 4 decimals (JSON-sized)."
    return np.round(grid, 4).tolist()


# %% [markdown]
# On made-up maps of a 2x2 grid: the cat's logit is high on the left, and the open-set score is
# high there too, so the evidence for "cat" sits on the left; the mean of the grid is the log-odds
# of cat against dog plus the margin of "cat or dog" over the threshold (here 0.5, margin 0).

# %%
made_up = np.zeros((1, 3, 2, 2)); made_up[0, 0, :, 0] = 4.0; made_up[0, 2, :, 0] = 1.0
made_up_open_set = OpenSetConfig(threshold=0.5, k=1, bank_size=1, slope=3.0, offset=1.0, keep_rate=0.99, val_kept=1.0)
grid, pet_grid = evidence_grids(made_up, ["cat"], open_set=made_up_open_set)
test_eq(grid[0].tolist(), [[8.0, 1.0], [8.0, 1.0]])
test_close(grid[0].mean(), (4.0 / 2) + (3.0 * 0.5 + 1.0), eps=1e-9)  # mean logit difference + mean pet log-odds
test_close(evidence_grids(made_up, ["cat"], open_set=made_up_open_set, threshold=0.25)[0][0], grid[0] + np.log(3), eps=1e-9)
test_eq(evidence_grids(made_up, ["neither"], open_set=made_up_open_set)[0][0].tolist(), (-pet_grid[0]).tolist())
grid[0]


# %% [markdown]
# ## The predictor

# %%
#| export
class Predictor:
    "A model artifact ready to predict: its engine, preprocessing, temperature, open-set threshold and optional flip TTA."
    def __init__(self, model_dir:Path, # Artifact directory written by `export_artifact`
                 settings:InferenceSettings|None=None, # Engine, precision, threads, TTA, open set (default: from the environment)
                 max_pixels:int|None=None): # Refuse larger images before decoding (the `max_image_pixels` setting)
        self.model_dir, self.settings, self.max_pixels = Path(model_dir), settings or InferenceSettings(), max_pixels
        self.config = check_artifact(self.model_dir)
        self.threads = default_threads(self.settings.threads)
        self.open_set = self.config.open_set if self.settings.open_set else None
        self.threshold = self.settings.open_set_threshold if self.settings.open_set_threshold is not None else getattr(self.open_set, "threshold", None)
        self.preset = Preset.from_config(self.config)
        self.registry: dict|None = None  # name, version, alias and run when loaded from the MLflow registry
        self.model_version = hashlib.sha256((self.model_dir/"model_config.json").read_bytes()
                                            + (self.model_dir/"weights.pt").read_bytes()).hexdigest()[:12]
        self.run = load_engine(self.model_dir, self.config, self.settings)
        self.heat_maps = self.config.heat_maps  # whether answers can be explained (false once the engine shows no maps output)
        self.decoder = ThreadPoolExecutor(self.threads, thread_name_prefix="catsdogs-decode")  # threads start on first use

    @classmethod
    def from_settings(cls, settings:Settings|None=None) -> Predictor:
        "A predictor configured by `Settings`: `model_dir` (a folder or a `models:/` URI), the inference section, `max_image_pixels`."
        s = settings or Settings()
        model_dir, registry = resolve_model(s.model_dir, s.mlflow_tracking_uri, s.cache_dir)
        predictor = cls(model_dir, s, s.max_image_pixels)  # `Settings` is an `InferenceSettings` with the other sections beside
        predictor.registry = registry
        return predictor

    backend = property(lambda self: self.run.backend, doc="The engine's backend, e.g. `onnx`")
    precision = property(lambda self: self.run.precision, doc="The engine's precision: `f32`, `bf16` or `int8`")
    timings = property(lambda self: self.run.timings, doc="What `auto` measured of each agreeing engine (ms); empty when named")
    tta = property(lambda self: self.settings.tta, doc="Whether the mirror image's answer is averaged in")

    def __repr__(self):
        open_set = f"neither below p={self.threshold:.3f}" if self.open_set else "closed set"
        return (f"Predictor({self.config.architecture}, engine={self.run.name}, tta={self.tta}, {open_set}, "
                f"version={self.model_version})")

    def preprocess(self, source:Path|str|bytes,
                   max_pixels:int|None=None) -> np.ndarray: # Overrides the predictor's own limit
        "Decode `source` (path or bytes) with the artifact's preset: a `(3, H, W)` float32 array, or `ImageError`."
        return self._prepare(source, max_pixels)[0]

    def _prepare(self, source:Path|str|bytes, max_pixels:int|None=None) -> tuple[np.ndarray, tuple]:
        "The model input of `source`, and where it lies in the photo: `(photo size, eval box)`."
        img = self.preset.load(source, max_pixels=max_pixels or self.max_pixels)
        return self.preset.eval_array(img), (img.info.get("original_size", img.size), self.preset.eval_box(img.size))

    def _forward(self, batch:np.ndarray) -> tuple[np.ndarray, np.ndarray|None, np.ndarray|None, np.ndarray|None]:
        "Probabilities, the open-set score (None: closed set), the heat maps (None: none in the graph), averaged with the mirror under TTA, and whether the mirror's answer agreed (None: no TTA)."
        x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
        n = len(x)
        if self.tta: x = np.ascontiguousarray(np.concatenate([x, x[..., ::-1]]))
        outputs = self.run(x)
        probs = softmax(outputs[0], self.config.temperature)
        score = outputs[1] if self.open_set is not None and self.config.open_set is not None else None
        maps = outputs[-1] if self.heat_maps else None
        if maps is not None and len(outputs) != 2 + (self.config.open_set is not None):  # an engine file without the maps
            logger.warning("%s has no maps output: answers come without heat maps", self.run.name)
            self.heat_maps, maps = False, None
        agree = None
        if self.tta:  # probabilities averaged, the open-set score too (before the sigmoid, the scale its threshold was set on)
            agree = probs[:n].argmax(1) == probs[n:].argmax(1)
            if score is not None and self.threshold is not None:
                kept = self.open_set.probability(score) >= self.threshold
                agree &= kept[:n] == kept[n:]
            probs = (probs[:n] + probs[n:]) / 2
            if score is not None: score = (score[:n] + score[n:]) / 2
            if maps is not None: maps = (maps[:n] + maps[n:, ..., ::-1]) / 2  # the mirror's maps, mirrored back
        return probs, score, maps, agree

    def scores(self, batch:np.ndarray) -> tuple[np.ndarray, np.ndarray|None]:
        "Calibrated class probabilities `(N, classes)` and `p_cat_or_dog` `(N,)` (None when closed-set), averaged with the mirror under TTA."
        probs, score, _, _ = self._forward(batch)
        return probs, None if score is None else self.open_set.probability(score)

    def probabilities(self, batch:np.ndarray) -> np.ndarray:
        "Calibrated class probabilities `(N, classes)` for a preprocessed batch, averaged with the mirror image under TTA."
        return self.scores(batch)[0]

    def predict_arrays(self, batch:np.ndarray,
                       places:Sequence[tuple]|None=None, # Each image's (photo size, eval box): explain the answers
                       ) -> list[Prediction]:
        "One `Prediction` per preprocessed image in `batch` (`(N, 3, H, W)` float32): the forward pass and the answers."
        probs, score, maps, agree = self._forward(batch)
        p_any = None if score is None else self.open_set.probability(score)
        answers = to_predictions(probs, self.config.class_names, p_any, self.threshold if self.threshold is not None else 0.5)
        if agree is not None:
            for answer, same in zip(answers, agree): answer.views_agree = bool(same)
        if places is not None and maps is not None:
            grids, pet_grids = evidence_grids(maps, [a.label for a in answers], self.config.temperature,
                                              self.open_set if score is not None else None, self.threshold)
            for i, (answer, (size, box)) in enumerate(zip(answers, places)):
                answer.explanation = Explanation(answer.label, _rounded(grids[i]), tuple(round(b, 5) for b in box), tuple(size),
                                                 None if pet_grids is None else _rounded(pet_grids[i]))
        return answers

    def predict_batch(self, sources:Sequence[Path|str|bytes], # Files or their bytes
                      batch_size:int=32, # Most images per forward pass
                      max_pixels:int|None=None, # Overrides the predictor's own limit
                      on_forward:Callable[[int, float], None]|None=None, # Told each forward pass's size and seconds
                      explain:bool|Sequence[bool]=False, # Add an `Explanation` to the answers (all, or one flag per source)
                      ) -> list[Prediction|Exception]:
        "A `Prediction` for each source, or the error (`ImageError` for unusable images) in its place; the next batch decodes while one runs."
        flags = [explain] * len(sources) if isinstance(explain, bool) else list(explain)
        if any(flags) and not self.heat_maps: raise ValueError(NO_HEAT_MAPS.format(model_dir=self.model_dir))
        chunks = [range(i, min(i + batch_size, len(sources))) for i in range(0, len(sources), batch_size)]
        results: list = []
        pending = self._decode([sources[j] for j in chunks[0]], max_pixels) if chunks else None
        for i, chunk in enumerate(chunks):
            decoded = list(pending)
            if i + 1 < len(chunks): pending = self._decode([sources[j] for j in chunks[i + 1]], max_pixels)  # decodes during this pass
            good = [(x, flags[j]) for x, j in zip(decoded, chunk) if not isinstance(x, Exception)]
            start = time.perf_counter()
            answers = iter(self.predict_arrays(np.stack([x for (x, _), _ in good]),
                                               [place for (_, place), _ in good] if any(f for _, f in good) else None) if good else [])
            if good and on_forward: on_forward(len(good), time.perf_counter() - start)
            for x, j in zip(decoded, chunk):
                if isinstance(x, Exception): results.append(x); continue
                answer = next(answers)
                if not flags[j]: answer.explanation = None
                results.append(answer)
        return results

    def _decode(self, chunk:Sequence, max_pixels:int|None):
        "The model inputs and places (or errors) of `chunk`, decoding on the predictor's threads (one image: in this thread)."
        def decode(source) -> tuple|Exception:
            try: return self._prepare(source, max_pixels)
            except ImageError as e: return e
            except OSError as e: return ImageError("unreadable file", str(e))  # a missing or unreadable path
            except Exception as e: return e  # fails this image alone
        return [decode(chunk[0])] if len(chunk) == 1 else self.decoder.map(decode, chunk)

    def predict(self, source:Path|str|bytes) -> Prediction:
        "The prediction for one image file (path or bytes); raises `ImageError` for an unusable one."
        result = self.predict_batch([source])[0]
        if isinstance(result, Exception): raise result
        return result

def check_artifact(model_dir:Path) -> ModelConfig:
    "The artifact's `ModelConfig`, or `FileNotFoundError`/`ValueError` saying what is missing or unreadable."
    model_dir = Path(model_dir)
    if not model_dir.is_dir(): raise FileNotFoundError(f"model directory {model_dir} does not exist (train a model or pass --model-dir)")
    for name in ("model_config.json", "weights.pt"):
        if not (model_dir/name).is_file(): raise FileNotFoundError(f"{model_dir} is not a model artifact: {name} is missing")
    try: return ModelConfig.load(model_dir/"model_config.json")
    except (ValueError, TypeError) as e: raise ValueError(f"{model_dir}/model_config.json is unreadable: {e}") from e


# %% [markdown]
# ## Models from the MLflow registry
#
# Training registers every model in the MLflow Model Registry (name `catsdogs`), and logs its
# artifact directory to the run. Wherever a model folder is expected, a registry URI does too:
# `models:/catsdogs@champion` (an alias) or `models:/catsdogs/3` (a version), on the tracking
# server of `MLFLOW_TRACKING_URI` / `--mlflow-tracking-uri`. `resolve_model` downloads that
# version's artifact once into the cache and returns the folder, with what the registry says
# about it (name, version, alias, run), which `/ready` shows. Promote a version with
# `python scripts/promote_model.py VERSION --alias champion`, then reload a running server
# (`POST /admin/reload`, see the serving notebook). MLflow is imported only for such a URI.

# %%
#| export
def resolve_model(model:Path|str, # A model directory, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`
                  tracking_uri:str|None=None, # MLflow tracking URI (registry URIs only)
                  cache_dir:Path|None=None) -> tuple[Path, dict|None]: # Where downloads go (default: the `cache_dir` setting)
    "The local artifact directory for `model`, and the registry's facts about it (None for a plain directory)."
    text = str(model)
    if not text.startswith("models:/"): return Path(model), None
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    ref = text.removeprefix("models:/")
    client = MlflowClient(tracking_uri)
    try:
        if "@" in ref: (name, alias), number = ref.split("@", 1), None
        elif "/" in ref: (name, number), alias = ref.rsplit("/", 1), None
        else: raise ValueError(f"{text} names no version: use models:/NAME@ALIAS or models:/NAME/VERSION")
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        dest = Path(cache_dir or DataSettings().cache_dir)/"models"/name/str(version.version)
        if not (dest/"model_config.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=".download-", dir=_mkdir(dest.parent)))
            download_artifacts(run_id=version.run_id, artifact_path="artifact", dst_path=str(staging), tracking_uri=tracking_uri)
            os.replace(staging/"artifact", dest)  # atomic: a half-downloaded model is never used
            shutil.rmtree(staging, ignore_errors=True)
    except MlflowException as e: raise ValueError(f"cannot load {text} from the registry at {tracking_uri}: {e.message}") from e
    return dest, {"uri": text, "name": name, "version": int(version.version), "alias": alias, "run_id": version.run_id}

def _mkdir(path:Path) -> Path:
    path.mkdir(parents=True, exist_ok=True); return path

def promote(version:int|str, # The model version to promote
            alias:str="champion", name:str|None=None, # Default: the `registered_model_name` setting
            tracking_uri:str|None=None):
    "Point `alias` of registered model `name` at `version` (what `scripts/promote_model.py` runs)."
    from mlflow import MlflowClient
    MlflowClient(tracking_uri).set_registered_model_alias(name or ModelSettings().registered_model_name, alias, str(version))


# %% [markdown]
# `check_artifact` fails early, with the path in the message, for a folder that is not a model.
# `auto` keeps the fastest engine that agrees and says so in the log and in `backend`,
# `precision` and `timings`. ONNX Runtime is the reference of a lean install, so an unreadable
# `model.onnx` is an error at start-up, never a silent fallback; so is any backend asked for by
# name that cannot load.

# %%
predictor = Predictor(artifact)
test_eq(predictor.backend in BACKENDS and predictor.precision in PRECISIONS, True)
test_eq(set(predictor.timings) >= {"onnx/f32", "openvino/f32"}, True)
test_fail(lambda: Predictor(Path(tmp.name)/"nothing"), contains="does not exist")
test_fail(lambda: Predictor(artifact, InferenceSettings(backend="onnx", precision="bf16")), contains="bf16 needs openvino")
predictor, predictor.timings

# %% [markdown]
# A folder that is not a model artifact fails with the reason, before any engine loads; the
# predictor runs on every core this process may use unless the settings say otherwise:

# %%
test_eq(check_artifact(artifact).architecture, "small_cnn")
test_fail(lambda: check_artifact(Path(tmp.name)), contains="model_config.json is missing")
predictor.threads

# %% [markdown]
# ## Predicting
#
# `Predictor.predict_batch` is the one way to predict several images, and every caller uses
# it: `catsdogs_predict` and `catsdogs_eval` (through `predict_files`), the service's
# micro-batcher (one call per batch of requests), the benchmarks and the tests. It decodes a
# batch on the predictor's threads, runs one forward pass over the images that decoded, and
# puts each unusable image's `ImageError` in its place; with several batches, the next one
# decodes while one runs. Below it, `preprocess` is the only path from bytes to a model input
# and `predict_arrays` the only forward pass; `predict` is `predict_batch` of one image.

# %%
#| echo: false
for method in (Predictor.from_settings, Predictor.predict_batch, Predictor.predict, Predictor.preprocess, Predictor.predict_arrays,
               Predictor.scores, Predictor.probabilities):
    display(show_doc(method))

# %%
one = predictor.predict(cat_jpg)
forward_passes = []
answers = predictor.predict_batch([cat_jpg, b"not an image", dog_jpg.read_bytes(), cat_jpg], batch_size=2,
                                  on_forward=lambda n, seconds: forward_passes.append(n))
test_eq([type(a).__name__ for a in answers], ["Prediction", "ImageError", "Prediction", "Prediction"])
test_close(answers[0].p_dog, one.p_dog, eps=1e-5)
test_close(answers[3].p_cat_or_dog, one.p_cat_or_dog, eps=1e-5)
test_eq(forward_passes, [1, 2])  # the bad image takes no place in its forward pass
test_fail(lambda: predictor.predict(b"not an image"), contains="not an image")
answers

# %% [markdown]
# The threshold is the artifact's unless the settings give one; with `open_set=False` the
# predictor answers "cat" or "dog" for everything, as a closed-set classifier does:

# %%
test_eq(predictor.threshold, predictor.config.open_set.threshold)
strict = Predictor(artifact, InferenceSettings(backend="onnx", open_set_threshold=1.0))
test_eq(strict.predict(cat_jpg).label, "neither")
closed = Predictor(artifact, InferenceSettings(backend="onnx", open_set=False))
answer = closed.predict(cat_jpg)
test_eq((answer.label, answer.p_cat_or_dog), (max(answer.probabilities, key=answer.probabilities.get), None))
strict, closed

# %% [markdown]
# With flip TTA the probabilities are the mean over the image and its mirror, and an image that
# is its own mirror gets the same answer either way:

# %%
tta = Predictor(artifact, InferenceSettings(backend="onnx", tta=True))
x = tta.preprocess(dog_jpg)[None]
plain = Predictor(artifact, InferenceSettings(backend="onnx"))
test_close(tta.probabilities(x), (plain.probabilities(x) + plain.probabilities(np.ascontiguousarray(x[..., ::-1]))) / 2, eps=1e-6)
symmetric = np.ones((1, 3, 96, 96), dtype=np.float32)
test_close(tta.probabilities(symmetric), plain.probabilities(symmetric), eps=1e-6)

# %% [markdown]
# Under TTA each answer also says whether the photo and its mirror got the same answer
# (`views_agree`); the service's review queue counts a disagreement as the most doubtful kind
# of answer (see the feedback notebook):

# %%
test_eq(plain.predict(dog_jpg).views_agree, None)
test_eq(tta.predict_arrays(symmetric)[0].views_agree, True)  # its own mirror: the same answer
tta.predict(dog_jpg).views_agree

# %% [markdown]
# ## Heat maps
#
# `predict_batch(..., explain=True)` adds an `Explanation` to each answer: the evidence grid of
# the answer's label (above), the grid of "cat or dog at all" with the open-set head, the box
# of the photo the grid covers and the photo's size. The forward pass computes the maps
# whether or not they are asked for (1% to 3% of it: `benchmarks/bench_explain.py`); turning
# them into grids is done only for the answers that ask. A predictor whose graphs have no `maps`
# output (`Predictor.heat_maps` false: `ModelConfig.heat_maps` false, or an engine file exported
# without them) refuses `explain` with `NO_HEAT_MAPS`.

# %%
explained = predictor.predict_batch([cat_jpg, b"not an image", dog_jpg], explain=[True, True, False])
why = explained[0].explanation
test_eq(isinstance(why, Explanation), True)
test_eq((why.label, why.size, np.shape(why.grid)), (explained[0].label, Image.open(cat_jpg).size, (6, 6)))  # 96 px, four stride-2 blocks
test_eq((type(explained[1]).__name__, explained[2].explanation), ("ImageError", None))
answer, margin = explained[0], _logit(predictor.threshold)
from_answer = (_logit(answer.confidence) + _logit(answer.p_cat_or_dog) - margin if answer.label != NEITHER
               else margin - _logit(answer.p_cat_or_dog))
test_close(np.mean(why.grid), from_answer, eps=TOLERANCES[predictor.precision] * (1 + abs(from_answer)))  # the grid adds up to the answer's margins
why

# %% [markdown]
# Pictures of a heat map are drawn from the grid alone, without the model. The colour shows the
# evidence *for* the answer, relative to the strongest cell, in `HEAT_LEVELS` steps: clear where
# there is none (or evidence against), then purple, orange and pale yellow, more opaque as
# the evidence grows, for the strongest. Smoothing the 9x9 grid up to the photo's pixels is bilinear; the steps make the
# picture cheap to encode (a PNG of a 500 x 375 photo is a few kilobytes).
#
# - `heat_overlay` is a transparent PNG of the photo's size (scaled down to at most
#   `heat_map_max_side`), to lay over the photo: what the service returns and the web page shows;
# - `heat_picture` blends the heat into the photo itself: what `catsdogs_predict --explain` and
#   `catsdogs_eval --figures` draw.

# %%
#| export
HEAT_LEVELS = 16
_HEAT_ANCHORS = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float64)  # inferno-like

def heat_colors(levels:int=HEAT_LEVELS) -> np.ndarray:
    "The colour scale `(levels, 4)` RGBA uint8: from clear dark purple through orange to opaque pale yellow."
    t = np.linspace(0, 1, levels)
    rgb = np.stack([np.interp(t, np.linspace(0, 1, len(_HEAT_ANCHORS)), _HEAT_ANCHORS[:, c]) for c in range(3)], 1)
    alpha = 255 * t  # faint evidence stays nearly clear: the strongest cells stand out
    return np.c_[rgb, alpha].round().astype(np.uint8)

def heat_levels(grid:Sequence[Sequence[float]], # Evidence per cell (`Explanation.grid`)
                box:tuple[float, float, float, float], # The region the grid covers, as fractions of the sides
                size:tuple[int, int]) -> Image.Image: # The picture's width and height
    "An `L` image of `size`: 0 where there is no evidence for the answer, up to `HEAT_LEVELS - 1` at the strongest cell; 0 outside `box`."
    g = np.asarray(grid, dtype=np.float64)
    strongest = g.max()
    share = np.clip(g / strongest, 0, 1) if strongest > 0 else np.zeros_like(g)
    left, top, right, bottom = (round(box[0] * size[0]), round(box[1] * size[1]), round(box[2] * size[0]), round(box[3] * size[1]))
    cells = Image.fromarray(np.round(share * 255).astype(np.uint8), "L")
    smooth = cells.resize((max(right - left, 1), max(bottom - top, 1)), Image.Resampling.BILINEAR)
    canvas = Image.new("L", size, 0)
    canvas.paste(smooth.point(lambda v: v * HEAT_LEVELS // 256), (left, top))
    return canvas

def overlay_size(size:tuple[int, int], # The photo's width and height
                 max_side:int|None) -> tuple[int, int]: # The `heat_map_max_side` setting; None: no limit
    "The size of a photo's heat-map overlay: `size` scaled down (never up) to fit `max_side`."
    scale = min(1.0, max_side / max(size)) if max_side else 1.0
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))

def heat_overlay(explanation:Explanation, # An answer's explanation
                 max_side:int|None=None) -> bytes: # Scale down to at most this (the `heat_map_max_side` setting); None: the photo's size
    "A transparent PNG of the photo's size with the heat of `explanation` on it, to lay over the photo."
    import io
    levels = heat_levels(explanation.grid, explanation.box, overlay_size(tuple(explanation.size), max_side))
    levels.putpalette(heat_colors().tobytes(), rawmode="RGBA")  # the levels become palette indices: 4 bits a pixel
    out = io.BytesIO()
    levels.save(out, format="PNG", compress_level=1, bits=4)
    return out.getvalue()

def heat_picture(photo:Image.Image, # The photo, upright RGB (`load_image`), at any scale
                 explanation:Explanation,
                 opacity:float=0.6) -> Image.Image: # The `heat_map_opacity` setting
    "The photo with the heat of `explanation` blended in (RGB)."
    colors = heat_colors().astype(np.float64)
    colors[:, 3] *= opacity
    heat = Image.fromarray(colors.round().astype(np.uint8)[np.asarray(heat_levels(explanation.grid, explanation.box, photo.size))], "RGBA")
    return Image.alpha_composite(photo.convert("RGBA"), heat).convert("RGB")


# %% [markdown]
# The overlay of the cat above, decoded again: a PNG of the photo's size, clear where the
# evidence is nil and outside the box; `heat_picture` is the same heat blended into the photo:

# %%
overlay = Image.open(io.BytesIO(heat_overlay(why)))
test_eq((overlay.format, overlay.size), ("PNG", why.size))
test_eq(Image.open(io.BytesIO(heat_overlay(why, max_side=100))).size, (100, round(100 * why.size[1] / why.size[0])))
test_eq((overlay_size((2000, 1500), 1024), overlay_size((300, 200), 1024)), ((1024, 768), (300, 200)))
test_eq(heat_colors()[0, 3], 0)  # level 0 is clear
test_eq(np.asarray(heat_levels(why.grid, why.box, why.size)).max(), HEAT_LEVELS - 1)  # the strongest cell gets the top level
picture = heat_picture(load_image(cat_jpg), why)
test_eq(picture.size, why.size)
picture


# %% [markdown]
# ## `catsdogs_predict`
#
# One line per image (`path: label confidence`), or one JSON object per line with `--json`.
# A file that is not a usable image gets an error line; the others are still predicted, and
# the exit code is 1 at the end.

# %%
#| export

def _predict_line(path:str, result:Prediction|Exception, as_json:bool, heat_map:Path|None=None) -> str:
    "The output line for one input: its prediction (and the heat-map picture written for it), or its error."
    if as_json:
        body = {"path": path, **result.to_dict()} if isinstance(result, Prediction) else {"path": path, "error": str(result)}
        if heat_map: body["heat_map"] = str(heat_map)
        return json.dumps(body)
    if isinstance(result, Exception): return f"{path}: error: {result}"
    open_set = "" if result.p_cat_or_dog is None else f", p_cat_or_dog={result.p_cat_or_dog:.3f}"
    return f"{path}: {result.label} {result.confidence:.3f} (p_dog={result.p_dog:.3f}{open_set})" + (f" heat map: {heat_map}" if heat_map else "")

def predict_files(predictor:Predictor, paths:Sequence[str|Path], batch_size:int=16,
                  progress:bool=False, desc:str="predicting",
                  explain:bool=False) -> list[Prediction|Exception]: # Add each answer's `Explanation`
    "A prediction or an `ImageError` for every path, in order (`Predictor.predict_batch`), with a progress bar."
    from tqdm.auto import tqdm
    step = batch_size * 8  # `predict_batch` overlaps decoding and the forward pass within each step
    results: list = []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, len(paths), step):
            results += predictor.predict_batch(paths[i:i + step], batch_size, explain=explain)
            bar.update(len(paths[i:i + step]))
    return results

def write_heat_pictures(paths:Sequence[str|Path], results:Sequence[Prediction|Exception], out_dir:Path,
                        opacity:float=0.6) -> list[Path|None]: # The `heat_map_opacity` setting
    "Write `heat_picture` of each explained answer to `out_dir` as `<name>.<label>.jpg`; the paths written (None for errors)."
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    written, taken = [], set()
    for path, result in zip(paths, results):
        if not isinstance(result, Prediction) or result.explanation is None: written.append(None); continue
        name, n = f"{Path(path).stem}.{result.label}", 1
        while name in taken: name, n = f"{Path(path).stem}-{n}.{result.label}", n + 1  # two photos of one name
        taken.add(name)
        heat_picture(load_image(path), result.explanation, opacity).save(out_dir/f"{name}.jpg", quality=90)
        written.append(out_dir/f"{name}.jpg")
    return written

def predict_cli(argv:list[str]|None=None) -> int:
    "Console script `catsdogs_predict IMG... [--model DIR] [--json] [--explain DIR] [--backend B] [--tta] [--no-open-set]`."
    parser = settings_parser("Predict cat, dog or neither for image files.", [InferenceSettings, *MODEL_SOURCE, "max_image_pixels"],
                             aliases={"--model": "model_dir"})
    parser.add_argument("images", nargs="+", help="Image files")
    parser.add_argument("--json", action="store_true", help="One JSON object per line (with the heat-map grids under --explain)")
    parser.add_argument("--explain", type=Path, metavar="DIR", help="Write each photo with its heat map to DIR (NAME.LABEL.jpg)")
    settings, args = parse_settings(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try: predictor = Predictor.from_settings(settings)
    except (OSError, ValueError, RuntimeError) as e: parser.exit(2, f"catsdogs_predict: cannot load the model: {e}\n")
    if args.explain and not predictor.heat_maps: parser.exit(2, f"catsdogs_predict: {NO_HEAT_MAPS.format(model_dir=predictor.model_dir)}\n")
    results = predict_files(predictor, args.images, explain=bool(args.explain))
    pictures = write_heat_pictures(args.images, results, args.explain, settings.heat_map_opacity) if args.explain else [None] * len(results)
    for path, result, picture in zip(args.images, results, pictures): print(_predict_line(path, result, args.json, picture), flush=True)
    return 1 if any(isinstance(r, Exception) for r in results) else 0  # the console script exits with this


# %%
notes = Path(tmp.name)/"notes.txt"; notes.write_text("hello")
for photo in (cat_jpg, dog_jpg): shutil.copy(photo, tmp.name)
with contextlib.chdir(tmp.name):  # paths as typed at a prompt in the folder that holds the photos and the model
    test_eq(predict_cli([cat_jpg.name, "notes.txt", "--model", "model", "--backend", "onnx"]), 1)
    test_eq(predict_cli([dog_jpg.name, "--model", "model", "--json"]), 0)
    test_eq(predict_cli([dog_jpg.name, "--model", "model", "--no-open-set"]), 0)

# %% [markdown]
# `--explain DIR` writes each photo with its heat map blended in, named after the photo and the answer:

# %%
with contextlib.chdir(tmp.name):
    test_eq(predict_cli([cat_jpg.name, dog_jpg.name, "--model", "model", "--explain", "why"]), 0)
written = sorted(p.name for p in Path(f"{tmp.name}/why").iterdir())
test_eq([name.rsplit(".", 2)[0] for name in written], [cat_jpg.stem, dog_jpg.stem])
written

# %% [markdown]
# `write_heat_pictures` is that step on its own: a picture for each explained answer, None for errors.

# %%
pictures = write_heat_pictures([cat_jpg, notes], predict_files(predictor, [cat_jpg, notes], explain=True), Path(tmp.name)/"again")
test_eq((pictures[0].name, pictures[1]), (f"{cat_jpg.stem}.{predictor.predict(cat_jpg).label}.jpg", None))
[picture and picture.relative_to(tmp.name) for picture in pictures]

# %% [markdown]
# `predict_files` is what `catsdogs_predict` and `catsdogs_eval` run: it decodes each batch on
# the predictor's threads while the previous one runs, and gives each file its prediction or
# its error, in order.

# %%
results = predict_files(predictor, [cat_jpg, notes, dog_jpg], batch_size=2)
test_eq([type(r).__name__ for r in results], ["Prediction", "ImageError", "Prediction"])
results[1]

# %% [markdown]
# ## Serving a version from the registry
#
# A registry in a SQLite file: the artifact logged to a run and registered as version 1 of
# `catsdogs`, promoted to `champion`, then resolved by URI as `catsdogs_serve --model
# models:/catsdogs@champion` does:

# %%
registry_uri = f"sqlite:///{tmp.name}/mlflow.db"
client = mlflow.MlflowClient(registry_uri)
run = client.create_run(client.create_experiment("demo", artifact_location=(Path(tmp.name)/"mlartifacts").as_uri()))
mlflow.set_tracking_uri(registry_uri)
with mlflow.start_run(run_id=run.info.run_id): mlflow.log_artifacts(str(artifact), "artifact")
client.create_registered_model("catsdogs")
client.create_model_version("catsdogs", f"runs:/{run.info.run_id}/artifact", run_id=run.info.run_id)
promote(1, "champion", tracking_uri=registry_uri)
folder, facts = resolve_model("models:/catsdogs@champion", registry_uri, Path(tmp.name)/"cache")
test_eq(Predictor(folder, InferenceSettings(backend="onnx")).model_version, predictor.model_version)
facts

# %%
tmp.cleanup()
