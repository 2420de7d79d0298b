# %%
#| default_exp inference

# %% [markdown]
# # Inference
#
# > A `Predictor` that loads a model artifact with the fastest backend that agrees with eager PyTorch, and `catsdogs_predict`.

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
# 4. applies the stored softmax temperature and, optionally, flip test-time augmentation.

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
from catsdogs.data import ImageError, decode_size, eval_transform, load_image
from catsdogs.model import ModelConfig, load_model

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_fail, test_close
from catsdogs.data import demo_data_dir
from catsdogs.model import build_model, export_artifact

# %%
#| export
logger = logging.getLogger("catsdogs.inference")

# %% [markdown]
# Examples run on a small untrained artifact in a temporary folder (its predictions are
# meaningless, but every backend must still agree with eager), and on the image sample.

# %%
tmp = tempfile.TemporaryDirectory()
artifact = export_artifact(build_model("small_cnn", pretrained=False), Path(tmp.name)/"model",
                           ModelConfig.for_backbone("small_cnn", image_size=96))
data_dir = demo_data_dir()
cat_jpg, dog_jpg = sorted((data_dir/"Cat").glob("cat.*.jpg"))[0], sorted((data_dir/"Dog").glob("dog.*.jpg"))[0]


# %% [markdown]
# ## One prediction

# %%
#| export
@dataclass
class Prediction:
    "The answer for one image: the label, its probability, every class's probability, and P(dog)."
    label: str
    confidence: float
    probabilities: dict[str, float]
    p_dog: float

    def to_dict(self) -> dict: return asdict(self)

def to_predictions(probs:np.ndarray, # (N, classes) probabilities
                   class_names:Sequence[str]=("cat", "dog")) -> list[Prediction]:
    "One `Prediction` per row of `probs`; the last class is the positive one (`dog`)."
    out = []
    for row in np.asarray(probs, dtype=np.float64):
        best = int(row.argmax())
        out.append(Prediction(class_names[best], float(row[best]), {c: float(p) for c, p in zip(class_names, row)}, float(row[-1])))
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
# ## Backends
#
# Each backend is a function from a float32 batch `(N, 3, H, W)` to logits `(N, classes)`.
# `default_threads` is the number of cores this process may use, unless the settings say otherwise.

# %%
#| export
BACKENDS = ("eager", "torchscript", "onnx")

def default_threads(threads:int=0) -> int:
    "`threads` if positive, else the cores this process may run on."
    if threads > 0: return threads
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1

def _eager_runner(model:torch.nn.Module) -> Callable:
    "Eager PyTorch in channels-last memory format (faster for convolutions on CPU)."
    model = model.to(memory_format=torch.channels_last)
    def run(x):
        with torch.inference_mode(): return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()
    return run

def _torchscript_runner(path:Path) -> Callable:
    "The traced TorchScript graph `model.ts`."
    module = torch.jit.load(str(path), map_location="cpu").eval()
    def run(x):
        with torch.inference_mode(): return module(torch.from_numpy(x)).numpy()
    return run

def _onnx_runner(path:Path, threads:int) -> Callable:
    "ONNX Runtime on `model.onnx`, `threads` intra-op threads that sleep rather than spin when idle."
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"images": x})[0]

def make_runner(backend:str, # One of `BACKENDS`
                model_dir:Path, # The artifact directory
                threads:int=0, # Intra-op threads; 0: one per core
                model:torch.nn.Module|None=None) -> Callable:
    "A `batch -> logits` function for `backend` on the artifact in `model_dir`."
    model_dir, threads = Path(model_dir), default_threads(threads)
    if backend == "eager": return _eager_runner(model if model is not None else load_model(model_dir)[0])
    files = {"torchscript": "model.ts", "onnx": "model.onnx"}
    if backend not in files: raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    if not (model_dir/files[backend]).exists(): raise FileNotFoundError(f"no {files[backend]} in {model_dir}")
    if backend == "torchscript": return _torchscript_runner(model_dir/files[backend])
    return _onnx_runner(model_dir/files[backend], threads)


# %% [markdown]
# All three give the same logits on the same batch:

# %%
x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
logits = {b: make_runner(b, artifact) for b in BACKENDS}
logits = {b: run(x) for b, run in logits.items()}
for b in BACKENDS: test_close(logits[b], logits["eager"], eps=1e-4)
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

def choose_backend(runners:dict[str, Callable], # Backend name -> runner; must include "eager"
                   batch:np.ndarray, # A few preprocessed images
                   temperature:float=1.0, atol:float=1e-3) -> tuple[str, dict[str, float]]:
    "The fastest runner whose probabilities match eager's within `atol`, and each one's time (batch 1 + batch 4, ms)."
    reference = softmax(runners["eager"](batch), temperature)
    timings = {}
    for name, run in runners.items():
        diff = float(np.abs(softmax(run(batch), temperature) - reference).max())
        if diff >= atol:
            logger.warning("backend %s differs from eager by %.1e (>= %.0e); not used", name, diff, atol); continue
        timings[name] = _time_ms(run, batch[:1]) + _time_ms(run, batch[:4])
    return min(timings, key=timings.get), timings


# %%
tf = eval_transform(96, 0.875)
batch = torch.stack([tf(im) for im in calibration_images()]).numpy()
runners = {b: make_runner(b, artifact) for b in BACKENDS}
best, timings = choose_backend(runners, batch)
test_eq(best in BACKENDS, True)
broken = {**runners, "onnx": lambda x: runners["onnx"](x) + np.array([0.0, 1.0], dtype=np.float32)}  # a backend that disagrees is never chosen
test_eq("onnx" in choose_backend(broken, batch)[1], False)
best, timings


# %% [markdown]
# ## The predictor

# %%
#| export
class Predictor:
    "A model artifact ready to predict: its backend, preprocessing, temperature and optional flip TTA."
    def __init__(self, model_dir:Path, # Artifact directory written by `export_artifact`
                 backend:str="auto", # `auto`, `eager`, `torchscript` or `onnx`
                 tta:bool=False, # Average the image's and its mirror's probabilities
                 threads:int=0, # Inference threads; 0: one per core
                 max_pixels:int|None=None): # Refuse larger images before decoding
        self.model_dir = Path(model_dir)
        self.config = check_artifact(self.model_dir)
        self.tta, self.max_pixels, self.threads = tta, max_pixels, default_threads(threads)
        torch.set_num_threads(self.threads)
        self.draft_size = decode_size(self.config.image_size, self.config.crop_fraction)
        self.transform = eval_transform(self.config.image_size, self.config.crop_fraction, self.config.mean, self.config.std)
        self.model_version = hashlib.sha256((self.model_dir/"model_config.json").read_bytes()
                                            + (self.model_dir/"weights.pt").read_bytes()).hexdigest()[:12]
        self.backend, self.timings = self._load(backend)

    @classmethod
    def from_settings(cls, settings:Settings|None=None) -> Predictor:
        "A predictor configured by `Settings` (model_dir, backend, tta, threads, max_image_pixels)."
        s = settings or Settings()
        return cls(s.model_dir, s.backend, s.tta, s.threads, s.max_image_pixels)

    def __repr__(self):
        return f"Predictor({self.config.architecture}, backend={self.backend}, tta={self.tta}, version={self.model_version})"


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
    best, timings = choose_backend(runners, calibration, self.config.temperature)
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

def probabilities(self:Predictor, batch:torch.Tensor|np.ndarray) -> np.ndarray:
    "Calibrated class probabilities `(N, classes)` for a preprocessed batch, averaged with the mirror image under TTA."
    x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
    if not self.tta: return softmax(self.run(x), self.config.temperature)
    probs = softmax(self.run(np.concatenate([x, x[..., ::-1]])), self.config.temperature)
    return (probs[:len(x)] + probs[len(x):]) / 2

def predict_tensors(self:Predictor, batch:torch.Tensor|np.ndarray) -> list[Prediction]:
    "One `Prediction` per preprocessed image in `batch`."
    return to_predictions(self.probabilities(batch), self.config.class_names)

def predict(self:Predictor, source:Path|str|bytes) -> Prediction:
    "The prediction for one image file (path or bytes)."
    return self.predict_tensors(self.preprocess(source)[None])[0]

def predict_batch(self:Predictor, sources:Sequence[Path|str|bytes], batch_size:int=32) -> list[Prediction]:
    "Predictions for several images, `batch_size` per forward pass; raises `ImageError` on the first bad one."
    out = []
    for i in range(0, len(sources), batch_size):
        out += self.predict_tensors(torch.stack([self.preprocess(s) for s in sources[i:i + batch_size]]))
    return out

for f in (preprocess, probabilities, predict_tensors, predict, predict_batch): setattr(Predictor, f.__name__, f)

# %%
one = predictor.predict(cat_jpg)
both = predictor.predict_batch([cat_jpg, dog_jpg.read_bytes()])
test_close(both[0].p_dog, one.p_dog, eps=1e-5)
test_eq(one.label, max(one.probabilities, key=one.probabilities.get))
test_fail(lambda: predictor.predict(b"not an image"), contains="not an image")
both

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
_PREDICT_FLAGS = ["model_dir", "backend", "tta", "threads", "max_image_pixels"]

def _predict_line(path:str, result:Prediction|ImageError, as_json:bool) -> str:
    "The output line for one input: its prediction, or its error."
    if as_json:
        body = {"path": path, **result.to_dict()} if isinstance(result, Prediction) else {"path": path, "error": str(result)}
        return json.dumps(body)
    if isinstance(result, Prediction): return f"{path}: {result.label} {result.confidence:.3f} (p_dog={result.p_dog:.3f})"
    return f"{path}: error: {result}"

def predict_files(predictor:Predictor, paths:Sequence[str], batch_size:int=32) -> list[Prediction|ImageError]:
    "A prediction or an `ImageError` for every path, in order; good images are batched."
    results: list = [None] * len(paths)
    for start in range(0, len(paths), batch_size):
        tensors = {}
        for i in range(start, min(start + batch_size, len(paths))):
            try: tensors[i] = predictor.preprocess(paths[i])
            except (ImageError, OSError) as e: results[i] = e if isinstance(e, ImageError) else ImageError("unreadable file", str(e))
        if tensors:
            for i, p in zip(tensors, predictor.predict_tensors(torch.stack(list(tensors.values())))): results[i] = p
    return results

def predict_cli(argv:list[str]|None=None) -> int:
    "Console script `catsdogs_predict IMG... [--model DIR] [--json] [--backend B] [--tta]`."
    parser = settings_parser("Predict cat or dog for image files.", _PREDICT_FLAGS)
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

# %%
tmp.cleanup()
