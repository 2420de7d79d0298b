# %%
#| default_exp engines

# %% [markdown]
# # Engines
#
# > The engines a model artifact runs on (ONNX Runtime, OpenVINO, TorchScript, eager PyTorch) in f32, bf16 or int8, the choice of the fastest that agrees with the reference on this machine, and the int8 model that training quantizes and measures.

# %% [markdown]
# An **engine** is a backend and a precision, such as `onnx/f32` or `openvino/int8`: a
# function from a preprocessed float32 batch `(N, 3, H, W)` to the graph's outputs, the logits
# and, when the artifact has an open-set head, its score. The `Predictor` of the inference
# stage builds one engine at load time with `load_engine` and then only calls it; everything
# about images, calibration and answers lives there.
#
# | file in the artifact | engines |
# |---|---|
# | `model.onnx` | `onnx/f32`, `openvino/f32`, `openvino/bf16` (CPUs with bf16 units) |
# | `model.int8.onnx` | `onnx/int8`, `openvino/int8` |
# | `model.ts` | `torchscript/f32` (needs PyTorch) |
# | `weights.pt` | `eager/f32` (needs PyTorch) |
#
# Only the engines that need no PyTorch take part in `auto`, so `pip install "catsdogs[serve]"`
# is enough to serve. Quantizing needs the `onnx` package (in the `train` extra).

# %%
#| export
from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from catsdogs.config import InferenceSettings, TrainingSettings
from catsdogs.presets import ModelConfig, OpenSetConfig, Preset

# %%
#| hide
from onnx import TensorProto, helper, numpy_helper, load as load_onnx_graph, save as save_onnx_graph
from fastcore.test import test_eq, test_fail, test_close
from catsdogs.presets import demo_data_dir
from catsdogs.model import demo_artifact

# %%
#| export
logger = logging.getLogger("catsdogs.engines")

# %% [markdown]
# Examples run on a small untrained artifact in a temporary folder, its open-set head fitted on
# a few sample photos (its predictions are meaningless, but every engine must still agree
# with the reference), and on the image sample.

# %%
tmp = tempfile.TemporaryDirectory()
data_dir = demo_data_dir()
photos = sorted((data_dir/"Cat").glob("cat.*.jpg"))[:12] + sorted((data_dir/"Dog").glob("dog.*.jpg"))[:12]
artifact = demo_artifact(Path(tmp.name)/"model", "small_cnn", 96, check_images=photos[::3], open_set_photos=photos)
config = ModelConfig.load(artifact/"model_config.json")
preset = Preset.from_config(config)
sorted(p.name for p in artifact.iterdir())


# %% [markdown]
# Probabilities come from logits by a softmax with the artifact's temperature (fitted on the
# validation split at training time); the comparisons below are made on them, as the answers are.

# %%
#| export
def softmax(logits:np.ndarray, temperature:float=1.0) -> np.ndarray:
    "Class probabilities from logits, calibrated by dividing by `temperature` first."
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# %%
test_close(softmax(np.array([[0.0, 2.0]]), temperature=2.0)[0, 1], 1/(1 + np.exp(-1)), eps=1e-9)
softmax(np.array([[0.0, 2.0], [3.0, 0.0]]))

# %% [markdown]
# ## Engines
#
# Each engine is a function from a float32 batch `(N, 3, H, W)` to a tuple: logits
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
PRECISIONS = ("f32", "bf16", "int8")  # int8: the artifact's model.int8.onnx (see "int8" below)

def default_threads(threads:int=0) -> int:
    "`threads` if positive, else the cores this process may run on."
    if threads > 0: return threads
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1

@functools.cache
def openvino_core():
    "The process's one OpenVINO `Core`, kept until the process ends (see below for why)."
    import openvino as ov
    return ov.Core()

@functools.cache  # the CPU does not change: ask once per process
def openvino_precisions() -> tuple[str, ...]:
    "What OpenVINO's CPU plugin computes in on this machine: `f32`, and `bf16` where the CPU has bf16 units (AMX, AVX-512 BF16)."
    return ("f32", "bf16") if "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else ("f32",)

def _numpy_outputs(out) -> tuple:
    "A graph's output(s) as a tuple of NumPy arrays."
    return tuple(o.numpy() for o in out) if isinstance(out, (tuple, list)) else (out.numpy(),)

def _eager_runner(model_dir:Path, threads:int) -> Callable:
    "Eager PyTorch in channels-last memory format (faster for convolutions on CPU)."
    import torch
    from catsdogs.model import load_model
    torch.set_num_threads(threads)
    model, config = load_model(model_dir)
    model = model.to(memory_format=torch.channels_last)
    def run(x):  # the outputs of the exported graphs
        with torch.inference_mode():
            x = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return _numpy_outputs(model.exported(x, config.open_set is not None, config.heat_maps))
    return run

def _torchscript_runner(path:Path, threads:int) -> Callable:
    "The traced TorchScript graph `model.ts`."
    import torch
    torch.set_num_threads(threads)
    with warnings.catch_warnings():  # TorchScript stays one of the engines while PyTorch deprecates it
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load", category=FutureWarning)
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
    "OpenVINO on an ONNX graph: one stream of `threads` unpinned threads, computing in `precision` (int8: as the graph's QDQ nodes say)."
    if precision == "bf16" and precision not in openvino_precisions():
        raise ValueError(f"OpenVINO has no {precision} on this CPU (it offers {', '.join(openvino_precisions())})")
    hint = "bf16" if precision == "bf16" else "f32"  # int8 layers run in int8 whatever the hint; the rest stays f32
    compiled = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint,
                                                           "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False})
    request, lock = compiled.create_infer_request(), threading.Lock()
    def run(x):
        with lock:  # one request, reused; its output buffers are copied out before the next call
            result = request.infer({0: x})
            return tuple(np.array(result[o]) for o in compiled.outputs)
    return run

_FILES = {"onnx": "model.onnx", "openvino": "model.onnx", "torchscript": "model.ts", "eager": "weights.pt"}
INT8_FILE = "model.int8.onnx"

def engine_file(backend:str, precision:str="f32") -> str:
    "The artifact file that `backend` runs in `precision`."
    return INT8_FILE if precision == "int8" else _FILES[backend]

def make_runner(backend:str, # One of `BACKENDS`
                model_dir:Path, # The artifact directory
                threads:int=0, # Inference threads; 0: one per core
                precision:str="f32") -> Callable: # `f32`; `bf16` (OpenVINO); `int8` (ONNX Runtime or OpenVINO)
    "A `batch -> outputs` function for `backend` on the artifact in `model_dir`: logits, then the open-set score and the heat maps where the artifact has them."
    model_dir, threads = Path(model_dir), default_threads(threads)
    if backend not in BACKENDS: raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    if precision not in PRECISIONS: raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS} or 'auto'")
    if precision == "bf16" and backend != "openvino": raise ValueError(f"{backend} has no bf16; bf16 needs --backend openvino")
    if precision == "int8" and backend not in AUTO_BACKENDS: raise ValueError(f"{backend} has no int8; int8 needs --backend onnx or openvino")
    path = model_dir/engine_file(backend, precision)
    if not path.is_file():
        hint = " (quantize it: python scripts/quantize_model.py MODEL_DIR)" if precision == "int8" else ""
        raise FileNotFoundError(f"no {path.name} in {model_dir}{hint}")
    if backend == "eager": return _eager_runner(model_dir, threads)
    if backend == "torchscript": return _torchscript_runner(path, threads)
    if backend == "openvino": return _openvino_runner(path, threads, precision)
    return _onnx_runner(path, threads)


# %% [markdown]
# All four give the same outputs on the same batch, to float32 rounding. Rounding depends on
# the order of the sums, which differs between engines and with the thread count, so the
# comparison allows 1e-3 relative to the outputs' size, the same `atol` as the agreement rule
# below (the differences seen are about 1e-4 on logits of size 3).

# %% [markdown]
# Every OpenVINO engine of a process compiles with `openvino_core`, one `Core` that lives as
# long as the process. OpenVINO's CPU plugin, when a `Core` loads it, gives the calling thread
# a larger alternate signal stack (signal frames on CPUs with AMX tiles outgrow the usual
# one), and when the `Core` is released it unmaps that stack, putting the previous one back
# only if it is released on the same thread and in the reverse order of creation. With a
# `Core` per engine neither holds: `auto` builds several engines and keeps one, and Python's
# garbage collector may release an engine on any thread. The thread that compiled would be
# left with an unmapped signal stack, and the next signal with a handler (Python installs its
# handlers to run on that stack) would kill the process with SIGSEGV, before even
# `faulthandler` could say where. `tests/test_engines.py` builds and drops engines in that order, across threads, then
# raises a signal, in a process of its own.

# %%
test_eq(openvino_core() is openvino_core(), True)
test_eq(default_threads(3), 3)
test_eq((engine_file("onnx"), engine_file("openvino", "int8"), engine_file("eager")), ("model.onnx", "model.int8.onnx", "weights.pt"))
default_threads(), openvino_precisions()

# %%
x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
outputs = {b: make_runner(b, artifact)(x) for b in BACKENDS}
for b in BACKENDS:
    test_eq(len(outputs[b]), 3)  # logits, the open-set score and the heat maps
    for got, expected in zip(outputs[b], outputs["eager"]): test_close(got / (1 + np.abs(expected)), expected / (1 + np.abs(expected)), eps=1e-3)
test_fail(lambda: make_runner("tensorrt", artifact), contains="choose one of")
test_fail(lambda: make_runner("onnx", artifact, precision="bf16"), contains="needs --backend openvino")
test_fail(lambda: make_runner("onnx", artifact, precision="int8"), contains="no model.int8.onnx")
{b: o[0][0].round(4) for b, o in outputs.items()}, openvino_precisions()


# %% [markdown]
# ## Choosing an engine
#
# `auto` chooses by measurement, on the machine that serves, never by assumption about its
# CPU. The candidates are ONNX Runtime and OpenVINO in f32, OpenVINO in bf16 where the CPU has
# bf16 units, and both in int8 when the artifact has an int8 model whose stored validation
# figures are within the settings' tolerance (see "int8" below). Eager and TorchScript would
# load PyTorch into the process, and were never the fastest. Each must first
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
# - an **int8** engine rounds activations to 256 levels per tensor and weights per channel.
#   Its accuracy was measured against f32 on the whole validation split when it was made
#   (stored in the artifact); here it has to show that this CPU computes what was measured.
#   Rounding moves a few photos near a decision boundary a lot and the rest hardly at all, so
#   the rule compares the *mean* difference, within 0.025, on the probabilities and on
#   `p_cat_or_dog`, and every answer must agree as for bf16. Measured with the default model on
#   its 32 check photos (`bench_engines.py` prints the differences), on an AMD EPYC without
#   VNNI: its int8 model moved probabilities by 0.006 on average on ONNX Runtime and 0.007 on
#   OpenVINO (0.13 and 0.21 at most), with no answer changed; with 7-bit depthwise weights, by
#   0.026 and 0.015, and this rule refused the first; a model with full-range 8-bit weights,
#   whose sums overflow on such a CPU, moved them by 0.04 on average and changed two answers.
#   On an AMD EPYC Zen 4 with VNNI (2026-12-07, a model trained there by the same command),
#   by 0.006 and 0.003 (0.17 and 0.10 at most), no answer changed.
#
# Then the agreeing candidates are **timed** on a batch of one and a batch of eight, after a
# warm-up, taking turns round after round (three to seven rounds, about two seconds), and the
# fastest by the median of the sums is kept. Timed one after the other instead, `auto` chose
# ONNX Runtime f32 in one of two start-ups on a shared 2-core machine, where OpenVINO int8's
# ceiling in the same run was 1.4x higher: a burst of other work slows whichever engine runs
# during it. A candidate that fails to load or disagrees is skipped, with the reason logged.

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
    return (preset.stack(paths), True) if paths else (preset.stack(calibration_images(8)), False)

def _timings_ms(runners:dict[str, Callable], batch:np.ndarray, rounds:int=7, budget_s:float=2.0) -> dict[str, float]:
    """Each runner's median time (ms) for a batch of one plus a batch of eight, after a warm-up: the runners take turns, round
    after round, so that other work on the machine slows them alike; `rounds` rounds, fewer (at least three) past `budget_s`."""
    one, eight = np.ascontiguousarray(batch[:1]), np.ascontiguousarray(batch[:8])
    for run in runners.values(): run(one); run(eight)
    times, start = {name: [] for name in runners}, time.perf_counter()
    for i in range(rounds):
        for name, run in runners.items():
            begin = time.perf_counter(); run(one); run(eight); times[name].append(time.perf_counter() - begin)
        if i >= 2 and time.perf_counter() - start > budget_s: break
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}

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

TOLERANCES = {"f32": 1e-3, "bf16": 0.05, "int8": 0.025}  # the agreement rule's atol of each precision (above)

def _disagreement(got:tuple, reference:tuple, temperature:float, open_set:OpenSetConfig|None,
                  reduced:bool, atol:float, reduced_atol:float,
                  mean:bool=False) -> str|None: # Compare the mean difference (int8) rather than the largest
    "Why `got` does not agree with `reference` (the rules above), or None when it does."
    if len(got) != len(reference) or got[0].shape != reference[0].shape: return "outputs of another shape"
    if not reduced:
        diff = float(np.abs(_compared(got, temperature, open_set) - _compared(reference, temperature, open_set)).max())
        return None if diff < atol else f"differs by {diff:.1e} (>= {atol:.0e})"
    p, p_ref = softmax(got[0], temperature), softmax(reference[0], temperature)
    statistic = np.mean if mean else np.max
    diffs = {"probabilities": statistic(np.abs(p - p_ref).max(1))}
    flips = (p.argmax(1) != p_ref.argmax(1)) & (np.abs(p_ref.max(1) - 0.5) > reduced_atol)
    if open_set is not None and len(got) > 1:
        q, q_ref = open_set.probability(got[1]), open_set.probability(reference[1])
        diffs["p_cat_or_dog"] = statistic(np.abs(q - q_ref))
        flips |= ((q >= open_set.threshold) != (q_ref >= open_set.threshold)) & (np.abs(q_ref - open_set.threshold) > reduced_atol)
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > reduced_atol: return f"{worst} differ by {diffs[worst]:.3f}{' on average' if mean else ''} (> {reduced_atol})"
    if flips.any(): return f"{int(flips.sum())} answer(s) differ"
    return None

def choose_backend(runners:dict[str, Callable], # "backend/precision" -> runner
                   batch:np.ndarray, # The check photos, preprocessed
                   reference:str, # The runner the others must agree with
                   temperature:float=1.0,
                   open_set:OpenSetConfig|None=None, # Compare p_cat_or_dog and the answers too
                   tolerances:dict[str, float]=TOLERANCES) -> tuple[str, dict[str, float]]: # precision -> atol
    "The fastest runner that agrees with `reference`, and each agreeing one's time (batch 1 + batch 8, ms)."
    expected = _in_batches(runners[reference], batch)
    agreeing = {}
    for name, run in runners.items():
        precision = name.split("/")[1]
        reason = _disagreement(_in_batches(run, batch), expected, temperature, open_set, precision != "f32",
                               tolerances["f32"], tolerances[precision], mean=precision == "int8")
        if reason: logger.warning("engine %s %s against %s on the check photos; not used", name, reason, reference); continue
        agreeing[name] = run
    timings = _timings_ms(agreeing, batch)
    return min(timings, key=timings.get), timings


# %%
batch, real = check_batch(artifact, preset)
test_eq((batch.shape, real), ((8, 3, 96, 96), True))
test_eq([im.size for im in calibration_images(2)], [(300, 160), (270, 200)])  # the stand-ins for an artifact without check photos
runners = {f"{b}/f32": make_runner(b, artifact) for b in BACKENDS}
best, timings = choose_backend(runners, batch, "eager/f32", open_set=config.open_set)
test_eq(best in runners, True)
onnx = runners["onnx/f32"]
def altered(logits=0.0, score=0.0):
    "ONNX Runtime's outputs with `logits` and `score` added: a stand-in for an engine that computes them differently."
    return lambda x: (lambda out: (out[0] + np.float32(logits), out[1] + np.float32(score), *out[2:]))(onnx(x))
broken = {**runners, "onnx/f32": altered(logits=np.array([0.0, 1.0]))}  # a backend that disagrees is never chosen
test_eq("onnx/f32" in choose_backend(broken, batch, "eager/f32")[1], False)
shifted = {**runners, "onnx/f32": altered(score=0.5)}  # nor one whose open-set score is off
test_eq("onnx/f32" in choose_backend(shifted, batch, "eager/f32", open_set=config.open_set)[1], False)
best, timings

# %% [markdown]
# The reduced-precision rule, on a stand-in for bf16 (this machine's CPU may have no bf16
# units): logits moved by 0.01 pass, where the f32 rule would refuse them; logits moved by 0.5
# do not, nor a score shifted across the "neither" threshold.

# %%
nudged = {**runners, "openvino/bf16": altered(logits=0.01, score=-0.01)}
test_eq("openvino/bf16" in choose_backend(nudged, batch, "eager/f32", open_set=config.open_set)[1], True)
test_eq(_disagreement(nudged["openvino/bf16"](batch), onnx(batch), 1.0, config.open_set, False, 1e-3, 0.05) is None, False)
far = {**runners, "openvino/bf16": altered(logits=np.array([0, 0.5]))}
test_eq("openvino/bf16" in choose_backend(far, batch, "eager/f32", open_set=config.open_set)[1], False)
ref = onnx(batch)
flipped = (ref[0], ref[1] + np.float32(50) * np.sign(np.float32(config.open_set.threshold) - config.open_set.probability(ref[1])).astype(np.float32))
_disagreement(flipped, ref, 1.0, config.open_set, True, 1e-3, 0.05)



# %% [markdown]
# ## Loading an engine
#
# `load_engine` turns the settings' `backend` and `precision` (either may be `auto`) into one
# engine. One named engine is built as asked, and fails loudly if it cannot load. With `auto`,
# every candidate is built (one that cannot load is skipped with a warning, except the
# reference, ONNX Runtime f32, which a lean install must be able to run), compared on the
# check photos and timed, and the fastest that agrees is kept, with what was measured.

# %%
#| export
class Engine:
    "A loaded engine: `engine(batch)` runs it; `timings` holds what `auto` measured to choose it (empty when named)."
    def __init__(self, backend:str, precision:str, run:Callable, timings:dict[str, float]|None=None):
        self.backend, self.precision, self.run, self.timings = backend, precision, run, timings or {}

    @property
    def name(self) -> str: return f"{self.backend}/{self.precision}"
    def __call__(self, x:np.ndarray) -> tuple: return self.run(x)
    def __repr__(self): return f"Engine({self.name})"

def int8_rejection(config:ModelConfig, settings:InferenceSettings,
                   backend:str="onnx") -> str|None: # The engine that would run it
    "Why `auto` must not serve the artifact's int8 model on `backend` (not measured there, or beyond the settings' tolerance), or None."
    report = config.int8
    if not report: return "the artifact has no int8 measurement (quantize it with scripts/quantize_model.py)"
    if backend not in report: return f"the artifact has no int8 measurement on {backend} (quantize it again with scripts/quantize_model.py)"
    f32, int8 = report["f32"], report[backend]["int8"]
    drop = f32["accuracy"] - int8["accuracy"]
    if drop > settings.int8_max_accuracy_drop:
        return f"its validation accuracy on {backend} is {drop:.2%} below f32 (tolerance {settings.int8_max_accuracy_drop:.2%})"
    kept_drop = f32.get("open_set_kept", 1.0) - int8.get("open_set_kept", 1.0)
    if kept_drop > settings.int8_max_open_set_drop:
        return (f"on {backend} it keeps {kept_drop:.2%} fewer validation cats and dogs at the 'neither' threshold "
                f"(tolerance {settings.int8_max_open_set_drop:.2%})")
    return None

def engine_candidates(model_dir:Path, config:ModelConfig, settings:InferenceSettings) -> list[tuple[str, str]]:
    "The (backend, precision) pairs that the settings allow for this artifact on this CPU."
    backends = AUTO_BACKENDS if settings.backend == "auto" else (settings.backend,)
    precisions = PRECISIONS if settings.precision == "auto" else (settings.precision,)
    out = []
    for b in backends:
        for p in precisions:
            if p == "bf16" and (b != "openvino" or (settings.precision == "auto" and p not in _openvino_precisions_or_none())): continue
            if p == "int8" and (b not in AUTO_BACKENDS or (settings.precision == "auto" and not _int8_allowed(model_dir, config, settings, b))):
                continue
            out.append((b, p))
    if not out: raise ValueError(f"no backend runs {settings.precision} with --backend {settings.backend}: "
                                 "bf16 needs openvino, int8 needs onnx or openvino")
    return out

def _int8_allowed(model_dir:Path, config:ModelConfig, settings:InferenceSettings, backend:str) -> bool:
    "Whether `auto` may consider int8 on `backend` (the file is there and its stored figures are within tolerance); logs why not."
    if not (Path(model_dir)/INT8_FILE).is_file(): return False
    reason = int8_rejection(config, settings, backend)
    if reason: logger.warning("%s/int8 not considered: %s", backend, reason)
    return reason is None

def _openvino_precisions_or_none() -> tuple[str, ...]:
    "`openvino_precisions()`, or nothing when OpenVINO is not installed."
    try: return openvino_precisions()
    except ImportError: return ()

def load_engine(model_dir:Path, # The artifact directory
                config:ModelConfig, # Its `model_config.json`
                settings:InferenceSettings|None=None) -> Engine: # backend, precision, threads, int8 tolerance
    "The engine the settings ask for; with `auto`, the fastest candidate that agrees with the reference on the check photos."
    s, model_dir = settings or InferenceSettings(), Path(model_dir)
    candidates = engine_candidates(model_dir, config, s)
    if len(candidates) == 1:
        (b, p), = candidates
        try: return Engine(b, p, make_runner(b, model_dir, s.threads, p))
        except Exception as e: raise RuntimeError(f"the {b} backend cannot load {model_dir/engine_file(b, p)}: {e}") from e
    runners = {}
    for b, p in candidates:
        try: runners[f"{b}/{p}"] = make_runner(b, model_dir, s.threads, p)
        except Exception as e:
            if (b, p) == ("onnx", "f32") or (s.backend != "auto" and p == "f32"):  # the reference, or the one engine asked for, must load
                raise RuntimeError(f"the {b} backend cannot load {model_dir/engine_file(b, p)}: {e}") from e
            logger.warning("engine %s/%s unavailable: %s", b, p, e)
    if not runners: raise RuntimeError(f"no engine could load the model in {model_dir}")
    reference = next(r for r in ("onnx/f32", "openvino/f32", *runners) if r in runners)
    batch, real = check_batch(model_dir, Preset.from_config(config))
    if not real: logger.warning("%s has no check_images/: engines are compared on synthetic patterns", model_dir)
    best, timings = choose_backend(runners, batch, reference, config.temperature, config.open_set)
    logger.info("engine auto: chose %s (%s ms for a batch of 1 plus a batch of 8; reference %s)", best,
                ", ".join(f"{k} {v:.1f}" for k, v in sorted(timings.items(), key=lambda kv: kv[1])), reference)
    return Engine(*best.split("/"), runners[best], timings)


# %%
engine = load_engine(artifact, config)
test_eq(isinstance(engine, Engine) and len(engine(batch[:2])) == 3, True)
test_eq(set(engine.timings) >= {"onnx/f32", "openvino/f32"}, True)
test_eq(engine.name in engine.timings, True)
named = load_engine(artifact, config, InferenceSettings(backend="onnx", precision="f32"))
test_eq((named.name, named.timings), ("onnx/f32", {}))
test_fail(lambda: load_engine(artifact, config, InferenceSettings(backend="onnx", precision="bf16")), contains="bf16 needs openvino")
test_fail(lambda: load_engine(artifact, config, InferenceSettings(backend="eager", precision="int8")), contains="int8 needs onnx or openvino")
engine, engine.timings


# %% [markdown]
# ## int8
#
# The int8 model is `model.onnx` with static quantization in the QDQ format of ONNX Runtime's
# quantization tool: weights as signed integers, one scale per output channel; activations as
# unsigned 8-bit integers with one scale and zero point per tensor, calibrated by the minimum
# and maximum each tensor takes over `int8_calibration_images` training photos. Both ONNX
# Runtime and OpenVINO read the same file. The choices, measured on the default model
# (EfficientNet-Lite0, 288 px, trained on the sample):
#
# - **per-channel weights**: depthwise convolutions have channels whose ranges differ by
#   orders of magnitude; one scale per tensor flattens the small ones to zero;
# - **u8 activations, s8 weights**: the pair x86 CPUs multiply fastest (`VPMADDUBSW`, and
#   VNNI's `VPDPBUSD`);
# - **7-bit weights** (`reduce_range`), **but 8-bit in depthwise convolutions**: a CPU without
#   VNNI or AMX adds each pair of u8 x s8 products of a convolution or matrix product in 16
#   bits, which full 8-bit weights (up to 2 x 255 x 127) overflow; 7-bit weights (2 x 255 x 63)
#   never do, so the int8 model computes the same function on every x86 CPU and the figures
#   measured where it was made hold where it is served. Measured without VNNI with the default
#   model (`benchmarks/bench_int8_recipes.py`, table below), full 8-bit weights lost two points
#   of validation accuracy on both engines, and s8 activations did not save them on OpenVINO
#   and made ONNX Runtime no faster than f32;
# - **the first and last layers in float**: 7-bit weights alone lost a point. Kept in float32,
#   the stem convolution that reads the pixels, the backbone's last convolution and the linear
#   heads (`int8_float_nodes`), a small share of the compute, brought it back;
# - **8-bit weights in the depthwise convolutions** (one small kernel per channel): on the CPU
#   without VNNI they showed no sign of overflow, and they cut the validation log loss (f32:
#   0.0087) from 0.0223 to 0.0184 on ONNX Runtime and from 0.0291 to 0.0179 on OpenVINO, and
#   the check photos' mean difference from 0.026 to 0.006 and from 0.015 to 0.007
#   (`bench_engines.py`); one validation photo changed sides each way, so ONNX Runtime's
#   validation accuracy fell by 0.47 point (99.05%) and OpenVINO's rose to f32's 99.53%;
# - **MinMax calibration** on a few hundred training photos;
# - **the heat maps' own nodes in float**: the nodes that only the `maps` output needs
#   (`maps_only_nodes`) stay float32. They are a few small matrix products, and their masks
#   hold `-inf`, which no int8 range can represent.
#
# `python benchmarks/bench_int8_recipes.py --model artifacts/model --prepared artifacts/data`
# on 2026-12-06, AMD EPYC without VNNI or AMX, 2 threads, 256 calibration photos, the 211
# validation photos (images/s: the forward pass alone, one run, while the machine's other work
# moved f32's figure from 99 to 66 between two runs: compare the accuracy columns):
#
# | recipe | engine | val accuracy | log loss | kept at threshold | labels agree | max prob. diff | images/s (batch 8) |
# |---|---|---|---|---|---|---|---|
# | f32 | onnx | 99.53% | 0.0087 | 99.05% | | | 66 |
# | 8-bit weights | onnx | 97.63% | 0.1650 | 97.63% | 98.10% | 1.000 | 83 |
# | f32 | openvino | 99.53% | 0.0087 | 99.05% | | | 53 |
# | 8-bit weights | openvino | 97.16% | 0.2834 | 97.63% | 97.63% | 1.000 | 90 |
# | 8-bit weights, s8 activations | onnx | 99.05% | 0.1003 | 99.53% | 99.53% | 0.841 | 53 |
# | 8-bit weights, s8 activations | openvino | 96.68% | 0.2829 | 98.10% | 97.16% | 1.000 | 81 |
# | 7-bit weights | onnx | 98.58% | 0.0478 | 99.53% | 99.05% | 0.787 | 109 |
# | 7-bit weights | openvino | 98.58% | 0.0414 | 99.53% | 99.05% | 0.653 | 106 |
# | 7-bit weights, first and last layers in float | onnx | 99.53% | 0.0223 | 99.53% | 100.00% | 0.474 | 98 |
# | 7-bit weights, first and last layers in float | openvino | 99.05% | 0.0291 | 99.53% | 99.53% | 0.550 | 99 |
# | 7-bit weights (8 in depthwise), first and last layers in float (default) | onnx | 99.05% | 0.0184 | 99.53% | 99.53% | 0.633 | 82 |
# | 7-bit weights (8 in depthwise), first and last layers in float (default) | openvino | 99.53% | 0.0179 | 99.53% | 100.00% | 0.305 | 82 |
#
# With VNNI (an AMD EPYC Zen 4 with AVX-512, VNNI and bf16 units, on 2026-12-07, a model trained
# there by the same command; same settings, one run), full 8-bit weights keep f32's accuracy and
# are the fastest, and 7-bit weights alone lose a point as they do without VNNI: what 7 bits lose
# is resolution, not overflow. The default gives up about a tenth of ONNX Runtime's int8 speed
# on such a CPU to compute the same integers on both kinds, so that the figures stored at
# training hold wherever the file is served:
#
# | recipe | engine | val accuracy | log loss | kept at threshold | labels agree | max prob. diff | images/s (batch 8) |
# |---|---|---|---|---|---|---|---|
# | f32 | onnx | 99.53% | 0.0091 | 99.05% | | | 106 |
# | 8-bit weights | onnx | 99.53% | 0.0081 | 99.53% | 100.00% | 0.232 | 274 |
# | f32 | openvino | 99.53% | 0.0091 | 99.05% | | | 104 |
# | 8-bit weights | openvino | 99.53% | 0.0058 | 99.53% | 100.00% | 0.236 | 276 |
# | 8-bit weights, s8 activations | onnx | 99.53% | 0.0082 | 99.53% | 100.00% | 0.206 | 81 |
# | 8-bit weights, s8 activations | openvino | 99.53% | 0.0058 | 99.53% | 100.00% | 0.232 | 298 |
# | 7-bit weights | onnx | 98.58% | 0.0700 | 99.53% | 99.05% | 0.766 | 258 |
# | 7-bit weights | openvino | 99.05% | 0.0353 | 99.53% | 99.53% | 0.556 | 260 |
# | 7-bit weights, first and last layers in float | onnx | 99.05% | 0.0408 | 99.53% | 99.53% | 0.685 | 242 |
# | 7-bit weights, first and last layers in float | openvino | 99.05% | 0.0358 | 99.53% | 99.53% | 0.492 | 262 |
# | 7-bit weights (8 in depthwise), first and last layers in float (default) | onnx | 99.53% | 0.0124 | 99.53% | 100.00% | 0.213 | 239 |
# | 7-bit weights (8 in depthwise), first and last layers in float (default) | openvino | 99.05% | 0.0106 | 99.53% | 99.53% | 0.283 | 264 |
#
# With this model, OpenVINO int8's validation accuracy is one photo (0.47 point) below f32's,
# past `int8_max_accuracy_drop`, so `auto` serves ONNX Runtime int8 on this CPU; without VNNI
# the same recipe put ONNX Runtime one photo below instead. Both stay within the tolerance on
# log loss and on the cats and dogs kept at the threshold.
#
# An artifact is trained on one machine and served on others, so each serving machine still
# checks the int8 engine on the check photos before `auto` may pick it.
#
# `quantize_artifact` writes `model.int8.onnx` and measures it against f32 on the whole
# validation split (accuracy, log loss, agreement of the labels, the share of cats and dogs
# kept at the "neither" threshold) on each engine, since ONNX Runtime and OpenVINO fuse and
# round the same graph differently, and stores the figures in `model_config.json` under
# `int8`. `auto` serves int8 on an engine only when that engine's figures are within
# `int8_max_accuracy_drop` (0.1 point) and `int8_max_open_set_drop` (1 point), it agrees with
# f32 on this CPU, and it is faster.
# The open-set threshold is the one fitted on f32 scores; the stored `open_set_kept` shows
# whether it holds for int8.

# %%
#| export
class _Batches:
    "An ONNX Runtime `CalibrationDataReader` over image files, decoded a batch at a time."
    def __init__(self, paths:Sequence[Path], preset:Preset, batch_size:int=8):
        self.chunks = iter([list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)])
        self.preset = preset
    def get_next(self) -> dict|None:
        chunk = next(self.chunks, None)
        return None if chunk is None else {"images": self.preset.stack(chunk)}

def maps_only_nodes(model_path:Path) -> list[str]:
    "The nodes of an ONNX graph that only its `maps` output needs (none when it has no `maps`)."
    import onnx
    graph = onnx.load(str(model_path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    needed, pending = set(), [o.name for o in graph.output if o.name != "maps"]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in needed: continue
        needed.add(node.name); pending += list(node.input)
    return [node.name for node in graph.node if node.name not in needed]

def int8_float_nodes(model_path:Path) -> list[str]:
    "The nodes the int8 model keeps in float32: those only the heat maps need, the first and last convolutions, and the linear heads."
    import onnx
    maps_only = maps_only_nodes(model_path)
    needed = [n for n in onnx.load(str(model_path)).graph.node if n.name not in maps_only]
    convs = [n.name for n in needed if n.op_type == "Conv"]
    return maps_only + convs[:1] + convs[-1:] + [n.name for n in needed if n.op_type == "Gemm"]

def depthwise_weights(model_path:Path) -> list[str]:
    "The weights of the depthwise convolutions (one kernel per channel: `group` > 1, one input channel per kernel) of an ONNX graph."
    import onnx
    graph = onnx.load(str(model_path)).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    group = lambda node: next((a.i for a in node.attribute if a.name == "group"), 1)
    return [n.input[1] for n in graph.node if n.op_type == "Conv" and group(n) > 1 and shapes.get(n.input[1], [0, 0])[1] == 1]

INT8_METHOD = ("static QDQ, u8 activations, per-channel s8 weights in 7 bits (8 in depthwise convolutions), "
               "first and last layers in float, MinMax")  # the default recipe

def quantize_int8(model_dir:Path, # An artifact with `model.onnx`
                  calibration:Sequence[Path], # Training photos whose activation ranges set the scales
                  activations:str="u8", # "u8" or "s8": the activations' integer type (other recipes: bench_int8_recipes.py)
                  reduce_range:bool=True, # 7-bit weights (no 16-bit overflow on CPUs without VNNI); False: 8-bit
                  depthwise_8bit:bool=True, # With `reduce_range`: the depthwise convolutions' weights in 8 bits all the same
                  float_ends:bool=True) -> Path: # Keep the first and last layers in float (`int8_float_nodes`); False: only the maps' nodes
    "Write `model.int8.onnx` beside `model.onnx`, by default as `INT8_METHOD` says: static QDQ int8, MinMax ranges, the heat maps in float."
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    model_dir = Path(model_dir)
    preset = Preset.from_config(ModelConfig.load(model_dir/"model_config.json"))
    quiet = logging.getLogger(); level = quiet.level; quiet.setLevel(logging.ERROR)  # the tool logs a warning per folded bias
    # The open-set head's masked logits (-inf outside the pet classes) feed Softmax in float, unquantized; the tool still
    # computes a zero point for their infinite range, and NumPy would warn of that unused NaN.
    try:
        with tempfile.TemporaryDirectory() as tmp, np.errstate(invalid="ignore"):
            pre = f"{tmp}/pre.onnx"
            quant_pre_process(str(model_dir/"model.onnx"), pre, skip_symbolic_shape=True)
            full_range = depthwise_weights(pre) if reduce_range and depthwise_8bit else []
            quantize_static(pre, f"{tmp}/{INT8_FILE}", _Batches(calibration, preset), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=reduce_range, activation_type={"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[activations],
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=(int8_float_nodes if float_ends else maps_only_nodes)(pre),
                            extra_options={"TensorQuantOverrides": {w: [{"axis": 0, "reduce_range": False}] for w in full_range}})
            os.replace(f"{tmp}/{INT8_FILE}", model_dir/INT8_FILE)  # atomic: a half-written model is never served
    finally: quiet.setLevel(level)
    return model_dir/INT8_FILE


# %%
int8_path = quantize_int8(artifact, photos[::2])
test_eq(int8_path.name, "model.int8.onnx")
int8_run = make_runner("onnx", artifact, precision="int8")
int8_outputs, f32_outputs = int8_run(batch), runners["onnx/f32"](batch)
test_eq([o.shape for o in int8_outputs], [o.shape for o in f32_outputs])
test_eq(np.corrcoef(int8_outputs[-1].ravel(), f32_outputs[-1].ravel())[0, 1] > 0.95, True)  # the heat maps of both agree
f"{int8_path.stat().st_size / 1e6:.2f} MB int8, {(artifact/'model.onnx').stat().st_size / 1e6:.2f} MB f32"

# %% [markdown]
# The nodes kept in float: those only the heat maps need (the head applied to each cell, the
# open-set score's directions and, with an ImageNet head, its masked softmaxes), then the stem
# convolution, the backbone's last convolution and the linear heads (this example model has
# one; the default model's ImageNet head for the open set is a second):

# %%
graph_nodes = {n.name: n for n in load_onnx_graph(str(artifact/"model.onnx")).graph.node}
maps_only = maps_only_nodes(artifact/"model.onnx")
ops = sorted({graph_nodes[name].op_type for name in maps_only})
test_eq("Conv" in ops and "MatMul" in ops, True)  # the head on each cell (a 1x1 convolution); the open-set directions
ends = [name for name in int8_float_nodes(artifact/"model.onnx") if name not in maps_only]
test_eq([graph_nodes[name].op_type for name in ends], ["Conv", "Conv", "Gemm"])  # the stem, the last convolution, the head
test_eq(graph_nodes[ends[0]].input[0], "images")  # the stem reads the pixels
len(maps_only), ops, [(name, graph_nodes[name].input[1]) for name in ends]

# %% [markdown]
# The depthwise convolutions, whose weights keep 8 bits: this example model has none, so here is
# a graph of a depthwise convolution (4 channels, 3x3 each) followed by a pointwise one:

# %%
kernels = [numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "dw.weight"),
           numpy_helper.from_array(np.ones((8, 4, 1, 1), np.float32), "pw.weight")]
convs = [helper.make_node("Conv", ["x", "dw.weight"], ["h"], group=4, pads=[1, 1, 1, 1]), helper.make_node("Conv", ["h", "pw.weight"], ["y"])]
graph = helper.make_graph(convs, "separable", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], kernels)
save_onnx_graph(helper.make_model(graph), f"{tmp.name}/separable.onnx")
test_eq(depthwise_weights(artifact/"model.onnx"), [])
depthwise_weights(f"{tmp.name}/separable.onnx")


# %%
#| export
def _figures(run:Callable, batches:list[np.ndarray], targets:np.ndarray, config:ModelConfig) -> tuple[dict, np.ndarray]:
    "Accuracy, log loss and the share kept at the open-set threshold of one engine over preprocessed batches, and its probabilities."
    outputs = [run(x) for x in batches]
    probs = softmax(np.concatenate([o[0] for o in outputs]), config.temperature)
    true_prob = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1)
    out = {"accuracy": float((probs.argmax(1) == targets).mean()), "log_loss": float(-np.log(true_prob).mean())}
    if config.open_set is not None and len(outputs[0]) > 1:
        p_any = config.open_set.probability(np.concatenate([o[1] for o in outputs]))
        out["open_set_kept"] = float((p_any >= config.open_set.threshold).mean())
    return out, probs

def measure_int8(model_dir:Path, # An artifact with `model.onnx` and `model.int8.onnx`
                 paths:Sequence[Path], targets:np.ndarray, # Labelled photos (the validation split) and their class indices
                 batch_size:int=32,
                 backends:Sequence[str]=AUTO_BACKENDS) -> dict: # The engines that run the int8 model (each computes it its own way)
    """f32 (ONNX Runtime) and, by each of `backends`, int8 on labelled photos: accuracy, log loss and open-set share kept, and the
    agreement of the labels; a backend that cannot load (OpenVINO not installed) is left out."""
    model_dir, targets = Path(model_dir), np.asarray(targets)
    config = ModelConfig.load(model_dir/"model_config.json")
    preset = Preset.from_config(config)
    batches = [preset.stack(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    f32, p32 = _figures(make_runner("onnx", model_dir), batches, targets, config)
    report = {"f32": f32, "n_images": len(targets)}
    for backend in backends:
        try: run = make_runner(backend, model_dir, precision="int8")
        except ImportError as e: logger.warning("int8 not measured on %s: %s", backend, e); continue
        int8, p8 = _figures(run, batches, targets, config)
        report[backend] = {"int8": int8, "labels_agree": float((p32.argmax(1) == p8.argmax(1)).mean()),
                           "max_probability_difference": float(np.abs(p32 - p8).max())}
    return report

def calibration_photos(train_paths:Sequence[Path], # The training split's photos
                       settings:TrainingSettings) -> list[Path]: # Its `int8_calibration_images`
    "The `int8_calibration_images` training photos that calibrate the int8 model: a seeded random choice, in split order."
    rng = np.random.default_rng(0)
    return [train_paths[i] for i in sorted(rng.permutation(len(train_paths))[:settings.int8_calibration_images])]

def quantize_artifact(model_dir:Path, # An artifact with `model.onnx`
                      train_paths:Sequence[Path], # Training photos; the first `int8_calibration_images` calibrate
                      val_paths:Sequence[Path], val_targets:np.ndarray, # The validation split, to measure on
                      settings:TrainingSettings|None=None) -> ModelConfig: # Its `int8_calibration_images`
    "Quantize the artifact to int8, measure it against f32 on the validation split, and record that in `model_config.json`."
    chosen = calibration_photos(train_paths, settings or TrainingSettings())
    quantize_int8(model_dir, chosen)
    config = ModelConfig.load(Path(model_dir)/"model_config.json")
    config.int8 = {**measure_int8(model_dir, val_paths, val_targets), "method": INT8_METHOD, "calibration_images": len(chosen)}
    config.save(Path(model_dir)/"model_config.json")
    for backend in AUTO_BACKENDS:
        if backend in config.int8:
            logger.info("int8 on %s: validation accuracy %.4f (f32 %.4f), labels agree %.2f%%", backend, config.int8[backend]["int8"]["accuracy"],
                        config.int8["f32"]["accuracy"], 100 * config.int8[backend]["labels_agree"])
    return config


# %% [markdown]
# `measure_int8` compares the two on labelled photos, here the example photos with their labels:

# %%
measured = measure_int8(artifact, photos, np.array([0] * 12 + [1] * 12))
test_eq((measured["n_images"], set(measured)), (24, {"f32", "n_images", "onnx", "openvino"}))
test_eq(all(0 <= measured[b]["labels_agree"] <= 1 for b in AUTO_BACKENDS) and measured["f32"]["accuracy"] >= 0, True)
measured

# %% [markdown]
# On the untrained example model the figures mean little, but they show the record that
# `auto` reads; its tolerance check refuses an int8 model that lost accuracy:

# %%
test_eq(calibration_photos(photos, TrainingSettings(int8_calibration_images=8)), calibration_photos(photos, TrainingSettings(int8_calibration_images=8)))
[p.name for p in calibration_photos(photos, TrainingSettings(int8_calibration_images=4))]

# %%
labels = np.array([0] * 12 + [1] * 12)
config = quantize_artifact(artifact, photos, photos, labels, TrainingSettings(int8_calibration_images=8))
test_eq(set(config.int8) >= {"f32", "onnx", "openvino", "method", "calibration_images"}, True)
test_eq((config.int8["method"], config.int8["calibration_images"]), (INT8_METHOD, 8))
worse = ModelConfig.load(artifact/"model_config.json")
worse.int8 = {**worse.int8, "openvino": {**worse.int8["openvino"], "int8": {"accuracy": worse.int8["f32"]["accuracy"] - 0.01}}}
test_eq(int8_rejection(worse, InferenceSettings(), "openvino").startswith("its validation accuracy on openvino is 1.00% below f32"), True)
lenient = InferenceSettings(int8_max_accuracy_drop=1.0, int8_max_open_set_drop=1.0)
test_eq([int8_rejection(ModelConfig.load(artifact/"model_config.json"), lenient, b) for b in AUTO_BACKENDS], [None, None])
config.int8

# %% [markdown]
# With an int8 model within tolerance, int8 engines join `auto`'s candidates (then they must
# still agree on the check photos, which this untrained toy model's int8 may not); asked for by
# name, int8 runs on either engine:

# %%
test_eq({("onnx", "int8"), ("openvino", "int8")} <= set(engine_candidates(artifact, config, lenient)), True)
test_eq(("openvino", "int8") in engine_candidates(artifact, worse, lenient.model_copy(update={"int8_max_accuracy_drop": 0.001})), False)
test_eq(load_engine(artifact, config, InferenceSettings(backend="openvino", precision="int8")).name, "openvino/int8")
engine_candidates(artifact, config, lenient)

# %%
tmp.cleanup()
