# %%
#| default_exp inference

# %% [markdown]
# # Inference
#
# > A `Predictor` that loads a model artifact with the fastest backend that agrees with eager PyTorch, answers "cat", "dog" or "neither", and `catsdogs_predict` and `catsdogs_eval` on top of it.

# %% [markdown]
# The predictor is what the CLI, the HTTP service and the benchmarks share. It
#
# 1. reads the artifact written by `export_artifact` (`model_config.json`, `weights.pt`,
#    `model.ts`, `model.onnx`);
# 2. runs one of three **backends**: `eager` PyTorch (channels-last), `torchscript`, or `onnx`
#    (ONNX Runtime, spinning threads off so it leaves the cores to image decoding); `auto`
#    times each briefly at load and keeps the fastest whose probabilities match eager within 1e-3;
# 3. turns bytes into a tensor with `load_image` and the artifact's own `eval_transform`, the
#    preprocessing training used (nothing about image size or normalisation is typed here);
# 4. applies the stored softmax temperature and, optionally, flip test-time augmentation;
# 5. turns the open-set score into `p_cat_or_dog` and answers `"neither"` below the artifact's
#    threshold (or `open_set_threshold`), unless `open_set` is off.

# %%
#| export
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from catsdogs.config import Settings, parse_settings, settings_parser
from catsdogs.data import ImageError, decode_size, eval_transform, find_images, load_image
from catsdogs.model import ModelConfig, OpenSetConfig, load_model, open_set_metrics
from catsdogs.training import classification_metrics

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_fail, test_close
from catsdogs.data import demo_data_dir
from catsdogs.model import build_model, export_artifact, fit_open_set

# %%
#| export
logger = logging.getLogger("catsdogs.inference")

# %% [markdown]
# Examples run on a small untrained artifact in a temporary folder, its open-set head fitted on
# a few sample photos (its predictions are meaningless, but every backend must still agree
# with eager), and on the image sample.

# %%
tmp = tempfile.TemporaryDirectory()
data_dir = demo_data_dir()
cat_jpg, dog_jpg = sorted((data_dir/"Cat").glob("cat.*.jpg"))[0], sorted((data_dir/"Dog").glob("dog.*.jpg"))[0]
untrained = build_model("small_cnn", pretrained=False).eval()
tf = eval_transform(96, 0.875)
photos = sorted((data_dir/"Cat").glob("cat.*.jpg"))[:12] + sorted((data_dir/"Dog").glob("dog.*.jpg"))[:12]
with torch.no_grad(): features = untrained.backbone(torch.stack([tf(load_image(p)) for p in photos]))
open_set = fit_open_set(untrained.open_set, features[::2], features[1::2])
artifact = export_artifact(untrained, Path(tmp.name)/"model", ModelConfig.for_backbone("small_cnn", image_size=96, open_set=open_set))

# %% [markdown]
# ## One prediction

# %%
#| export
NEITHER = "neither"

@dataclass
class Prediction:
    "The answer for one image: the label, its probability, every class's probability given a cat or dog, P(dog), P(cat or dog)."
    label: str # "cat", "dog", or "neither" when the photo does not look like a cat or a dog
    confidence: float # The probability of `label`: P(class | cat or dog), or 1 - p_cat_or_dog for "neither"
    probabilities: dict[str, float] # Each class's probability, given that the photo shows one of them
    p_dog: float
    p_cat_or_dog: float|None = None # Probability that the photo shows a cat or a dog at all; None: closed set

    def to_dict(self) -> dict: return asdict(self)

def to_predictions(probs:np.ndarray, # (N, classes) probabilities
                   class_names:Sequence[str]=("cat", "dog"),
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

def softmax(logits:np.ndarray, temperature:float=1.0) -> np.ndarray:
    "Class probabilities from logits, calibrated by dividing by `temperature` first."
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# %% [markdown]
# A temperature above 1 (fitted on the validation set during training) softens over-confident logits:

# %%
preds = to_predictions(softmax(np.array([[0.0, 2.0], [3.0, 0.0]]), temperature=2.0))
test_eq([p.label for p in preds], ["dog", "cat"])
test_close(preds[0].p_dog, 1/(1 + np.exp(-1)), eps=1e-9)
test_close(preds[1].probabilities["cat"] + preds[1].probabilities["dog"], 1.0, eps=1e-9)
preds[0]

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
# ## Backends
#
# Each backend is a function from a float32 batch `(N, 3, H, W)` to a tuple: logits
# `(N, classes)` and, when the artifact has a fitted open-set head, its score `(N,)`.
# `default_threads` is the number of cores this process may use, unless the settings say otherwise.

# %%
#| export
BACKENDS = ("eager", "torchscript", "onnx")

def default_threads(threads:int=0) -> int:
    "`threads` if positive, else the cores this process may run on."
    if threads > 0: return threads
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1

def _numpy_outputs(out) -> tuple:
    "A graph's output(s) as a tuple of NumPy arrays."
    return tuple(o.numpy() for o in out) if isinstance(out, (tuple, list)) else (out.numpy(),)

def _eager_runner(model:torch.nn.Module, open_set:bool) -> Callable:
    "Eager PyTorch in channels-last memory format (faster for convolutions on CPU)."
    model = model.to(memory_format=torch.channels_last)
    forward = model.forward_open_set if open_set else model
    def run(x):
        with torch.inference_mode(): return _numpy_outputs(forward(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)))
    return run

def _torchscript_runner(path:Path) -> Callable:
    "The traced TorchScript graph `model.ts`."
    module = torch.jit.load(str(path), map_location="cpu").eval()
    def run(x):
        with torch.inference_mode(): return _numpy_outputs(module(torch.from_numpy(x)))
    return run

def _onnx_runner(path:Path, threads:int) -> Callable:
    "ONNX Runtime on `model.onnx`, `threads` intra-op threads that sleep rather than spin when idle."
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    return lambda x: tuple(session.run(outputs, {"images": x}))

def make_runner(backend:str, # One of `BACKENDS`
                model_dir:Path, # The artifact directory
                threads:int=0, # Intra-op threads; 0: one per core
                model:torch.nn.Module|None=None) -> Callable:
    "A `batch -> (logits, open-set score)` function for `backend` on the artifact in `model_dir` (logits alone without an open-set head)."
    model_dir, threads = Path(model_dir), default_threads(threads)
    if backend == "eager":
        model, config = (model, None) if model is not None else load_model(model_dir)
        return _eager_runner(model, open_set=model.open_set is not None and model.open_set.bank.numel() > 0)
    files = {"torchscript": "model.ts", "onnx": "model.onnx"}
    if backend not in files: raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    if not (model_dir/files[backend]).exists(): raise FileNotFoundError(f"no {files[backend]} in {model_dir}")
    if backend == "torchscript": return _torchscript_runner(model_dir/files[backend])
    return _onnx_runner(model_dir/files[backend], threads)


# %% [markdown]
# All three give the same logits on the same batch:

# %%
x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
outputs = {b: make_runner(b, artifact)(x) for b in BACKENDS}
for b in BACKENDS:
    test_eq(len(outputs[b]), 2)  # logits and the open-set score
    for got, expected in zip(outputs[b], outputs["eager"]): test_close(got, expected, eps=1e-4)
test_fail(lambda: make_runner("tensorrt", artifact), contains="choose one of")


# %% [markdown]
# ## Choosing a backend
#
# `choose_backend` checks every backend against eager on a few images (the probabilities must
# match within `atol`), times a batch of one and a batch of four after a warm-up (within a small time budget, so a
# slow backend cannot hold up start-up), and keeps the fastest. A backend that fails to load or disagrees is skipped, with the reason logged.

# %%
#| export
def calibration_images(n:int=4, seed:int=0) -> list[Image.Image]:
    "Deterministic test images of varied sizes: smooth gradients plus noise, so every layer sees signal."
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = 160 + 40*i, 300 - 30*i
        grad = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.5 + 0.1*i, 0.2])[None, None, :]
        pixels = np.clip(grad + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images

def _time_ms(run:Callable, x:np.ndarray, repeat:int=5, budget_s:float=0.5) -> float:
    "Median wall time of `run(x)` in ms after a warm-up call: `repeat` runs, fewer if they pass `budget_s`."
    run(x)
    times, spent = [], 0.0
    while len(times) < repeat and (not times or spent < budget_s):
        start = time.perf_counter(); run(x); times.append(time.perf_counter() - start); spent += times[-1]
    return float(np.median(times)) * 1000

def _compared(outputs:tuple, temperature:float, open_set:OpenSetConfig|None) -> np.ndarray:
    "What backends must agree on: class probabilities and, with an open-set head, its score (relative to its size)."
    probs = softmax(outputs[0], temperature)
    if open_set is None or len(outputs) < 2: return probs
    score = np.asarray(outputs[1], dtype=np.float64)
    return np.c_[probs, score / (1 + np.abs(score))]  # the raw score: p_cat_or_dog of test patterns is ~0 and hides differences

def choose_backend(runners:dict[str, Callable], # Backend name -> runner; must include "eager"
                   batch:np.ndarray, # A few preprocessed images
                   temperature:float=1.0, atol:float=1e-3,
                   open_set:OpenSetConfig|None=None) -> tuple[str, dict[str, float]]: # Compare p_cat_or_dog too
    "The fastest runner whose probabilities match eager's within `atol`, and each one's time (batch 1 + batch 4, ms)."
    reference = _compared(runners["eager"](batch), temperature, open_set)
    timings = {}
    for name, run in runners.items():
        got = _compared(run(batch), temperature, open_set)
        diff = float(np.abs(got - reference).max()) if got.shape == reference.shape else float("inf")
        if diff >= atol:
            logger.warning("backend %s differs from eager by %.1e (>= %.0e); not used", name, diff, atol); continue
        timings[name] = _time_ms(run, batch[:1]) + _time_ms(run, batch[:4])
    return min(timings, key=timings.get), timings


# %%
tf = eval_transform(96, 0.875)
batch = torch.stack([tf(im) for im in calibration_images()]).numpy()
runners = {b: make_runner(b, artifact) for b in BACKENDS}
best, timings = choose_backend(runners, batch, open_set=open_set)
test_eq(best in BACKENDS, True)
broken = {**runners, "onnx": lambda x: (runners["onnx"](x)[0] + np.array([0.0, 1.0], dtype=np.float32),)}  # a backend that disagrees is never chosen
test_eq("onnx" in choose_backend(broken, batch)[1], False)
shifted = {**runners, "onnx": lambda x: (runners["onnx"](x)[0], runners["onnx"](x)[1] + 0.5)}  # nor one whose open-set score is off
test_eq("onnx" in choose_backend(shifted, batch, open_set=open_set)[1], False)
best, timings


# %% [markdown]
# ## The predictor

# %%
#| export
class Predictor:
    "A model artifact ready to predict: its backend, preprocessing, temperature, open-set threshold and optional flip TTA."
    def __init__(self, model_dir:Path, # Artifact directory written by `export_artifact`
                 backend:str="auto", # `auto`, `eager`, `torchscript` or `onnx`
                 tta:bool=False, # Average the image's and its mirror's probabilities
                 threads:int=0, # Inference threads; 0: one per core
                 max_pixels:int|None=None, # Refuse larger images before decoding
                 open_set:bool=True, # Answer "neither" (when the artifact has an open-set head)
                 open_set_threshold:float|None=None): # Override the artifact's p_cat_or_dog threshold
        self.model_dir = Path(model_dir)
        self.config = check_artifact(self.model_dir)
        self.tta, self.max_pixels, self.threads = tta, max_pixels, default_threads(threads)
        self.open_set = self.config.open_set if open_set else None
        self.threshold = open_set_threshold if open_set_threshold is not None else getattr(self.open_set, "threshold", None)
        torch.set_num_threads(self.threads)
        self.draft_size = decode_size(self.config.image_size, self.config.crop_fraction)
        self.transform = eval_transform(self.config.image_size, self.config.crop_fraction, self.config.mean, self.config.std)
        self.model_version = hashlib.sha256((self.model_dir/"model_config.json").read_bytes()
                                            + (self.model_dir/"weights.pt").read_bytes()).hexdigest()[:12]
        self.backend, self.timings = self._load(backend)

    @classmethod
    def from_settings(cls, settings:Settings|None=None) -> Predictor:
        "A predictor configured by `Settings` (model_dir, backend, tta, threads, max_image_pixels, open_set, open_set_threshold)."
        s = settings or Settings()
        return cls(s.model_dir, s.backend, s.tta, s.threads, s.max_image_pixels, s.open_set, s.open_set_threshold)

    def __repr__(self):
        open_set = f"neither below p={self.threshold:.3f}" if self.open_set else "closed set"
        return f"Predictor({self.config.architecture}, backend={self.backend}, tta={self.tta}, {open_set}, version={self.model_version})"


# %% [markdown]
# `check_artifact` fails early, with the path in the message, for a folder that is not a model.
# `_load` builds the runners; `auto` keeps the fastest that agrees with eager and says so in
# the log and in `backend` / `timings`.

# %%
#| export
def check_artifact(model_dir:Path) -> ModelConfig:
    "The artifact's `ModelConfig`, or `FileNotFoundError`/`ValueError` saying what is missing or unreadable."
    model_dir = Path(model_dir)
    if not model_dir.is_dir(): raise FileNotFoundError(f"model directory {model_dir} does not exist (train a model or pass --model-dir)")
    for name in ("model_config.json", "weights.pt"):
        if not (model_dir/name).is_file(): raise FileNotFoundError(f"{model_dir} is not a model artifact: {name} is missing")
    try: return ModelConfig.load(model_dir/"model_config.json")
    except (ValueError, TypeError) as e: raise ValueError(f"{model_dir}/model_config.json is unreadable: {e}") from e

def _load(self:Predictor, backend:str) -> tuple[str, dict[str, float]]:
    "Build the runner for `backend` (choosing one when `auto`); returns the backend used and the timings."
    if backend != "auto":
        self.run = make_runner(backend, self.model_dir, self.threads)
        return backend, {}
    runners = {"eager": make_runner("eager", self.model_dir, self.threads)}
    for name in ("torchscript", "onnx"):
        try: runners[name] = make_runner(name, self.model_dir, self.threads)
        except Exception as e: logger.warning("backend %s unavailable: %s", name, e)
    calibration = np.stack([self.transform(im).numpy() for im in calibration_images()])
    best, timings = choose_backend(runners, calibration, self.config.temperature, open_set=self.config.open_set)
    self.run = runners[best]
    logger.info("backend auto: chose %s (%s ms for a batch of 1 plus a batch of 4)", best,
                ", ".join(f"{k} {v:.1f}" for k, v in sorted(timings.items(), key=lambda kv: kv[1])))
    return best, timings
Predictor._load = _load

# %%
predictor = Predictor(artifact)
test_eq(predictor.backend in BACKENDS, True)
test_eq(set(predictor.timings) <= set(BACKENDS), True)
test_fail(lambda: Predictor(Path(tmp.name)/"nothing"), contains="does not exist")
predictor, predictor.timings


# %% [markdown]
# ## Predicting
#
# `preprocess` is the only path from bytes to a model input, and `predict_tensors` the only
# forward pass; `predict` and `predict_batch` join the two. The server calls the two halves
# separately: it decodes a batch of requests in parallel threads, then runs one forward pass.

# %%
#| export
def preprocess(self:Predictor, source:Path|str|bytes,
               max_pixels:int|None=None) -> torch.Tensor: # Overrides the predictor's own limit
    "Decode `source` (path or bytes) and apply the artifact's eval transform: a `(3, H, W)` tensor, or `ImageError`."
    return self.transform(load_image(source, draft_size=self.draft_size, max_pixels=max_pixels or self.max_pixels))

def scores(self:Predictor, batch:torch.Tensor|np.ndarray) -> tuple[np.ndarray, np.ndarray|None]:
    "Calibrated class probabilities `(N, classes)` and `p_cat_or_dog` `(N,)` (None when closed-set), averaged with the mirror under TTA."
    x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
    n = len(x)
    if self.tta: x = np.concatenate([x, x[..., ::-1]])
    outputs = self.run(x)
    probs = softmax(outputs[0], self.config.temperature)
    score = outputs[1] if self.open_set is not None and len(outputs) > 1 else None
    if self.tta:  # probabilities averaged, the open-set score too (before the sigmoid, the scale its threshold was set on)
        probs = (probs[:n] + probs[n:]) / 2
        if score is not None: score = (score[:n] + score[n:]) / 2
    return probs, None if score is None else self.open_set.probability(score)

def probabilities(self:Predictor, batch:torch.Tensor|np.ndarray) -> np.ndarray:
    "Calibrated class probabilities `(N, classes)` for a preprocessed batch, averaged with the mirror image under TTA."
    return self.scores(batch)[0]

def predict_tensors(self:Predictor, batch:torch.Tensor|np.ndarray) -> list[Prediction]:
    "One `Prediction` per preprocessed image in `batch`."
    probs, p_any = self.scores(batch)
    return to_predictions(probs, self.config.class_names, p_any, self.threshold if self.threshold is not None else 0.5)

def predict(self:Predictor, source:Path|str|bytes) -> Prediction:
    "The prediction for one image file (path or bytes)."
    return self.predict_tensors(self.preprocess(source)[None])[0]

def predict_batch(self:Predictor, sources:Sequence[Path|str|bytes], batch_size:int=32) -> list[Prediction]:
    "Predictions for several images, `batch_size` per forward pass; raises `ImageError` on the first bad one."
    out = []
    for i in range(0, len(sources), batch_size):
        out += self.predict_tensors(torch.stack([self.preprocess(s) for s in sources[i:i + batch_size]]))
    return out

for f in (preprocess, scores, probabilities, predict_tensors, predict, predict_batch): setattr(Predictor, f.__name__, f)

# %%
one = predictor.predict(cat_jpg)
both = predictor.predict_batch([cat_jpg, dog_jpg.read_bytes()])
test_close(both[0].p_dog, one.p_dog, eps=1e-5)
test_close(both[0].p_cat_or_dog, one.p_cat_or_dog, eps=1e-5)
test_fail(lambda: predictor.predict(b"not an image"), contains="not an image")
both

# %% [markdown]
# The threshold is the artifact's unless the settings give one; with `open_set=False` the
# predictor answers "cat" or "dog" for everything, as a closed-set classifier does:

# %%
test_eq(predictor.threshold, predictor.config.open_set.threshold)
strict = Predictor(artifact, backend="eager", open_set_threshold=1.0)
test_eq(strict.predict(cat_jpg).label, "neither")
closed = Predictor(artifact, backend="eager", open_set=False)
answer = closed.predict(cat_jpg)
test_eq((answer.label, answer.p_cat_or_dog), (max(answer.probabilities, key=answer.probabilities.get), None))
strict, closed

# %% [markdown]
# With flip TTA the probabilities are the mean over the image and its mirror, and an image that
# is its own mirror gets the same answer either way:

# %%
tta = Predictor(artifact, backend="eager", tta=True)
x = tta.preprocess(dog_jpg)[None]
plain = Predictor(artifact, backend="eager")
test_close(tta.probabilities(x), (plain.probabilities(x) + plain.probabilities(x.flip(-1))) / 2, eps=1e-6)
symmetric = torch.ones(1, 3, 96, 96)
test_close(tta.probabilities(symmetric), plain.probabilities(symmetric), eps=1e-6)

# %% [markdown]
# ## `catsdogs_predict`
#
# One line per image (`path: label confidence`), or one JSON object per line with `--json`.
# A file that is not a usable image gets an error line; the others are still predicted, and
# the exit code is 1 at the end.

# %%
#| export
_PREDICT_FLAGS = ["model_dir", "backend", "tta", "threads", "max_image_pixels", "open_set", "open_set_threshold"]

def _predict_line(path:str, result:Prediction|ImageError, as_json:bool) -> str:
    "The output line for one input: its prediction, or its error."
    if as_json:
        body = {"path": path, **result.to_dict()} if isinstance(result, Prediction) else {"path": path, "error": str(result)}
        return json.dumps(body)
    if isinstance(result, ImageError): return f"{path}: error: {result}"
    open_set = "" if result.p_cat_or_dog is None else f", p_cat_or_dog={result.p_cat_or_dog:.3f}"
    return f"{path}: {result.label} {result.confidence:.3f} (p_dog={result.p_dog:.3f}{open_set})"

def predict_files(predictor:Predictor, paths:Sequence[str], batch_size:int=32,
                  progress:bool=False, desc:str="predicting") -> list[Prediction|ImageError]:
    "A prediction or an `ImageError` for every path, in order; good images are batched."
    from tqdm.auto import tqdm
    results: list = [None] * len(paths)
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
        tensors = {}
        for i in range(start, min(start + batch_size, len(paths))):
            try: tensors[i] = predictor.preprocess(paths[i])
            except (ImageError, OSError) as e: results[i] = e if isinstance(e, ImageError) else ImageError("unreadable file", str(e))
        if tensors:
            for i, p in zip(tensors, predictor.predict_tensors(torch.stack(list(tensors.values())))): results[i] = p
    return results

def predict_cli(argv:list[str]|None=None) -> int:
    "Console script `catsdogs_predict IMG... [--model DIR] [--json] [--backend B] [--tta] [--no-open-set]`."
    parser = settings_parser("Predict cat, dog or neither for image files.", _PREDICT_FLAGS)
    parser.add_argument("images", nargs="+", help="Image files")
    parser.add_argument("--model", dest="model", type=Path, default=None, help="Same as --model-dir")
    parser.add_argument("--json", action="store_true", help="One JSON object per line")
    settings, args = parse_settings(parser, argv)
    if args.model is not None: settings.model_dir = args.model
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try: predictor = Predictor.from_settings(settings)
    except (OSError, ValueError, RuntimeError) as e: parser.exit(2, f"catsdogs_predict: cannot load the model: {e}\n")
    results = predict_files(predictor, args.images)
    for path, result in zip(args.images, results): print(_predict_line(path, result, args.json), flush=True)
    return 1 if any(isinstance(r, ImageError) for r in results) else 0  # the console script exits with this


# %%
notes = Path(tmp.name)/"notes.txt"; notes.write_text("hello")
test_eq(predict_cli([str(cat_jpg), str(notes), "--model", str(artifact), "--backend", "onnx"]), 1)
test_eq(predict_cli([str(dog_jpg), "--model", str(artifact), "--json"]), 0)
test_eq(predict_cli([str(dog_jpg), "--model", str(artifact), "--no-open-set"]), 0)


# %% [markdown]
# ## `catsdogs_eval`
#
# Evaluation goes through the same `Predictor` as serving, so it measures the backend, the
# preprocessing and the threshold that are served. `evaluate_folder` predicts every labelled
# photo under a folder (in batches, with a progress bar) and returns the test metrics of the
# training stage; with `ood_dir`, a folder of photos that show neither (any layout), it adds the
# open-set metrics: ROC AUC, FPR at 95% and 99% TPR, the share of those photos refused and the
# share of cats and dogs kept at the threshold. Unreadable files are counted, never fatal.

# %%
#| export
def _open_set_probabilities(results:list) -> np.ndarray:
    "p_cat_or_dog of the results that are predictions."
    return np.array([r.p_cat_or_dog for r in results if isinstance(r, Prediction)], dtype=np.float64)

def evaluate_folder(predictor:Predictor, # What is evaluated, as it is served
                    data_dir:Path, # One subfolder per class (or Kaggle-style names)
                    ood_dir:Path|None=None, # Photos of neither cats nor dogs, any layout
                    batch_size:int=32, progress:bool=True) -> dict:
    "Metrics of `predictor` on the labelled images under `data_dir` and, with `ood_dir`, open-set metrics."
    if ood_dir is not None and predictor.open_set is None:
        raise ValueError("--ood-dir needs the open set: the model has no open-set head, or it is turned off")
    names = tuple(predictor.config.class_names)
    files = find_images(data_dir, names)
    files = files[files.label.notna()]
    results = predict_files(predictor, [str(Path(data_dir)/p) for p in files.path], batch_size, progress, "cats and dogs")
    answered = [(r, names.index(label)) for r, label in zip(results, files.label) if isinstance(r, Prediction)]
    if not answered: raise ValueError(f"no readable labelled images under {data_dir}")
    probs = np.array([[r.probabilities[c] for c in names] for r, _ in answered])
    targets = np.array([t for _, t in answered])
    metrics = {**classification_metrics(probs, targets), "n_skipped": len(results) - len(answered)}
    if predictor.open_set is None: return metrics
    p_pets = _open_set_probabilities(results)
    kept = p_pets >= predictor.threshold
    metrics.update(open_set_threshold=float(predictor.threshold), open_set_kept=float(kept.mean()),
                   accuracy_kept=float((probs.argmax(1) == targets)[kept].mean()) if kept.any() else float("nan"))
    if ood_dir is not None:
        outliers = [str(Path(ood_dir)/p) for p in find_images(ood_dir, names).path]
        p_outliers = _open_set_probabilities(predict_files(predictor, outliers, batch_size, progress, "neither"))
        if not len(p_outliers): raise ValueError(f"no readable images under {ood_dir}")
        metrics.update(open_set_metrics(p_pets, p_outliers, predictor.threshold))
        metrics["n_outliers_skipped"] = len(outliers) - len(p_outliers)
    return metrics


# %%
neither = Path(tmp.name)/"neither"; neither.mkdir()
for i, im in enumerate(calibration_images(6)): im.save(neither/f"pattern{i}.jpg")
metrics = evaluate_folder(predictor, data_dir, neither, progress=False)
assert metrics["n_images"] > 20 and metrics["n_skipped"] >= 1 and metrics["n_outliers"] == 6
{k: metrics[k] for k in ("accuracy", "log_loss", "n_images", "n_skipped", "open_set_kept", "ood_roc_auc", "ood_refused")}

# %% [markdown]
# `catsdogs_eval` prints the metrics, and with `--json` ends with one line of JSON holding them all.

# %%
#| export
_EVAL_FLAGS = ["model_dir", "data_dir", "ood_dir", "backend", "tta", "threads", "max_image_pixels", "open_set", "open_set_threshold"]

def eval_cli(argv:list[str]|None=None):
    "Console script `catsdogs_eval`: metrics of a model artifact, as served, on a labelled folder (and outliers)."
    parser = settings_parser("Evaluate a model artifact on a folder with one subfolder per class and, with --ood-dir, "
                             "on photos that show neither.", _EVAL_FLAGS)
    parser.add_argument("--model", dest="model", type=Path, default=None, help="Same as --model-dir")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass")
    parser.add_argument("--json", action="store_true", help="End with one line of JSON holding every metric")
    settings, args = parse_settings(parser, argv)
    if args.model is not None: settings.model_dir = args.model
    if settings.data_dir is None: parser.error("--data-dir is required: a folder of labelled cat and dog photos")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try: predictor = Predictor.from_settings(settings)
    except (OSError, ValueError, RuntimeError) as e: parser.exit(2, f"catsdogs_eval: cannot load the model: {e}\n")
    try: metrics = evaluate_folder(predictor, settings.data_dir, settings.ood_dir, args.batch_size, progress=not args.json)
    except (OSError, ValueError) as e: parser.exit(2, f"catsdogs_eval: {e}\n")
    print(f"{metrics['n_images']} images evaluated with {predictor!r}, {metrics['n_skipped']} unreadable skipped")
    for k, v in metrics.items():
        if isinstance(v, float): print(f"{k:>18}: {v:.4f}")
    print(f"confusion matrix (rows true cat/dog): {metrics['confusion_matrix']}")
    if args.json: print(json.dumps(metrics))


# %%
tmp.cleanup()
