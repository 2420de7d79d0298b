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
# 2. runs one of four **backends**: `onnx` (ONNX Runtime), `openvino` (Intel's OpenVINO, which
#    reads the same `model.onnx`, in `f32` or, on CPUs with bf16 units, `bf16`), and the two that
#    need PyTorch, `eager` and `torchscript`. `auto` measures the two engines that need no
#    PyTorch at load and keeps the fastest that agrees with the reference on the check photos
#    (below);
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

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from catsdogs.config import MODEL_SOURCE, InferenceSettings, Settings, parse_settings, settings_parser
from catsdogs.presets import ImageError, ModelConfig, OpenSetConfig, Preset

# %%
#| hide
import contextlib, io
import mlflow
import torch
from fastcore.test import test_eq, test_fail, test_close
from catsdogs.presets import demo_data_dir
from catsdogs.model import demo_artifact

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
# ## Backends
#
# Each backend is a function from a float32 batch `(N, 3, H, W)` to a tuple: logits
# `(N, classes)` and, when the artifact has a fitted open-set head, its score `(N,)`.
# `default_threads` is the number of cores this process may use, unless the settings say
# otherwise. ONNX Runtime's threads sleep rather than spin when idle, and OpenVINO's are not
# pinned to cores, so both leave the cores to image decoding between batches. OpenVINO runs a
# single stream with `threads` threads: one batch at a time, which is how the service feeds it
# (the micro-batcher makes the batches; see the batching notebook).

# %%
#| export
BACKENDS = ("onnx", "openvino", "eager", "torchscript")
AUTO_BACKENDS = ("onnx", "openvino")  # what `auto` chooses among: the engines that need no PyTorch
PRECISIONS = ("f32", "bf16")

def default_threads(threads:int=0) -> int:
    "`threads` if positive, else the cores this process may run on."
    if threads > 0: return threads
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1

@functools.cache  # the CPU does not change: ask once per process
def openvino_precisions() -> tuple[str, ...]:
    "What OpenVINO's CPU plugin computes in on this machine: `f32`, and `bf16` where the CPU has bf16 units (AMX, AVX-512 BF16)."
    import openvino as ov
    return ("f32", "bf16") if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else ("f32",)

def _numpy_outputs(out) -> tuple:
    "A graph's output(s) as a tuple of NumPy arrays."
    return tuple(o.numpy() for o in out) if isinstance(out, (tuple, list)) else (out.numpy(),)

def _eager_runner(model_dir:Path, threads:int) -> Callable:
    "Eager PyTorch in channels-last memory format (faster for convolutions on CPU)."
    import torch
    from catsdogs.model import load_model
    torch.set_num_threads(threads)
    model = load_model(model_dir)[0].to(memory_format=torch.channels_last)
    forward = model.forward_open_set if model.open_set is not None and model.open_set.bank.numel() > 0 else model
    def run(x):
        with torch.inference_mode(): return _numpy_outputs(forward(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)))
    return run

def _torchscript_runner(path:Path, threads:int) -> Callable:
    "The traced TorchScript graph `model.ts`."
    import torch
    torch.set_num_threads(threads)
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
    options.enable_mem_pattern = False  # measured: a plan per batch size held 567 MB after a batch of 16, without it 390 MB, no slower
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    return lambda x: tuple(session.run(outputs, {"images": x}))

def _openvino_runner(path:Path, threads:int, precision:str) -> Callable:
    "OpenVINO on `model.onnx`: one stream of `threads` unpinned threads, computing in `precision`."
    import openvino as ov
    if precision not in openvino_precisions():
        raise ValueError(f"OpenVINO has no {precision} on this CPU (it offers {', '.join(openvino_precisions())})")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
                                                           "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False})
    request, lock = compiled.create_infer_request(), threading.Lock()
    def run(x):
        with lock:  # one request, reused; its output buffers are copied out before the next call
            result = request.infer({0: x})
            return tuple(np.array(result[o]) for o in compiled.outputs)
    return run

_FILES = {"onnx": "model.onnx", "openvino": "model.onnx", "torchscript": "model.ts", "eager": "weights.pt"}

def make_runner(backend:str, # One of `BACKENDS`
                model_dir:Path, # The artifact directory
                threads:int=0, # Inference threads; 0: one per core
                precision:str="f32") -> Callable: # `f32`, or `bf16` (OpenVINO only)
    "A `batch -> (logits, open-set score)` function for `backend` on the artifact in `model_dir` (logits alone without an open-set head)."
    model_dir, threads = Path(model_dir), default_threads(threads)
    if backend not in BACKENDS: raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    if precision not in PRECISIONS: raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS} or 'auto'")
    if precision != "f32" and backend != "openvino": raise ValueError(f"{backend} runs in f32 only; {precision} needs --backend openvino")
    if not (model_dir/_FILES[backend]).is_file(): raise FileNotFoundError(f"no {_FILES[backend]} in {model_dir}")
    if backend == "eager": return _eager_runner(model_dir, threads)
    if backend == "torchscript": return _torchscript_runner(model_dir/_FILES[backend], threads)
    if backend == "openvino": return _openvino_runner(model_dir/_FILES[backend], threads, precision)
    return _onnx_runner(model_dir/_FILES[backend], threads)


# %% [markdown]
# All four give the same logits on the same batch, to float32 rounding:

# %%
x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
outputs = {b: make_runner(b, artifact)(x) for b in BACKENDS}
for b in BACKENDS:
    test_eq(len(outputs[b]), 2)  # logits and the open-set score
    for got, expected in zip(outputs[b], outputs["eager"]): test_close(got, expected, eps=1e-4)
test_fail(lambda: make_runner("tensorrt", artifact), contains="choose one of")
test_fail(lambda: make_runner("onnx", artifact, precision="bf16"), contains="needs --backend openvino")
{b: o[0][0].round(4) for b, o in outputs.items()}, openvino_precisions()


# %% [markdown]
# ## Choosing a backend
#
# `auto` chooses by measurement, on the machine that serves, never by assumption about its
# CPU. The candidates are ONNX Runtime and OpenVINO in each precision the CPU offers (eager and
# TorchScript would load PyTorch into the process, and were never the fastest). Each must first
# **agree** with the reference, ONNX Runtime in f32 (which the export checked against eager
# PyTorch), on the artifact's check photos:
# real validation cats and dogs written by training (older artifacts without them get synthetic
# patterns, and a warning):
#
# - an **f32** engine computes the same function in a different order: its probabilities (and
#   the open-set score, compared as `s / (1 + |s|)`) must match within `atol` = 1e-3;
# - a **bf16** engine rounds every activation to 8 significant bits. Measured on an
#   AMX Xeon with the default model (EfficientNet-Lite0, 288 px), that moves calibrated
#   probabilities by up to 0.039, with every label unchanged; an element-wise 1e-3 would refuse
#   it for no loss of accuracy. It must agree within `reduced_atol` = 0.05 on the probabilities
#   and on `p_cat_or_dog`, and give the same answer (cat, dog or neither) on every photo,
#   except one the reference itself places within 0.05 of a decision boundary (such a photo is
#   a coin flip, and rounding may flip it).
#
# Then each agreeing candidate is **timed** on a batch of one and a batch of eight (warm-up
# first, within a small time budget, so a slow engine cannot hold up start-up), and the fastest
# by the sum is kept. A candidate that fails to load or disagrees is skipped, with the reason
# logged.

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

def check_batch(model_dir:Path, preset:Preset) -> tuple[np.ndarray, bool]:
    "The artifact's check photos, preprocessed, and True; or synthetic patterns and False for an artifact without them."
    paths = sorted(p for p in (Path(model_dir)/"check_images").glob("*") if p.is_file())
    if paths: return np.stack([preset.eval_array(preset.load(p)) for p in paths]), True
    return np.stack([preset.eval_array(im) for im in calibration_images(8)]), False

def _time_ms(run:Callable, x:np.ndarray, repeat:int=5, budget_s:float=0.5) -> float:
    "Median wall time of `run(x)` in ms after a warm-up call: `repeat` runs, fewer if they pass `budget_s`."
    run(x)
    times, spent = [], 0.0
    while len(times) < repeat and (not times or spent < budget_s):
        start = time.perf_counter(); run(x); times.append(time.perf_counter() - start); spent += times[-1]
    return float(np.median(times)) * 1000

def _compared(outputs:tuple, temperature:float, open_set:OpenSetConfig|None) -> np.ndarray:
    "What f32 backends must agree on: class probabilities and, with an open-set head, its score (relative to its size)."
    probs = softmax(outputs[0], temperature)
    if open_set is None or len(outputs) < 2: return probs
    score = np.asarray(outputs[1], dtype=np.float64)
    return np.c_[probs, score / (1 + np.abs(score))]  # the raw score: p_cat_or_dog of test patterns is ~0 and hides differences

def _in_batches(run:Callable, x:np.ndarray, size:int=8) -> tuple:
    "`run` on `x` in batches of `size` (a serving-sized batch: the engines' memory stays what serving needs), outputs joined."
    parts = [run(np.ascontiguousarray(x[i:i + size])) for i in range(0, len(x), size)]
    return tuple(np.concatenate(outputs) for outputs in zip(*parts))

def _disagreement(got:tuple, reference:tuple, temperature:float, open_set:OpenSetConfig|None,
                  reduced:bool, atol:float, reduced_atol:float) -> str|None:
    "Why `got` does not agree with `reference` (the rules above), or None when it does."
    if len(got) != len(reference) or got[0].shape != reference[0].shape: return "outputs of another shape"
    if not reduced:
        diff = float(np.abs(_compared(got, temperature, open_set) - _compared(reference, temperature, open_set)).max())
        return None if diff < atol else f"differs by {diff:.1e} (>= {atol:.0e})"
    p, p_ref = softmax(got[0], temperature), softmax(reference[0], temperature)
    diffs = {"probabilities": np.abs(p - p_ref).max()}
    flips = (p.argmax(1) != p_ref.argmax(1)) & (np.abs(p_ref.max(1) - 0.5) > reduced_atol)
    if open_set is not None and len(got) > 1:
        q, q_ref = open_set.probability(got[1]), open_set.probability(reference[1])
        diffs["p_cat_or_dog"] = np.abs(q - q_ref).max()
        flips |= ((q >= open_set.threshold) != (q_ref >= open_set.threshold)) & (np.abs(q_ref - open_set.threshold) > reduced_atol)
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > reduced_atol: return f"{worst} differ by {diffs[worst]:.3f} (> {reduced_atol})"
    if flips.any(): return f"{int(flips.sum())} answer(s) differ"
    return None

def choose_backend(runners:dict[str, Callable], # "backend/precision" -> runner
                   batch:np.ndarray, # The check photos, preprocessed
                   reference:str, # The runner the others must agree with
                   temperature:float=1.0,
                   open_set:OpenSetConfig|None=None, # Compare p_cat_or_dog and the answers too
                   atol:float=1e-3, reduced_atol:float=0.05) -> tuple[str, dict[str, float]]:
    "The fastest runner that agrees with `reference`, and each agreeing one's time (batch 1 + batch 8, ms)."
    expected = _in_batches(runners[reference], batch)
    timings = {}
    for name, run in runners.items():
        reason = _disagreement(_in_batches(run, batch), expected, temperature, open_set, not name.endswith("/f32"), atol, reduced_atol)
        if reason: logger.warning("backend %s %s against %s on the check photos; not used", name, reason, reference); continue
        timings[name] = _time_ms(run, batch[:1]) + _time_ms(run, batch[:8])
    return min(timings, key=timings.get), timings


# %%
batch, real = check_batch(artifact, preset)
test_eq((batch.shape, real), ((8, 3, 96, 96), True))
test_eq([im.size for im in calibration_images(2)], [(300, 160), (270, 200)])  # the stand-ins for an artifact without check photos
runners = {f"{b}/f32": make_runner(b, artifact) for b in BACKENDS}
best, timings = choose_backend(runners, batch, "eager/f32", open_set=config.open_set)
test_eq(best in runners, True)
onnx = runners["onnx/f32"]
broken = {**runners, "onnx/f32": lambda x: (onnx(x)[0] + np.array([0.0, 1.0], dtype=np.float32), onnx(x)[1])}  # a backend that disagrees is never chosen
test_eq("onnx/f32" in choose_backend(broken, batch, "eager/f32")[1], False)
shifted = {**runners, "onnx/f32": lambda x: (onnx(x)[0], onnx(x)[1] + 0.5)}  # nor one whose open-set score is off
test_eq("onnx/f32" in choose_backend(shifted, batch, "eager/f32", open_set=config.open_set)[1], False)
best, timings

# %% [markdown]
# The reduced-precision rule, on a stand-in for bf16 (this machine's CPU may have no bf16
# units): logits moved by 0.01 pass, where the f32 rule would refuse them; logits moved by 0.5
# do not, nor a score shifted across the "neither" threshold.

# %%
nudged = {**runners, "openvino/bf16": lambda x: (onnx(x)[0] + np.float32(0.01), onnx(x)[1] - np.float32(0.01))}
test_eq("openvino/bf16" in choose_backend(nudged, batch, "eager/f32", open_set=config.open_set)[1], True)
test_eq(_disagreement(nudged["openvino/bf16"](batch), onnx(batch), 1.0, config.open_set, False, 1e-3, 0.05) is None, False)
far = {**runners, "openvino/bf16": lambda x: (onnx(x)[0] + np.array([0, 0.5], dtype=np.float32), onnx(x)[1])}
test_eq("openvino/bf16" in choose_backend(far, batch, "eager/f32", open_set=config.open_set)[1], False)
ref = onnx(batch)
flipped = (ref[0], ref[1] + np.float32(50) * np.sign(np.float32(config.open_set.threshold) - config.open_set.probability(ref[1])).astype(np.float32))
_disagreement(flipped, ref, 1.0, config.open_set, True, 1e-3, 0.05)


# %% [markdown]
# ## The predictor

# %%
#| export
class Predictor:
    "A model artifact ready to predict: its engine, preprocessing, temperature, open-set threshold and optional flip TTA."
    def __init__(self, model_dir:Path, # Artifact directory written by `export_artifact`
                 backend:str="auto", # `auto` or one of `BACKENDS`
                 tta:bool=False, # Average the image's and its mirror's probabilities
                 threads:int=0, # Inference threads; 0: one per core
                 max_pixels:int|None=None, # Refuse larger images before decoding
                 open_set:bool=True, # Answer "neither" (when the artifact has an open-set head)
                 open_set_threshold:float|None=None, # Override the artifact's p_cat_or_dog threshold
                 precision:str="auto"): # `auto`, `f32` or `bf16` (OpenVINO)
        self.model_dir = Path(model_dir)
        self.config = check_artifact(self.model_dir)
        self.tta, self.max_pixels, self.threads = tta, max_pixels, default_threads(threads)
        self.open_set = self.config.open_set if open_set else None
        self.threshold = open_set_threshold if open_set_threshold is not None else getattr(self.open_set, "threshold", None)
        self.preset = Preset.from_config(self.config)
        self.registry: dict|None = None  # name, version, alias and run when loaded from the MLflow registry
        self.model_version = hashlib.sha256((self.model_dir/"model_config.json").read_bytes()
                                            + (self.model_dir/"weights.pt").read_bytes()).hexdigest()[:12]
        self.backend, self.precision, self.timings = self._load(backend, precision)

    @classmethod
    def from_settings(cls, settings:Settings|None=None) -> Predictor:
        "A predictor configured by `Settings` (model_dir, a folder or a `models:/` URI, backend, precision, tta, threads, ...)."
        s = settings or Settings()
        model_dir, registry = resolve_model(s.model_dir, s.mlflow_tracking_uri, s.cache_dir)
        predictor = cls(model_dir, s.backend, s.tta, s.threads, s.max_image_pixels, s.open_set, s.open_set_threshold, s.precision)
        predictor.registry = registry
        return predictor

    def __repr__(self):
        open_set = f"neither below p={self.threshold:.3f}" if self.open_set else "closed set"
        return (f"Predictor({self.config.architecture}, backend={self.backend}/{self.precision}, tta={self.tta}, {open_set}, "
                f"version={self.model_version})")

    def _candidates(self, backend:str, precision:str) -> list[tuple[str, str]]:
        "The (backend, precision) pairs that `backend` and `precision` (either may be `auto`) allow."
        backends = AUTO_BACKENDS if backend == "auto" else (backend,)
        out = []
        for b in backends:
            for p in (PRECISIONS if precision == "auto" else (precision,)):
                if p == "f32" or b == "openvino": out.append((b, p))
        if not out: raise ValueError(f"no backend runs {precision}: it needs --backend openvino or auto")
        return out

    def _load(self, backend:str, precision:str) -> tuple[str, str, dict[str, float]]:
        "Build the runner (choosing one when `backend` or `precision` is `auto`); returns the backend, precision and timings."
        candidates = self._candidates(backend, precision)
        if len(candidates) == 1:
            b, p = candidates[0]
            self.run = make_runner(b, self.model_dir, self.threads, p)
            return b, p, {}
        runners = {}
        for b, p in candidates:
            if b == "openvino" and p != "f32" and p not in _openvino_precisions_or_none(): continue  # not on this CPU
            try: runners[f"{b}/{p}"] = make_runner(b, self.model_dir, self.threads, p)
            except Exception as e:
                if b == "onnx" or (backend != "auto" and p == "f32"):  # the reference, or the one engine asked for, must load
                    raise RuntimeError(f"the {b} backend cannot load {self.model_dir/_FILES[b]}: {e}") from e
                logger.warning("backend %s/%s unavailable: %s", b, p, e)
        if not runners: raise RuntimeError(f"no backend could load the model in {self.model_dir}")
        reference = next(r for r in ("onnx/f32", "openvino/f32", *runners) if r in runners)
        batch, real = check_batch(self.model_dir, self.preset)
        if not real: logger.warning("%s has no check_images/: backends are compared on synthetic patterns", self.model_dir)
        best, timings = choose_backend(runners, batch, reference, self.config.temperature, self.config.open_set)
        self.run = runners[best]
        logger.info("backend auto: chose %s (%s ms for a batch of 1 plus a batch of 8; reference %s)", best,
                    ", ".join(f"{k} {v:.1f}" for k, v in sorted(timings.items(), key=lambda kv: kv[1])), reference)
        return *best.split("/"), timings

    def preprocess(self, source:Path|str|bytes,
                    max_pixels:int|None=None) -> np.ndarray: # Overrides the predictor's own limit
        "Decode `source` (path or bytes) with the artifact's preset: a `(3, H, W)` float32 array, or `ImageError`."
        return self.preset.eval_array(self.preset.load(source, max_pixels=max_pixels or self.max_pixels))

    def scores(self, batch:np.ndarray) -> tuple[np.ndarray, np.ndarray|None]:
        "Calibrated class probabilities `(N, classes)` and `p_cat_or_dog` `(N,)` (None when closed-set), averaged with the mirror under TTA."
        x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
        n = len(x)
        if self.tta: x = np.ascontiguousarray(np.concatenate([x, x[..., ::-1]]))
        outputs = self.run(x)
        probs = softmax(outputs[0], self.config.temperature)
        score = outputs[1] if self.open_set is not None and len(outputs) > 1 else None
        if self.tta:  # probabilities averaged, the open-set score too (before the sigmoid, the scale its threshold was set on)
            probs = (probs[:n] + probs[n:]) / 2
            if score is not None: score = (score[:n] + score[n:]) / 2
        return probs, None if score is None else self.open_set.probability(score)

    def probabilities(self, batch:np.ndarray) -> np.ndarray:
        "Calibrated class probabilities `(N, classes)` for a preprocessed batch, averaged with the mirror image under TTA."
        return self.scores(batch)[0]

    def predict_arrays(self, batch:np.ndarray) -> list[Prediction]:
        "One `Prediction` per preprocessed image in `batch` (`(N, 3, H, W)` float32)."
        probs, p_any = self.scores(batch)
        return to_predictions(probs, self.config.class_names, p_any, self.threshold if self.threshold is not None else 0.5)

    def predict(self, source:Path|str|bytes) -> Prediction:
        "The prediction for one image file (path or bytes)."
        return self.predict_arrays(self.preprocess(source)[None])[0]

    def predict_batch(self, sources:Sequence[Path|str|bytes], batch_size:int=32) -> list[Prediction]:
        "Predictions for several images, `batch_size` per forward pass; raises `ImageError` on the first bad one."
        out = []
        for i in range(0, len(sources), batch_size):
            out += self.predict_arrays(np.stack([self.preprocess(s) for s in sources[i:i + batch_size]]))
        return out

def _openvino_precisions_or_none() -> tuple[str, ...]:
    "`openvino_precisions()`, or nothing when OpenVINO is not installed."
    try: return openvino_precisions()
    except ImportError: return ()

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
                  cache_dir:Path|None=None) -> tuple[Path, dict|None]: # Where downloads go (default ~/.cache/catsdogs)
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
        dest = Path(cache_dir or Path.home()/".cache"/"catsdogs")/"models"/name/str(version.version)
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
            alias:str="champion", name:str="catsdogs", tracking_uri:str|None=None):
    "Point `alias` of registered model `name` at `version` (what `scripts/promote_model.py` runs)."
    from mlflow import MlflowClient
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, str(version))


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
test_fail(lambda: Predictor(artifact, backend="onnx", precision="bf16"), contains="needs --backend openvino")
predictor, predictor.timings

# %% [markdown]
# A folder that is not a model artifact fails with the reason, before any engine loads; the
# predictor runs on every core this process may use unless told otherwise:

# %%
test_eq(check_artifact(artifact).architecture, "small_cnn")
test_fail(lambda: check_artifact(Path(tmp.name)), contains="model_config.json is missing")
default_threads(), default_threads(3)

# %% [markdown]
# ## Predicting
#
# `Predictor.preprocess` is the only path from bytes to a model input, and
# `Predictor.predict_arrays` the only forward pass; `predict` and `predict_batch` join the
# two. The server calls the two halves separately: it decodes a batch of requests in parallel
# threads, then runs one forward pass.

# %%
#| echo: false
from nbdev.showdoc import show_doc
from IPython.display import display
for method in (Predictor.from_settings, Predictor.preprocess, Predictor.predict_arrays, Predictor.scores, Predictor.probabilities,
               Predictor.predict, Predictor.predict_batch):
    display(show_doc(method))

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
strict = Predictor(artifact, backend="onnx", open_set_threshold=1.0)
test_eq(strict.predict(cat_jpg).label, "neither")
closed = Predictor(artifact, backend="onnx", open_set=False)
answer = closed.predict(cat_jpg)
test_eq((answer.label, answer.p_cat_or_dog), (max(answer.probabilities, key=answer.probabilities.get), None))
strict, closed

# %% [markdown]
# With flip TTA the probabilities are the mean over the image and its mirror, and an image that
# is its own mirror gets the same answer either way:

# %%
tta = Predictor(artifact, backend="onnx", tta=True)
x = tta.preprocess(dog_jpg)[None]
plain = Predictor(artifact, backend="onnx")
test_close(tta.probabilities(x), (plain.probabilities(x) + plain.probabilities(np.ascontiguousarray(x[..., ::-1]))) / 2, eps=1e-6)
symmetric = np.ones((1, 3, 96, 96), dtype=np.float32)
test_close(tta.probabilities(symmetric), plain.probabilities(symmetric), eps=1e-6)


# %% [markdown]
# ## `catsdogs_predict`
#
# One line per image (`path: label confidence`), or one JSON object per line with `--json`.
# A file that is not a usable image gets an error line; the others are still predicted, and
# the exit code is 1 at the end.

# %%
#| export

def _predict_line(path:str, result:Prediction|ImageError, as_json:bool) -> str:
    "The output line for one input: its prediction, or its error."
    if as_json:
        body = {"path": path, **result.to_dict()} if isinstance(result, Prediction) else {"path": path, "error": str(result)}
        return json.dumps(body)
    if isinstance(result, ImageError): return f"{path}: error: {result}"
    open_set = "" if result.p_cat_or_dog is None else f", p_cat_or_dog={result.p_cat_or_dog:.3f}"
    return f"{path}: {result.label} {result.confidence:.3f} (p_dog={result.p_dog:.3f}{open_set})"

def predict_files(predictor:Predictor, paths:Sequence[str|Path], batch_size:int=16,
                  progress:bool=False, desc:str="predicting") -> list[Prediction|ImageError]:
    "A prediction or an `ImageError` for every path, in order: decoded on the predictor's threads, batched, with a progress bar."
    from tqdm.auto import tqdm
    def decode(path):
        try: return predictor.preprocess(path)
        except ImageError as e: return e
        except OSError as e: return ImageError("unreadable file", str(e))
    results: list = []
    with ThreadPoolExecutor(predictor.threads) as pool, tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        chunks = (paths[i:i + batch_size] for i in range(0, len(paths), batch_size))
        pending = pool.map(decode, next(chunks, []))  # the next chunk decodes while this one runs
        while True:
            decoded = list(pending)
            if not decoded: break
            pending = pool.map(decode, next(chunks, []))
            good = [x for x in decoded if isinstance(x, np.ndarray)]
            answers = iter(predictor.predict_arrays(np.stack(good)) if good else [])
            results += [next(answers) if isinstance(x, np.ndarray) else x for x in decoded]
            bar.update(len(decoded))
    return results

def predict_cli(argv:list[str]|None=None) -> int:
    "Console script `catsdogs_predict IMG... [--model DIR] [--json] [--backend B] [--tta] [--no-open-set]`."
    parser = settings_parser("Predict cat, dog or neither for image files.", [InferenceSettings, *MODEL_SOURCE, "max_image_pixels"],
                             aliases={"--model": "model_dir"})
    parser.add_argument("images", nargs="+", help="Image files")
    parser.add_argument("--json", action="store_true", help="One JSON object per line")
    settings, args = parse_settings(parser, argv)
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
test_eq(Predictor(folder, backend="onnx").model_version, predictor.model_version)
facts

# %%
tmp.cleanup()
