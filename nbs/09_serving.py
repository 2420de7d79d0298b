# %%
#| default_exp serving

# %% [markdown]
# # Serving
#
# > A FastAPI service around the `Predictor`: uploads and URLs in, calibrated probabilities out, with limits, micro-batching, metrics and a web page.

# %% [markdown]
# `create_app(settings)` builds the service; `catsdogs_serve` runs it under uvicorn. The routes
# live on one module-level `router`, each with the pydantic model of what it answers (the
# OpenAPI page at `/docs` shows them, with examples):
#
# | route | answers | what it does |
# |---|---|---|
# | `GET /` | HTML | the web page (drop photos or paste a URL) |
# | `GET /health` | `HealthOut` | liveness: the process answers |
# | `GET /ready` | `ReadyOut`; 503 `ErrorOut` | readiness: 503 until the model is loaded, then which model, engine and registry version |
# | `POST /predict` | `PredictionOut`; 4xx/503 `ErrorOut` | one image: multipart `file`, raw `image/*` body, `?url=` or JSON `{"url": ...}` |
# | `POST /predict/batch` | `BatchOut`; 4xx/503 `ErrorOut` | several multipart `files` (at most `max_batch_files`) |
# | `GET /metrics` | Prometheus text | Prometheus metrics |
# | `POST /admin/reload` | `ReloadOut`; 401/404/409 `ErrorOut` | load the model again (a `models:/NAME@ALIAS` follows its alias); needs `admin_token` |
# | `POST /feedback` | `FeedbackOut` (201); 4xx `ErrorOut` | correct an answer by its `id`: `{"id", "label", "note"}` (with `feedback_dir`) |
# | `GET /review` | HTML | the review page: the most doubtful photos, labelled with one click (admin token) |
# | `GET /review/items` | `ReviewOut` | the review queue, most doubtful first; `explain=true` adds each photo's heat map (admin token) |
# | `GET /review/photos/{sha256}` | the photo | a photo of the feedback store (admin token) |
# | `POST /review/{sha256}` | `FeedbackOut` (201) | label a queued photo: `{"label"}` (admin token) |
# | `GET /admin/feedback.tar` | tar archive | the whole feedback store, for `catsdogs_prepare --feedback-dir` (admin token) |
# | `GET /docs` | HTML | the OpenAPI page |
#
# A reload builds the new predictor beside the old one (engine choice included), then swaps it
# in between two batches: the batch running finishes on the old model, and no request fails.
# With `--workers N` each worker process reloads when a POST reaches it, so send one per worker
# or, in Kubernetes, run one worker per pod and roll the Deployment.
#
# Every answer carries `label` (`"cat"`, `"dog"`, or `"neither"` when the photo shows no cat or
# dog: a 200 answer, not an error), `confidence`, `probabilities` and `p_dog` (given that it is a
# cat or a dog), `p_cat_or_dog`, the probability that it shows one at all (see the model
# notebook's open-set head), and an `id`, which a correction names. `--no-open-set` (or `CATSDOGS_OPEN_SET=false`) answers cat or dog
# for everything; `--open-set-threshold` overrides the artifact's threshold.
#
# The service is three modules, each importing only from those before it:
# [HTTP input](07_http_input.ipynb) (`catsdogs.http_input`: limits, the URL guard, body
# readers), [micro-batching](08_batching.ipynb) (`catsdogs.batching`: the `MicroBatcher`), and
# this one (`catsdogs.serving`: metrics, response models, the `Service`, the app and
# `catsdogs_serve`). Design choices, each against a mistake such services keep making:
#
# - the model loads once, in `lifespan`; settings come from `get_settings`, which tests override;
# - bodies are read in chunks and refused (413) as soon as they pass `max_upload_bytes`, never
#   buffered whole first; `load_image` refuses decompression bombs before decoding;
# - images are decoded and run through the model off the event loop; a **micro-batcher** gives
#   requests that arrive together one decode-then-forward pass, so decoding never fights the
#   forward pass for the cores;
# - URL fetches accept only http(s), time out, obey the same size limit, and refuse loopback,
#   private, link-local, multicast and reserved addresses after DNS resolution and on every
#   redirect hop, connecting to the very address that was checked (no DNS rebinding);
# - every bad input is a JSON `{"detail": ...}` (`ErrorOut`) with a 4xx status, in plain words;
# - overload is refused, not queued without end: past `max_queue` images waiting, a request gets
#   503 with `Retry-After` at once, and one not answered within `request_timeout_s` gets 503 and
#   its work is skipped (both counted in `catsdogs_refused_total`); a body that takes longer than
#   `body_timeout_s` to arrive gets 408 and its connection is closed, and uvicorn caps concurrent
#   connections (`max_connections`) and idle keep-alive (`keep_alive_s`), so slow clients cannot
#   hold the server;
# - a client that goes away is not an error: it is logged at debug level and counted under 499
#   (as nginx does), and its image, if still queued, is never run;
# - the process is lean: it imports neither PyTorch nor the training libraries, so
#   `pip install "catsdogs[serve]"` (ONNX Runtime, OpenVINO, FastAPI) is enough, and the Docker
#   image is that install.

# %%
#| export
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import math
import os
import secrets
import socket
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import anyio
import httpx
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from catsdogs.batching import BatcherClosed, DeadlineExceeded, MicroBatcher, Overloaded
from catsdogs.config import (MODEL_SOURCE, FeedbackSettings, InferenceSettings, ServingSettings, Settings, field_names, get_settings,
                             parse_settings, settings_parser)
from catsdogs.feedback import Answered, FeedbackStore, RateLimit, RecentAnswers, StoreFull, answer_margin
from catsdogs.http_input import (FetchRefused, fetch_url, image_http_error, read_body, read_multipart, read_within,
                                 refusal_reason, unless_disconnected)
from catsdogs.inference import (NO_HEAT_MAPS, Explanation, Prediction, Predictor, check_artifact, heat_overlay, overlay_size,
                                resolve_model)
from catsdogs.metrics import DriftWindow
from catsdogs.presets import ImageError

# %%
#| hide
import contextlib
import io
import shutil
import tarfile
import tempfile
from IPython.display import display
from nbdev.showdoc import show_doc
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from fastcore.test import test_eq, test_fail
from catsdogs.presets import ModelConfig, demo_data_dir
from catsdogs.metrics import drift_reference
from catsdogs.model import demo_artifact

# %%
#| export
logger = logging.getLogger("catsdogs.serving")

# %% [markdown]
# The examples serve a small untrained model from a temporary folder.

# %%
tmp = tempfile.TemporaryDirectory()
artifact = demo_artifact(Path(tmp.name)/"model", "small_cnn", 96)
data_dir = demo_data_dir()
cat_jpg = sorted((data_dir/"Cat").glob("cat.*.jpg"))[0]


# %% [markdown]
# ## Metrics
#
# Each app has its own `CollectorRegistry`, so tests can build several apps in one process.

# %%
#| export
class Metrics:
    "The service's Prometheus metrics, in a registry of its own."
    def __init__(self):
        r = self.registry = CollectorRegistry()
        by_request = ["route", "method", "status"]
        self.requests = Counter("catsdogs_http_requests", "HTTP requests", by_request, registry=r)
        self.latency = Histogram("catsdogs_http_request_duration_seconds", "HTTP request latency", by_request, registry=r)
        self.predictions = Counter("catsdogs_predictions", "Predictions by label", ["label"], registry=r)
        self.batch_size = Histogram("catsdogs_inference_batch_size", "Images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.inference = Histogram("catsdogs_inference_duration_seconds", "Forward-pass time per batch", registry=r)
        self.model = Info("catsdogs_model", "The model being served", registry=r)
        self.ready = Gauge("catsdogs_model_ready", "1 once the model is loaded", registry=r)
        self.refused = Counter("catsdogs_refused", "Images refused with 503: queue full (overloaded), past the deadline, "
                               "or shutting down", ["reason"], registry=r)
        self.confidence = Histogram("catsdogs_answer_confidence", "The answers' confidence (probability of the label given)",
                                    buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0), registry=r)
        self.p_cat_or_dog = Histogram("catsdogs_answer_p_cat_or_dog", "The answers' p_cat_or_dog (open set on)",
                                      buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0), registry=r)
        self.drift = Gauge("catsdogs_drift_psi", "PSI of the last drift_window answers against the validation split, by signal "
                           "(NaN until the window is full; absent for a model without a drift reference)", ["signal"], registry=r)
        self.neither_share = Gauge("catsdogs_window_neither_share", "Share of 'neither' answers among the last drift_window answers",
                                   registry=r)
        self.feedback = Counter("catsdogs_feedback", "Corrections stored, by label and source (feedback: POST /feedback; review: "
                                "the review page)", ["label", "source"], registry=r)
        self.review_queued = Counter("catsdogs_review_queued", "Doubtful answers' photos put in the review queue", registry=r)

    def watch(self, window:DriftWindow|None):
        "Export `window`'s PSI and share of 'neither' answers (computed when scraped); None: a model without a drift reference."
        self.drift.clear()
        if window is None: self.neither_share.set(float("nan")); return
        for signal in window.reference: self.drift.labels(signal).set_function(functools.partial(window.psi, signal))
        self.neither_share.set_function(window.neither_share)

    def observe_answer(self, p:Prediction):
        "Count an answer: its label, confidence and p_cat_or_dog."
        self.predictions.labels(p.label).inc()
        self.confidence.observe(p.confidence)
        if p.p_cat_or_dog is not None: self.p_cat_or_dog.observe(p.p_cat_or_dog)

    def describe(self, predictor:Predictor):
        "Set `catsdogs_model_info` to the predictor's model, engine and registry version."
        c, registry = predictor.config, predictor.registry or {}
        self.model.info({"architecture": c.architecture, "backend": predictor.backend, "precision": predictor.precision,
                         "model_version": predictor.model_version, "code_version": c.code_version, "created": c.created,
                         "dataset_version": c.dataset_version, "registry_name": str(registry.get("name", "")),
                         "registry_version": str(registry.get("version", ""))})

_REFUSALS = {Overloaded: "overloaded", DeadlineExceeded: "deadline", BatcherClosed: "shutting_down"}

class _MetricsMiddleware:
    "ASGI middleware counting requests and their latency by route template, method and status."
    def __init__(self, app, metrics:Metrics): self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http": return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        async def send_and_record(message):
            if message["type"] == "http.response.start": status[0] = message["status"]
            await send(message)
        try: await self.app(scope, receive, send_and_record)
        finally:
            labels = (getattr(scope.get("route"), "path", "unmatched"), scope["method"], str(status[0]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)


# %%
service_metrics = Metrics()
service_metrics.refused.labels("overloaded").inc()
[line for line in generate_latest(service_metrics.registry).decode().splitlines() if line.startswith("catsdogs_refused")]

# %% [markdown]
# ## Response models
#
# Each route answers one of these models, so the OpenAPI page (`/docs`) shows every field with
# its meaning, and examples. The answers of `/predict` and `/predict/batch`, and the JSON body
# that `/predict` also accepts:

# %%
#| export
_DOCS = {"label": '"cat", "dog", or "neither" when the photo does not look like a cat or a dog (a 200 answer, not an error)',
         "confidence": 'Probability of `label`: P(that class | a cat or a dog), or 1 - p_cat_or_dog for "neither"',
         "probabilities": "Each class's calibrated probability, given that the photo shows a cat or a dog",
         "p_dog": "P(dog | a cat or a dog)",
         "p_cat_or_dog": "Probability that the photo shows a cat or a dog at all (calibrated under an even prior); null when the open set is off",
         "id": "The answer's id: POST it to /feedback with the right label when the answer is wrong"}

class ExplanationOut(BaseModel):
    "Where the answer comes from (with `explain=true`): a heat map as numbers and as a picture to lay over the photo."
    label: str = Field(description="The answer it explains")
    grid: list[list[float]] = Field(description="Each cell's evidence for `label` in log-odds, rows top to bottom: positive speaks for it. "
                                                "The grid covers `box` (the centre crop the model sees), 9x9 cells at 288 px")
    pet_grid: list[list[float]]|None = Field(None, description="Each cell's evidence that the photo shows a cat or a dog at all, in log-odds; null when the open set is off")
    box: tuple[float, float, float, float] = Field(description="The region of the photo the grids cover: left, top, right, bottom, as fractions of its width and height")
    size: tuple[int, int] = Field(description="The photo's width and height in pixels")
    overlay: str = Field(description="A transparent PNG of the photo's size (scaled down to heat_map_max_side), as a data: URL, "
                                     "to lay over the photo: clear where nothing speaks for `label`, then purple, orange and pale yellow, more opaque, up to the strongest cell")

    @classmethod
    def of(cls, explanation:Explanation, max_side:int) -> ExplanationOut:
        "The API form of an `Explanation`, its overlay drawn (about a millisecond)."
        png = base64.b64encode(heat_overlay(explanation, max_side)).decode("ascii")
        return cls.model_construct(**vars(explanation), overlay=f"data:image/png;base64,{png}")  # built from checked parts: not validated again

class PredictionOut(BaseModel):
    "The answer for one image."
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "9b1f0c5e2a7d4c3b8e6f1a2b3c4d5e6f", "label": "dog", "confidence": 0.993, "probabilities": {"cat": 0.007, "dog": 0.993},
         "p_dog": 0.993, "p_cat_or_dog": 0.998, "model_version": "3f2c9a1b7d4e"},
        {"id": "0d2e4f6a8b1c3d5e7f9a0b2c4d6e8f1a", "label": "neither", "confidence": 0.991, "probabilities": {"cat": 0.62, "dog": 0.38},
         "p_dog": 0.38, "p_cat_or_dog": 0.009, "model_version": "3f2c9a1b7d4e"}]})
    label: str = Field(description=_DOCS["label"])
    confidence: float = Field(description=_DOCS["confidence"])
    probabilities: dict[str, float] = Field(description=_DOCS["probabilities"])
    p_dog: float = Field(description=_DOCS["p_dog"])
    p_cat_or_dog: float|None = Field(None, description=_DOCS["p_cat_or_dog"])
    explanation: ExplanationOut|None = Field(None, description="With `explain=true`: where the answer comes from")
    model_version: str
    id: str = Field(description=_DOCS["id"])

class BatchItem(BaseModel):
    "One file of a batch: its prediction, or the error that stopped it."
    filename: str
    label: str|None = Field(None, description=_DOCS["label"])
    confidence: float|None = Field(None, description=_DOCS["confidence"])
    probabilities: dict[str, float]|None = Field(None, description=_DOCS["probabilities"])
    p_dog: float|None = Field(None, description=_DOCS["p_dog"])
    p_cat_or_dog: float|None = Field(None, description=_DOCS["p_cat_or_dog"])
    explanation: ExplanationOut|None = Field(None, description="With `explain=true`: where the answer comes from")
    id: str|None = Field(None, description=_DOCS["id"])
    error: str|None = None
    status: int = 200

class BatchOut(BaseModel):
    "The answers for a batch, in upload order."
    results: list[BatchItem]
    model_version: str

class UrlIn(BaseModel):
    "JSON body of `/predict` for an image on the web."
    url: str

class FeedbackIn(BaseModel):
    "JSON body of `/feedback`: which answer was wrong and what the photo shows."
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"id": "9b1f0c5e2a7d4c3b8e6f1a2b3c4d5e6f", "label": "cat", "note": "a Maine Coon, not a dog"}]})
    id: str = Field(min_length=1, max_length=64, description="The `id` of the answer")
    label: Literal["cat", "dog", "neither"] = Field(description="What the photo really shows")
    note: str|None = Field(None, max_length=500, description="Anything the reviewer should know")

class LabelIn(BaseModel):
    "JSON body of `POST /review/{sha256}`: the label a reviewer gives a queued photo."
    model_config = ConfigDict(extra="forbid")
    label: Literal["cat", "dog", "neither"]

class FeedbackOut(BaseModel):
    "A correction as stored: the answer it corrects and the label given."
    status: Literal["stored"] = "stored"
    id: str = Field(description="The answer's id")
    label: str = Field(description="The label given")
    answered: str = Field(description="The label the service had answered")
    sha256: str = Field(description="The photo's sha256, its name in the store")
    model_version: str = Field(description="The model that answered")
    source: Literal["feedback", "review"] = Field(description="feedback: POST /feedback; review: the review page")

    @classmethod
    def of(cls, correction:dict) -> FeedbackOut:
        "The API form of a stored correction (`FeedbackStore.correct`)."
        return cls(id=correction["id"], label=correction["label"], answered=correction["answer"]["label"], sha256=correction["sha256"],
                   model_version=correction["model_version"], source=correction["source"])

class ReviewItemOut(BaseModel):
    "A photo in the review queue: the answer it got and how doubtful that was."
    sha256: str
    id: str = Field(description="The answer's id")
    label: str = Field(description="The label answered")
    confidence: float
    p_dog: float
    p_cat_or_dog: float|None
    margin: float = Field(description="How far the answer was from changing, in log-odds (0: the mirror image disagreed)")
    model_version: str
    answered_at: float = Field(description="When it was answered (Unix time)")
    photo: str = Field(description="Where the photo is (GET, with the admin token)")
    explanation: ExplanationOut|None = Field(None, description="With `explain=true`: the heat map of the model served now (which may "
                                                               "not be the one that answered)")

class ReviewOut(BaseModel):
    "`/review/items`: the queue, most doubtful first."
    items: list[ReviewItemOut]
    waiting: int = Field(description="Photos in the queue")


# %% [markdown]
# What the other routes answer, and the body of every error:

# %%
#| export
class ErrorOut(BaseModel):
    "The body of every error answer: what went wrong, in plain words."
    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "this file is not an image"}]})
    detail: str

class HealthOut(BaseModel):
    "`/health`: the process answers."
    status: Literal["ok"] = "ok"

class RegistryOut(BaseModel):
    "Where a model loaded by a `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) URI came from in the MLflow registry."
    model_config = ConfigDict(extra="allow")
    uri: str
    name: str
    version: int
    alias: str|None = None
    run_id: str|None = None

class ReadyOut(BaseModel):
    "`/ready`: the model being served, its versions, the data it was trained on, the engine and precision."
    status: Literal["ready"] = "ready"
    model: str = Field(description="The architecture (same as `architecture`)")
    architecture: str = Field(description="The backbone, a name in `catsdogs.model`'s registry")
    model_version: str = Field(description="First 12 hex digits of the sha256 of the artifact's config and weights")
    code_version: str = Field(description="The catsdogs version and git commit that wrote the artifact")
    created: str = Field(description="When the artifact was written (UTC, ISO 8601)")
    dataset_version: str = Field(description="The version of the data the model was trained on (empty when not recorded)")
    backend: str = Field(description="The engine: onnx, openvino, torchscript or eager")
    precision: str = Field(description="f32, bf16 or int8")
    tta: bool = Field(description="Whether flip test-time augmentation is on")
    class_names: list[str]
    metrics: dict[str, Any] = Field(description="The test metrics recorded in the artifact")
    open_set: bool = Field(description='Whether "neither" can be answered')
    open_set_threshold: float|None = Field(description='"neither" below this p_cat_or_dog; null when the open set is off')
    heat_maps: bool = Field(description="Whether `explain=true` can say where the answers come from")
    feedback: bool = Field(description="Whether corrections are kept (POST /feedback) and the review queue runs")
    drift: bool = Field(description="Whether the model has a drift reference, so /metrics has catsdogs_drift_psi")
    registry: RegistryOut|None = Field(description="The registry version; null for a model loaded from a folder")

class PreviousModel(BaseModel):
    "The model a reload replaced."
    model_version: str
    registry: RegistryOut|None

class ReloadOut(BaseModel):
    "`/admin/reload`: the model served before and the one served now."
    status: Literal["reloaded"] = "reloaded"
    previous: PreviousModel
    model_version: str
    registry: RegistryOut|None
    backend: str
    precision: str


# %% [markdown]
# The response models are what the OpenAPI page documents, with examples:

# %%
item = BatchItem(filename="notes.txt", error="this file is not an image", status=415)
correction = FeedbackIn.model_validate_json('{"id": "9b1f0c5e", "label": "cat"}')
test_eq((correction.label, LabelIn(label="neither").label), ("cat", "neither"))
test_fail(lambda: FeedbackIn(id="9b1f0c5e", label="cow"), contains="Input should be 'cat', 'dog' or 'neither'")
stored_out = FeedbackOut.of({"id": "9b1f0c5e", "label": "cat", "answer": {"label": "dog"}, "sha256": "3a8c35d3", "model_version": "3f2c9a1b7d4e",
                             "source": "feedback"})
queued = ReviewItemOut(sha256="3a8c35d3", id="9b1f0c5e", label="dog", confidence=0.55, p_dog=0.55, p_cat_or_dog=0.97, margin=0.2,
                       model_version="3f2c9a1b7d4e", answered_at=1764930000.0, photo="/review/photos/3a8c35d3")
test_eq(ReviewOut(items=[queued], waiting=1).items[0].margin, 0.2)
test_eq(UrlIn.model_validate_json('{"url": "https://example.com/cat.jpg"}').url, "https://example.com/cat.jpg")
test_eq(HealthOut().model_dump(), {"status": "ok"})
test_eq(ErrorOut(detail="this file is not an image").model_dump_json(), '{"detail":"this file is not an image"}')
registry = RegistryOut(uri="models:/catsdogs@production", name="catsdogs", version=2, alias="production", run_id="9e1c")
test_eq(PreviousModel(model_version="3f2c9a1b7d4e", registry=registry).registry.version, 2)
PredictionOut.model_json_schema()["examples"][1], BatchOut(results=[item], model_version="3f2c9a1b7d4e").model_dump(exclude_none=True), stored_out

# %% [markdown]
# ## The service state
#
# `Service` holds what the lifespan creates: the predictor, the batcher and the HTTP client for
# URL fetches. `predict_bytes` is the one path from uploaded bytes to an answer. Each batch the
# batcher forms is one call of `Predictor.predict_batch`: the images decode on the predictor's
# threads (one per inference thread), then one forward pass runs over those that decoded, the
# same call the serving benchmark's in-process ceiling makes. Running decoding beside the forward pass instead
# (threads of their own) left ONNX Runtime's threads waiting for cores that decoding held.
# Decompression bombs are refused before decoding, and JPEGs decode at reduced size, but a
# large PNG still delays the batch it is in.

# %%
#| export
INLINE_OVERLAY_PIXELS = 300_000  # overlays up to this size are drawn on the event loop (measured: about 1 ms for 160,000 pixels)

@dataclass
class Service:
    "Everything the lifespan loads once: the model and what feeds it."
    settings: Settings
    predictor: Predictor
    metrics: Metrics
    resolver: Callable
    guard: Callable
    batcher: MicroBatcher|None = None
    client: httpx.AsyncClient|None = None
    reloading: asyncio.Lock = field(default_factory=asyncio.Lock)
    store: FeedbackStore|None = None # The feedback store, when `feedback_dir` is set
    recent: RecentAnswers|None = None # Answers that may still be corrected (feedback on)
    limiter: RateLimit|None = None # Corrections per client address (feedback on)
    drift: DriftWindow|None = None # The recent answers against the model's drift reference (None: the model has none)

    async def start(self):
        "Create the batcher, the URL client, the drift window and, with `feedback_dir`, the feedback store (inside the running event loop)."
        s = self.settings
        self.batcher = MicroBatcher(self._run_batch, s)
        timeout = httpx.Timeout(s.url_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)
        if s.feedback_dir is not None:
            self.store = await anyio.to_thread.run_sync(FeedbackStore, s)
            self.recent, self.limiter = RecentAnswers(s), RateLimit(s.feedback_per_minute)
        self._watch(self.predictor)

    def _watch(self, predictor:Predictor):
        "Measure drift against `predictor`'s reference, in a fresh window."
        reference = predictor.config.drift_reference
        self.drift = DriftWindow(reference, self.settings.drift_window) if reference else None
        self.metrics.watch(self.drift)

    async def stop(self):
        "Close the batcher (queued requests get 503), the URL client and the feedback store."
        await self.batcher.close(); await self.client.aclose()
        if self.store is not None: self.store.close()

    def _run_batch(self, items:list[tuple[bytes, bool]]) -> list[tuple[Prediction, str]|Exception]:
        "The batch's answers from one `predict_batch` call (in the inference thread); an error fails its own request alone."
        predictor = self.predictor  # a reload swaps it between batches, never within one
        explain = [wanted and predictor.heat_maps for _, wanted in items]  # a model without maps: answers without
        answers = predictor.predict_batch([data for data, _ in items], len(items), self.settings.max_image_pixels,
                                          on_forward=self._observe_forward, explain=explain)
        return [(a, predictor.model_version) if isinstance(a, Prediction) else a for a in answers]

    def _observe_forward(self, size:int, seconds:float):
        self.metrics.inference.observe(seconds); self.metrics.batch_size.observe(size)

    async def predict_bytes(self, data:bytes, explain:bool=False) -> PredictionOut:
        "Decode and predict in a shared batch, off the event loop; bad images raise a 4xx, overload a 503 `HTTPException`."
        if explain and not self.predictor.heat_maps: raise self.no_heat_maps()
        try: p, version = await self.batcher.submit((data, explain))
        except ImageError as e: raise image_http_error(e) from None
        except (BatcherClosed, Overloaded, DeadlineExceeded) as e:
            self.metrics.refused.labels(_REFUSALS[type(e)]).inc()
            raise HTTPException(503, str(e), headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        answer_id = uuid.uuid4().hex
        await self._record(answer_id, data, p, version)
        if explain and p.explanation is None: raise self.no_heat_maps()  # a reload swapped in a model without maps
        why = await self._explained(p.explanation) if explain else None
        return PredictionOut(**{**vars(p), "explanation": why}, model_version=version, id=answer_id)

    async def _record(self, answer_id:str, data:bytes, p:Prediction, version:str):
        "Count the answer, add it to the drift window and, with feedback on, keep it for corrections and offer a doubtful one for review."
        self.metrics.observe_answer(p)
        if self.drift is not None:
            self.drift.observe({"confidence": max(p.probabilities.values()), "p_cat_or_dog": p.p_cat_or_dog}, p.label == "neither")
        if self.store is None: return
        answer = {k: getattr(p, k) for k in ("label", "confidence", "probabilities", "p_dog", "p_cat_or_dog", "views_agree")}
        answered = Answered(data, answer, version, answer_margin(answer, self.predictor.threshold))
        self.recent.put(answer_id, answered)
        if answered.margin < self.settings.review_margin and await anyio.to_thread.run_sync(self.store.offer_review, answer_id, answered):
            self.metrics.review_queued.inc()

    async def _explained(self, explanation:Explanation) -> ExplanationOut:
        "The API form of `explanation`: drawn here for photos up to `INLINE_OVERLAY_PIXELS` (about 2 ms, less than a thread hop costs), in a thread above."
        draw = functools.partial(ExplanationOut.of, explanation, self.settings.heat_map_max_side)
        width, height = overlay_size(tuple(explanation.size), self.settings.heat_map_max_side)
        return draw() if width * height <= INLINE_OVERLAY_PIXELS else await anyio.to_thread.run_sync(draw)

    def no_heat_maps(self) -> HTTPException:
        "The 501 answer to `explain=true` when the served model's graphs have no heat maps."
        return HTTPException(501, "explain: the served model has no heat maps (its graphs were exported without the `maps` output; "
                                  "its operator can export them again with scripts/quantize_model.py --export)")

    async def reload(self) -> Predictor:
        "Load the model the settings name again (a registry alias may point to a new version) and swap it in between batches."
        async with self.reloading:
            predictor = await anyio.to_thread.run_sync(Predictor.from_settings, self.settings)
            self.predictor = predictor  # the batch running now finishes on the old one; the next uses this
            self._watch(predictor)
        self.metrics.describe(predictor)
        logger.info("reloaded: serving %r", predictor)
        return predictor

    async def correct(self, client:str, answer_id:str, label:str, note:str|None=None, sha256:str|None=None) -> FeedbackOut:
        "Store a correction of the answer `answer_id` (or label the queued photo `sha256`), within the client's rate limit; 4xx when it cannot."
        if self.store is None: raise self.feedback_off()
        wait = self.limiter.wait(client)
        if wait: raise HTTPException(429, f"too many corrections: at most {self.settings.feedback_per_minute} a minute",
                                     headers={"Retry-After": str(math.ceil(wait))})
        try:
            if sha256 is not None: stored = await anyio.to_thread.run_sync(self.store.label_review, sha256, label)
            else:
                answered = self.recent.get(answer_id)
                if answered is None: raise HTTPException(404, f"no answer with id {answer_id!r} to correct: it is unknown, or older than "
                                                              f"{self.settings.feedback_answer_ttl_s:g} s")
                stored = await anyio.to_thread.run_sync(self.store.correct, answer_id, answered, label, note)
        except KeyError: raise HTTPException(404, f"no photo {sha256} is waiting for review")
        except StoreFull as e: raise HTTPException(409, f"{e}: corrections are not taken until its operator exports and clears it")
        self.metrics.feedback.labels(label, stored["source"]).inc()
        return FeedbackOut.of(stored)

    def feedback_off(self) -> HTTPException:
        "The 404 answer of the feedback routes when no `feedback_dir` is set."
        return HTTPException(404, "feedback is off: this server keeps no corrections (its operator can start it with --feedback-dir)")

    async def fetch(self, url:str) -> bytes:
        "The image at `url`, within the limits and address checks."
        try:
            with anyio.fail_after(3 * self.settings.url_timeout_s):
                return await fetch_url(url, self.client, self.settings.max_upload_bytes, self.resolver, self.guard,
                                       self.settings.allow_private_urls)
        except TimeoutError: raise FetchRefused("timed out fetching the URL")
        except httpx.TimeoutException: raise FetchRefused("timed out fetching the URL")
        except httpx.HTTPError as e: raise FetchRefused(f"could not fetch the URL ({type(e).__name__}: {e})")


# %%
#| echo: false
for method in (Service.start, Service.predict_bytes, Service.reload, Service.fetch, Service.correct, Service.stop): display(show_doc(method))


# %% [markdown]
# ## Dependencies

# %%
#| export
def get_service(request:Request) -> Service:
    "The loaded service, or 503 while the model is not loaded."
    service = getattr(request.app.state, "service", None)
    if service is None: raise HTTPException(503, "the model is not loaded yet")
    return service

SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[Service, Depends(get_service)]

# %% [markdown]
# ## Routes
#
# The routes are registered on a module-level `router`, which `create_app` includes; what a
# route needs from its app (the service, the metrics, the web page) it reads from
# `request.app.state` or gets through a dependency. Each declares what it answers: a response
# model (its return annotation) and, in `responses`, an `ErrorOut` for each error status it
# may answer.
#
# `/predict` reads its input by the request's content type; the OpenAPI page documents all
# three forms.

# %%
#| export
_IMAGE_FORMS = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
_BATCH_FORM = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}
_ERROR_TEXT = {400: "bad input or refused URL", 401: "no or wrong token", 404: "no admin_token set",
               408: "the body took longer than body_timeout_s", 409: "the model could not be loaded; the previous one is still served",
               413: "too large", 415: "not an image",
               501: "explain=true, but the served model's graphs have no heat maps",
               503: "model not loaded yet, queue full or past the deadline: retry after Retry-After"}
_FEEDBACK_ERRORS = {400: "not JSON", 404: "feedback is off, or no such answer (unknown or expired id)", 409: "the feedback store is full",
                    413: "body too large", 415: "not JSON", 422: "a field is missing or wrong (the label must be cat, dog or neither)",
                    429: "too many corrections from this client: retry after Retry-After"}
_ADMIN_ERRORS = {401: "no or wrong admin token (Bearer, or Basic with the token as password)",
                 404: "feedback is off, no admin_token is set, or no such photo"}

def _errors(*statuses:int, text:dict=_ERROR_TEXT) -> dict:
    "OpenAPI `responses` for error `statuses`, each a `{\"detail\": ...}` body (`ErrorOut`)."
    return {s: {"model": ErrorOut, "description": text[s]} for s in statuses}

def check_admin(settings:Settings, authorization:str|None):
    "Let the request through with the admin token, as `Bearer TOKEN` or HTTP Basic with the token as password (what a browser sends); else 404 (no token set) or 401."
    if not settings.admin_token: raise HTTPException(404, "Not Found")
    scheme, _, credentials = (authorization or "").partition(" ")
    token = credentials.strip()
    if scheme.lower() == "basic":
        try: token = base64.b64decode(token, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError): token = ""
    elif scheme.lower() != "bearer": token = ""
    if not secrets.compare_digest(token.encode(), settings.admin_token.encode()):
        raise HTTPException(401, "a valid admin token is needed", headers={"WWW-Authenticate": 'Basic realm="catsdogs admin"'})  # browsers ask for it; scripts may send Bearer

async def _json_body(request:Request, service:Service, model:type[BaseModel]) -> BaseModel:
    "A small JSON body (at most 16 kB) as `model`; 415, 413, 400 or 422 with the reason in plain words."
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send a JSON body (Content-Type: application/json)")
    body = await read_within(service.settings.body_timeout_s, read_body(request, 16 * 1024))
    try: return model.model_validate_json(body)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()): raise HTTPException(400, "the body is not valid JSON")
        raise HTTPException(422, "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()))

async def _image_bytes(request:Request, service:Service, url:str|None) -> bytes:
    "The image of a `/predict` request: from `?url=`, a JSON `{\"url\"}`, a multipart `file` or a raw image body."
    limit, deadline = service.settings.max_upload_bytes, service.settings.body_timeout_s
    if url: return await service.fetch(url)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parts = [p for p in await read_within(deadline, read_multipart(request, limit)) if p.name == "file"]
        if not parts: raise HTTPException(400, "send the image in a multipart field named 'file'")
        return bytes(parts[0].data)
    if ctype == "application/json":
        try: body = UrlIn.model_validate_json(await read_within(deadline, read_body(request, 64 * 1024)))
        except ValueError: raise HTTPException(400, 'a JSON body must be {"url": "https://..."}')
        return await service.fetch(body.url)
    if ctype.startswith("image/") or ctype == "application/octet-stream": return await read_within(deadline, read_body(request, limit))
    raise HTTPException(415, "send multipart/form-data with a 'file' field, an image/* body, ?url=, or JSON {\"url\": ...}")

class _PrometheusText(Response):
    "Prometheus' text exposition format."
    media_type = CONTENT_TYPE_LATEST


# %%
#| export
router = APIRouter()

@router.get("/", response_class=HTMLResponse, response_model=None, include_in_schema=False)
def index(request:Request) -> str:
    "The web page: drop photos or paste a URL (`catsdogs/static/index.html`, read once by `create_app`)."
    return request.app.state.page

@router.get("/health")
async def health() -> HealthOut:  # on the event loop: never waits behind the thread pool
    "Liveness: the process is up."
    return HealthOut()

@router.get("/ready", responses={503: {"model": ErrorOut, "description": "the model is not loaded yet"}})
def ready(service:ServiceDep) -> ReadyOut:
    "Readiness: the model, its version (and registry version), the data it was trained on, the engine and precision."
    p, c = service.predictor, service.predictor.config
    return ReadyOut(model=c.architecture, architecture=c.architecture, model_version=p.model_version,
                    code_version=c.code_version, created=c.created, dataset_version=c.dataset_version,
                    backend=p.backend, precision=p.precision, tta=p.tta, class_names=list(c.class_names),
                    metrics=c.metrics, open_set=p.open_set is not None,
                    open_set_threshold=p.threshold if p.open_set is not None else None, heat_maps=p.heat_maps,
                    feedback=service.store is not None, drift=service.drift is not None, registry=p.registry)

def _json(answer:BaseModel) -> Response:
    "An answer built from validated parts, serialized once by pydantic (FastAPI would validate and encode it again)."
    return Response(answer.model_dump_json(), media_type="application/json")

ExplainQuery = Annotated[bool, Query(description="Add an `explanation`: where the answer comes from, as a grid and a PNG overlay")]

@router.post("/predict", openapi_extra=_IMAGE_FORMS, responses=_errors(400, 408, 413, 415, 501, 503))
async def predict(request:Request, service:ServiceDep,
                  url:Annotated[str|None, Query(description="http(s) URL of an image to fetch")]=None,
                  explain:ExplainQuery=False) -> PredictionOut:
    "Cat, dog or neither for one image: a multipart `file`, a raw image body, `?url=` or JSON `{\"url\": ...}`."
    if explain and not service.predictor.heat_maps: raise service.no_heat_maps()  # before reading or fetching anything
    data = await _image_bytes(request, service, url)
    return _json(await unless_disconnected(request, service.predict_bytes(data, explain)))

@router.post("/predict/batch", openapi_extra=_BATCH_FORM, responses=_errors(400, 408, 413, 415, 501, 503))
async def predict_batch(request:Request, service:ServiceDep, settings:SettingsDep, explain:ExplainQuery=False) -> BatchOut:
    "Cat, dog or neither for each of several multipart `files`; a bad file gets its own error."
    if explain and not service.predictor.heat_maps: raise service.no_heat_maps()
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data with one or more 'files' fields")
    parts = await read_within(settings.body_timeout_s, read_multipart(request, settings.max_upload_bytes, settings.max_batch_files))
    files = [p for p in parts if p.name in ("files", "file")]
    if not files: raise HTTPException(400, "no files: send them in multipart fields named 'files'")
    answers = await unless_disconnected(request, asyncio.gather(*(service.predict_bytes(bytes(f.data), explain) for f in files),
                                                                return_exceptions=True))
    results = []
    for f, a in zip(files, answers):
        if isinstance(a, HTTPException): results.append(BatchItem(filename=f.filename, error=a.detail, status=a.status_code))
        elif isinstance(a, BaseException): raise a
        else: results.append(BatchItem(filename=f.filename, **{k: v for k, v in vars(a).items() if k != "model_version"}))
    return _json(BatchOut(results=results, model_version=service.predictor.model_version))

@router.post("/admin/reload", responses=_errors(401, 404, 409))
async def reload(service:ServiceDep, settings:SettingsDep,
                 authorization:Annotated[str|None, Header(description="Bearer <admin_token>")]=None) -> ReloadOut:
    "Load the model again (a `models:/NAME@ALIAS` URI follows its alias) and swap it in without failing a request in flight."
    check_admin(settings, authorization)
    before = service.predictor
    try: after = await service.reload()
    except Exception as e: raise HTTPException(409, f"the model could not be loaded; still serving the previous one: {e}")
    return ReloadOut(previous=PreviousModel(model_version=before.model_version, registry=before.registry),
                     model_version=after.model_version, registry=after.registry, backend=after.backend, precision=after.precision)

AdminAuth = Annotated[str|None, Header(alias="Authorization", description="Bearer <admin_token>, or HTTP Basic with the token as password")]

@router.post("/feedback", status_code=201, responses=_errors(400, 404, 409, 413, 415, 422, 429, text=_FEEDBACK_ERRORS))
async def feedback(request:Request, service:ServiceDep) -> FeedbackOut:
    "Correct an answer: JSON `{\"id\": ..., \"label\": \"cat\" | \"dog\" | \"neither\", \"note\": ...}`; the photo and the correction are stored before the 201."
    if service.store is None: raise service.feedback_off()
    body = await _json_body(request, service, FeedbackIn)
    return await service.correct(request.client.host if request.client else "", body.id, body.label, body.note)

def _reviewer(service:Service, settings:Settings, authorization:str|None) -> FeedbackStore:
    "The feedback store, for a request with the admin token (404 when feedback is off)."
    check_admin(settings, authorization)
    if service.store is None: raise service.feedback_off()
    return service.store

@router.get("/review", response_class=HTMLResponse, response_model=None, responses=_errors(401, 404, text=_ADMIN_ERRORS))
def review_page(request:Request, service:ServiceDep, settings:SettingsDep, authorization:AdminAuth=None) -> str:
    "The review page: the queued photos, most doubtful first, each labelled with one click (admin token; a browser asks for it)."
    _reviewer(service, settings, authorization)
    return request.app.state.review_page

@router.get("/review/items", responses=_errors(401, 404, text=_ADMIN_ERRORS))
async def review_items(request:Request, service:ServiceDep, settings:SettingsDep, authorization:AdminAuth=None,
                       limit:Annotated[int, Query(ge=1, le=500, description="Most items")]=100,
                       explain:Annotated[bool, Query(description="Add the heat map of the model served now to each item")]=False) -> ReviewOut:
    "The review queue, most doubtful first (admin token); with `explain=true`, each photo's heat map from the served model."
    store = _reviewer(service, settings, authorization)
    queued = await anyio.to_thread.run_sync(store.review_items, limit)
    maps = [None] * len(queued)
    if explain and service.predictor.heat_maps and queued:  # straight to the predictor: no answer, no metrics, no drift window
        predictor = service.predictor
        answers = await anyio.to_thread.run_sync(lambda: predictor.predict_batch([i["path"] for i in queued], settings.max_batch_size,
                                                                                 settings.max_image_pixels, explain=True))
        maps = [await service._explained(a.explanation) if isinstance(a, Prediction) and a.explanation else None for a in answers]
    items = [ReviewItemOut(sha256=i["sha256"], id=i["id"], label=i["answer"]["label"], confidence=i["answer"]["confidence"],
                           p_dog=i["answer"]["p_dog"], p_cat_or_dog=i["answer"].get("p_cat_or_dog"), margin=i["margin"],
                           model_version=i["model_version"], answered_at=i["answered_at"],
                           photo=str(request.url_for("review_photo", sha256=i["sha256"]).path), explanation=why)
             for i, why in zip(queued, maps)]
    return ReviewOut(items=items, waiting=store.waiting())

@router.get("/review/photos/{sha256}", response_class=FileResponse, responses=_errors(401, 404, text=_ADMIN_ERRORS))
def review_photo(sha256:str, service:ServiceDep, settings:SettingsDep, authorization:AdminAuth=None) -> FileResponse:
    "A photo of the store, by its sha256 (admin token)."
    path = _reviewer(service, settings, authorization).photo_path(sha256.lower())
    if path is None: raise HTTPException(404, f"no photo {sha256} in the feedback store")
    return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

@router.post("/review/{sha256}", status_code=201, responses=_errors(400, 401, 404, 409, 413, 415, 422, 429,
                                                                    text={**_FEEDBACK_ERRORS, **_ADMIN_ERRORS}))
async def review_label(sha256:str, request:Request, service:ServiceDep, settings:SettingsDep, authorization:AdminAuth=None) -> FeedbackOut:
    "Label a queued photo: JSON `{\"label\": ...}` (admin token); it leaves the queue as a correction."
    _reviewer(service, settings, authorization)
    body = await _json_body(request, service, LabelIn)
    return await service.correct(request.client.host if request.client else "", "", body.label, sha256=sha256.lower())

@router.get("/admin/feedback.tar", response_class=FileResponse, responses=_errors(401, 404, text=_ADMIN_ERRORS))
async def export_feedback(service:ServiceDep, settings:SettingsDep, authorization:AdminAuth=None) -> FileResponse:
    "The whole feedback store as a tar archive (admin token): unpack it and pass the folder to `catsdogs_prepare --feedback-dir`."
    store = _reviewer(service, settings, authorization)
    archive = tempfile.NamedTemporaryFile(prefix="catsdogs-feedback-", suffix=".tar", delete=False)
    try: await anyio.to_thread.run_sync(store.export, archive)
    finally: archive.close()
    return FileResponse(archive.name, media_type="application/x-tar", filename="feedback.tar",
                        background=BackgroundTask(os.unlink, archive.name))

@router.get("/metrics", response_class=_PrometheusText)
def metrics(request:Request) -> _PrometheusText:
    "Prometheus metrics: requests, latency, predictions, their confidence and p_cat_or_dog, drift, batch sizes, model info."
    return _PrometheusText(generate_latest(request.app.state.metrics.registry))


# %% [markdown]
# ## The app
#
# `create_app` takes the settings (default: `get_settings()`, through the dependency so a test
# may override it), an already loaded `predictor` to share between apps in tests, and the
# `resolver` and `url_guard` that URL fetches use.

# %%
#| export
def _settings_of(app:FastAPI) -> Settings:
    "The settings the app's dependency resolves to (an override when a test or `create_app` set one)."
    return app.dependency_overrides.get(get_settings, get_settings)()

@asynccontextmanager
async def lifespan(app:FastAPI):
    "Load the model once at start-up (in a thread), start the batcher; stop both at shutdown."
    settings = _settings_of(app)
    try: predictor = app.state.predictor or await anyio.to_thread.run_sync(Predictor.from_settings, settings)
    except Exception as e:
        logger.error("cannot load the model from %s: %s", settings.model_dir, e); raise
    service = Service(settings, predictor, app.state.metrics, app.state.resolver, app.state.url_guard)
    await service.start()
    app.state.metrics.describe(predictor)
    app.state.metrics.ready.set(1)
    logger.info("serving %r", predictor)
    app.state.service = service
    try: yield
    finally:
        app.state.service = None; app.state.metrics.ready.set(0)
        await service.stop()

def _web_page(name:str="index.html") -> str:
    "A single-file web page shipped in `catsdogs/static`."
    return (resources.files("catsdogs")/"static"/name).read_text(encoding="utf-8")


# %%
#| export
def create_app(settings:Settings|None=None, # Default: `get_settings()`
               predictor:Predictor|None=None, # An already loaded model (else loaded in `lifespan`)
               resolver:Callable=socket.getaddrinfo, # Host resolver of URL fetches
               url_guard:Callable=refusal_reason) -> FastAPI: # `(address, allow_private) -> reason or None`
    "The catsdogs FastAPI application."
    app = FastAPI(title="catsdogs", summary="Is it a cat or a dog?", lifespan=lifespan)
    if settings is not None: app.dependency_overrides[get_settings] = lambda: settings
    app.state.predictor, app.state.resolver, app.state.url_guard = predictor, resolver, url_guard
    app.state.service, app.state.metrics = None, Metrics()
    app.state.page, app.state.review_page = _web_page(), _web_page("review.html")
    app.add_middleware(_MetricsMiddleware, metrics=app.state.metrics)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request, exc):  # not an error of ours: logged quietly, counted under nginx's 499
        logger.debug("client went away during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error; the server logged it"}, status_code=500)

    app.include_router(router)
    return app


# %% [markdown]
# ### The app at work
#
# `TestClient` runs the lifespan; `tests/test_serving.py` does the same against a real uvicorn
# server and covers every bad input.

# %%
settings = Settings(model_dir=artifact, backend="onnx")
app = create_app(settings)
with TestClient(app) as client:
    test_eq(client.get("/health").json(), {"status": "ok"})
    test_eq(client.get("/ready").json()["backend"], "onnx")
    test_eq("Cat or dog?" in client.get(app.url_path_for("index")).text, True)
    answer = client.post("/predict", files={"file": ("cat.jpg", cat_jpg.read_bytes(), "image/jpeg")})
    test_eq(answer.status_code, 200)
    test_eq(set(answer.json()), {"id", "label", "confidence", "probabilities", "p_dog", "p_cat_or_dog", "explanation", "model_version"})
    bad = client.post("/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    test_eq((bad.status_code, bad.json()), (415, {"detail": "this file is not an image"}))
    test_eq(client.post("/predict", json={"url": "http://10.0.0.1/cat.jpg"}).json()["detail"],
            "refused: 10.0.0.1 resolves to 10.0.0.1, a private address")
    batch = client.post(app.url_path_for("predict_batch"), files=[("files", ("cat.jpg", cat_jpg.read_bytes(), "image/jpeg")),
                                                                 ("files", ("notes.txt", b"hello", "text/plain"))])
    test_eq([(r["filename"], r["status"], r["error"]) for r in batch.json()["results"]],
            [("cat.jpg", 200, None), ("notes.txt", 415, "this file is not an image")])
    test_eq("catsdogs_predictions_total" in client.get("/metrics").text, True)
answer.json()

# %% [markdown]
# With `explain=true` the answer carries an `ExplanationOut`: the evidence grids (here 6x6,
# the small demo artifact at 96 px; its answers are meaningless, the shapes are not), the box
# they cover, the photo's size and the overlay, a PNG of the photo's size as a `data:` URL.
# How to read one is in the evaluation notebook; the web page lays it over the photo.

# %%
with TestClient(app) as client:
    explained = client.post("/predict?explain=true", files={"file": ("cat.jpg", cat_jpg.read_bytes(), "image/jpeg")}).json()
why = ExplanationOut.model_validate(explained["explanation"])
overlay = Image.open(io.BytesIO(base64.b64decode(why.overlay.split(",", 1)[1])))
test_eq((why.label, overlay.size, tuple(why.size)), (explained["label"], Image.open(cat_jpg).size, Image.open(cat_jpg).size))
test_eq(np.shape(why.grid), (6, 6))
{**why.model_dump(exclude={"grid", "pet_grid", "overlay"}), "grid": f"{len(why.grid)}x{len(why.grid[0])}", "overlay": why.overlay[:40] + "..."}

# %% [markdown]
# Every route and what it answers: its response model, or its response class for the page and
# the metrics. The error statuses each route may answer are in the OpenAPI schema, each with an
# `ErrorOut` body:

# %%
routes = {f"{min(r.methods)} {r.path}": (r.response_model or r.response_class).__name__ for r in router.routes}
test_eq(routes["POST /predict"], "PredictionOut")
errors = app.openapi()["paths"]["/predict"]["post"]["responses"]
test_eq(errors["415"]["content"]["application/json"]["schema"], {"$ref": "#/components/schemas/ErrorOut"})
routes, {status: e["description"] for status, e in errors.items()}

# %% [markdown]
# Underneath, `lifespan` loads the model and starts the `Service`; `get_service` is what each
# route's `ServiceDep` resolves to. Both at work without HTTP:

# %%
app = create_app(settings)
async with lifespan(app):
    service = get_service(Request({"type": "http", "app": app}))
    test_eq(isinstance(service, Service), True)
    answer = await service.predict_bytes(cat_jpg.read_bytes())
answer

# %% [markdown]
# The routes are functions of their dependencies, so they can be called without HTTP too:

# %%
app = create_app(Settings(model_dir=artifact, backend="onnx", admin_token="s3cret"))
async with lifespan(app):
    service = get_service(Request({"type": "http", "app": app}))
    test_eq(await health(), HealthOut(status="ok"))
    state = ready(service)
    reloaded = await reload(service, service.settings, authorization="Bearer s3cret")
test_eq((type(state), type(reloaded), reloaded.previous.model_version), (ReadyOut, ReloadOut, state.model_version))
reloaded

# %% [markdown]
# Before the lifespan has run (or after it ends) the app is alive but not ready:

# %%
client = TestClient(create_app(settings))
test_eq(client.get("/health").status_code, 200)
not_ready = client.get("/ready")
test_eq((not_ready.status_code, not_ready.json()), (503, {"detail": "the model is not loaded yet"}))

# %% [markdown]
# ## Corrections, the review queue and drift
#
# With `feedback_dir` set, every answer's photo waits in memory for `feedback_answer_ttl_s`
# under the answer's `id`, and `POST /feedback` stores a correction of it durably before it
# answers 201 (see the feedback notebook for the store and its guarantees). Answers whose
# margin is below `review_margin` also put their photo in the review queue, which `/review`
# shows to whoever holds the admin token, each photo with the served model's heat map
# (computed by the predictor directly: it is no answer, and counts in no metric). A browser
# sends the token as the password of HTTP Basic authentication (any user name), which it asks
# for on the first visit; scripts send `Authorization: Bearer TOKEN`. Without `feedback_dir`, nothing is kept and these routes
# answer 404.
#
# Corrections are limited per client address (`feedback_per_minute`, then 429 with
# `Retry-After`), in size (16 kB of JSON, a note of 500 characters) and in total
# (`feedback_max_bytes` of photos, then 409).

# %%
feedback_settings = Settings(model_dir=artifact, backend="onnx", admin_token="s3cret", feedback_dir=Path(tmp.name)/"feedback",
                             review_margin=50.0, feedback_per_minute=5)  # an untrained model: every answer is doubtful here
admin = {"Authorization": "Bearer s3cret"}
with TestClient(create_app(feedback_settings)) as client:
    test_eq(client.get("/ready").json()["feedback"], True)
    answer = client.post("/predict", files={"file": ("cat.jpg", cat_jpg.read_bytes(), "image/jpeg")}).json()
    stored = client.post("/feedback", json={"id": answer["id"], "label": "cat", "note": "Tom, our cat"})
    test_eq((stored.status_code, stored.json()["label"], stored.json()["answered"]), (201, "cat", answer["label"]))
    refusals = {
        "unknown id": client.post("/feedback", json={"id": "f" * 32, "label": "dog"}),
        "bad label": client.post("/feedback", json={"id": answer["id"], "label": "cow"}),
        "not JSON": client.post("/feedback", content=b"{", headers={"Content-Type": "application/json"}),
        "form body": client.post("/feedback", data={"id": answer["id"], "label": "dog"}),
        "no token": client.get("/review/items"),
        "wrong token": client.get("/review/items", headers={"Authorization": "Bearer guess"}),
    }
    for _ in range(4): client.post("/feedback", json={"id": answer["id"], "label": "dog"})  # the last word counts
    refusals["sixth in a minute"] = client.post("/feedback", json={"id": answer["id"], "label": "dog"})
    queue = client.get("/review/items", headers=admin).json()
    test_eq(client.get("/review", auth=("reviewer", "s3cret")).status_code, 200)  # what a browser sends
test_eq({k: r.status_code for k, r in refusals.items()},
        {"unknown id": 404, "bad label": 422, "not JSON": 400, "form body": 415, "no token": 401, "wrong token": 401,
         "sixth in a minute": 429})
test_eq(queue["items"], [])  # a corrected photo leaves the queue
{k: r.json()["detail"] for k, r in refusals.items()}

# %% [markdown]
# A photo in the review queue is labelled with one POST, and the export is the whole store as
# a tar archive:

# %%
with TestClient(create_app(feedback_settings)) as client:
    dog_jpg = sorted((data_dir/"Dog").glob("dog.*.jpg"))[0]
    client.post("/predict", files={"file": ("dog.jpg", dog_jpg.read_bytes(), "image/jpeg")})
    test_eq("Review" in client.get(app.url_path_for("review_page"), headers=admin).text, True)
    waiting = client.get(app.url_path_for("review_items"), headers=admin).json()["items"]
    explained = client.get(app.url_path_for("review_items"), params={"explain": True}, headers=admin).json()["items"]
    test_eq((waiting[0]["explanation"], explained[0]["explanation"]["size"]), (None, list(Image.open(dog_jpg).size)))
    photo = client.get(app.url_path_for("review_photo", sha256=waiting[0]["sha256"]), headers=admin)
    test_eq((photo.content, waiting[0]["photo"]), (dog_jpg.read_bytes(), app.url_path_for("review_photo", sha256=waiting[0]["sha256"])))
    label_url = app.url_path_for("review_label", sha256=waiting[0]["sha256"])
    labelled = client.post(label_url, json={"label": "dog"}, headers=admin).json()
    archive = client.get(app.url_path_for("export_feedback"), headers=admin)
    test_eq(client.post(label_url, json={"label": "dog"}, headers=admin).status_code, 404)  # labelled already
with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar: exported = tar.getnames()
test_eq((labelled["source"], exported[0], len(exported)), ("review", "feedback.db", 3))
{k: v for k, v in waiting[0].items() if k != "sha256"}, labelled

# %% [markdown]
# Without `feedback_dir` every answer still has an `id`, but nothing is kept:

# %%
with TestClient(create_app(settings)) as client:
    answer = client.post("/predict", files={"file": ("cat.jpg", cat_jpg.read_bytes(), "image/jpeg")}).json()
    off = client.post("/feedback", json={"id": answer["id"], "label": "dog"})
test_eq((len(answer["id"]), off.status_code), (32, 404))
off.json()

# %% [markdown]
# `check_admin` is the admin routes' gate; it takes the token as a Bearer token or as the
# password of HTTP Basic authentication:

# %%
admin_settings = Settings(model_dir=artifact, admin_token="s3cret")
check_admin(admin_settings, "Bearer s3cret")
check_admin(admin_settings, "Basic " + base64.b64encode(b"anyone:s3cret").decode())
for header in (None, "Bearer s3cre", "Basic bm9wZQ==", "Token s3cret"):
    test_fail(lambda: check_admin(admin_settings, header), contains="a valid admin token is needed")
try: check_admin(Settings(model_dir=artifact), "Bearer s3cret")
except HTTPException as e: no_token = e.status_code
test_eq(no_token, 404)

# %% [markdown]
# **Drift.** Each answer also goes into `catsdogs_answer_confidence` and
# `catsdogs_answer_p_cat_or_dog` (histograms) and, when the model's artifact has a
# `drift_reference` (every model `catsdogs_train` writes), into a `DriftWindow` of the last
# `drift_window` answers. `/metrics` reports its PSI per signal, `catsdogs_drift_psi`, and the
# share of "neither" answers in it, computed when Prometheus scrapes. `deploy/prometheus/`
# holds the alert rules over these, and `deploy/grafana/` a dashboard. Here the demo model gets
# a made-up reference of its confidence, and a window of 20 answers, all of the same photo:

# %%
drifting = Path(tmp.name)/"drifting"
shutil.copytree(artifact, drifting)
config = ModelConfig.load(drifting/"model_config.json")
config.drift_reference = drift_reference({"confidence": np.linspace(0.5, 1, 100)})  # the demo model has no open set: one signal
config.save(drifting/"model_config.json")
with TestClient(create_app(Settings(model_dir=drifting, backend="onnx", drift_window=20))) as client:
    for _ in range(20): client.post("/predict", files={"file": ("cat.jpg", cat_jpg.read_bytes(), "image/jpeg")})
    page = client.get("/metrics").text
drift_lines = [line for line in page.splitlines() if line.startswith(("catsdogs_drift_psi", "catsdogs_window_neither_share",
                                                                       "catsdogs_answer_confidence_count"))]
test_eq(float(page.split('catsdogs_drift_psi{signal="confidence"} ')[1].split()[0]) > 0.25, True)  # one photo, twenty times
drift_lines

# %% [markdown]
# ## `catsdogs_serve`
#
# The artifact is checked before uvicorn starts, so a missing or unreadable model stops the
# command with a clear message and a non-zero exit code. With one worker the app is built
# here; uvicorn needs an import string for several workers, so the flags travel to the
# workers as `CATSDOGS_*` environment variables and each builds its app with `app_from_env`.

# %%
#| export
_SERVE_FIELDS = [InferenceSettings, ServingSettings, FeedbackSettings, *MODEL_SOURCE, "max_image_pixels"]  # the flags of catsdogs_serve

def app_from_env() -> FastAPI:
    "The app configured from `CATSDOGS_*` variables (uvicorn factory for `--workers` > 1)."
    return create_app(Settings())

def _to_env(settings:Settings, fields:list):
    "Export the settings of `fields` (sections and field names) as `CATSDOGS_*` variables for worker processes."
    for name in field_names(fields):
        value = getattr(settings, name)
        if value is None: os.environ.pop(f"CATSDOGS_{name.upper()}", None)
        else: os.environ[f"CATSDOGS_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)

def serve_cli(argv:list[str]|None=None):
    "Console script `catsdogs_serve`: serve the model over HTTP with uvicorn."
    parser = settings_parser("Serve the cats-vs-dogs model over HTTP.", _SERVE_FIELDS, aliases={"--model": "model_dir"})
    settings, _ = parse_settings(parser, argv)
    try: check_artifact(resolve_model(settings.model_dir, settings.mlflow_tracking_uri, settings.cache_dir)[0])
    except (OSError, ValueError) as e: parser.exit(2, f"catsdogs_serve: cannot serve: {e}\n")
    if not str(settings.model_dir).startswith("models:/"): settings.model_dir = Path(settings.model_dir).resolve()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    limits = dict(limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s)
    if settings.workers > 1:
        _to_env(settings, _SERVE_FIELDS)
        uvicorn.run("catsdogs.serving:app_from_env", factory=True, host=settings.host, port=settings.port, workers=settings.workers, **limits)
    else:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, **limits)


# %%
with contextlib.chdir(tmp.name):  # a folder named as typed at a prompt
    try: serve_cli(["--model-dir", "missing"])
    except SystemExit as e: test_eq(e.code, 2)
    else: raise AssertionError("serve_cli should refuse a missing model")

# %% [markdown]
# Each uvicorn worker of `catsdogs_serve --workers N` builds its app from the environment:

# %%
os.environ["CATSDOGS_MODEL_DIR"], os.environ["CATSDOGS_BACKEND"] = str(artifact), "onnx"
with TestClient(app_from_env()) as worker:
    test_eq(worker.get("/ready").json()["backend"], "onnx")
del os.environ["CATSDOGS_MODEL_DIR"], os.environ["CATSDOGS_BACKEND"]

# %%
