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
# | `GET /docs` | HTML | the OpenAPI page |
#
# A reload builds the new predictor beside the old one (engine choice included), then swaps it
# in between two batches: the batch running finishes on the old model, and no request fails.
# With `--workers N` each worker process reloads when a POST reaches it, so send one per worker
# or, in Kubernetes, run one worker per pod and roll the Deployment.
#
# Every answer carries `label` (`"cat"`, `"dog"`, or `"neither"` when the photo shows no cat or
# dog: a 200 answer, not an error), `confidence`, `probabilities` and `p_dog` (given that it is a
# cat or a dog), and `p_cat_or_dog`, the probability that it shows one at all (see the model
# notebook's open-set head). `--no-open-set` (or `CATSDOGS_OPEN_SET=false`) answers cat or dog
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
import functools
import logging
import os
import secrets
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import anyio
import httpx
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from catsdogs.batching import BatcherClosed, DeadlineExceeded, MicroBatcher, Overloaded
from catsdogs.config import (MODEL_SOURCE, InferenceSettings, ServingSettings, Settings, field_names, get_settings, parse_settings,
                             settings_parser)
from catsdogs.http_input import (FetchRefused, fetch_url, image_http_error, read_body, read_multipart, read_within,
                                 refusal_reason, unless_disconnected)
from catsdogs.inference import (NO_HEAT_MAPS, Explanation, Prediction, Predictor, check_artifact, heat_overlay, overlay_size,
                                resolve_model)
from catsdogs.presets import ImageError

# %%
#| hide
import contextlib
import io
import tempfile
from IPython.display import display
from nbdev.showdoc import show_doc
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from fastcore.test import test_eq
from catsdogs.presets import demo_data_dir
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
         "p_cat_or_dog": "Probability that the photo shows a cat or a dog at all (calibrated under an even prior); null when the open set is off"}

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
        {"label": "dog", "confidence": 0.993, "probabilities": {"cat": 0.007, "dog": 0.993}, "p_dog": 0.993,
         "p_cat_or_dog": 0.998, "model_version": "3f2c9a1b7d4e"},
        {"label": "neither", "confidence": 0.991, "probabilities": {"cat": 0.62, "dog": 0.38}, "p_dog": 0.38,
         "p_cat_or_dog": 0.009, "model_version": "3f2c9a1b7d4e"}]})
    label: str = Field(description=_DOCS["label"])
    confidence: float = Field(description=_DOCS["confidence"])
    probabilities: dict[str, float] = Field(description=_DOCS["probabilities"])
    p_dog: float = Field(description=_DOCS["p_dog"])
    p_cat_or_dog: float|None = Field(None, description=_DOCS["p_cat_or_dog"])
    explanation: ExplanationOut|None = Field(None, description="With `explain=true`: where the answer comes from")
    model_version: str

class BatchItem(BaseModel):
    "One file of a batch: its prediction, or the error that stopped it."
    filename: str
    label: str|None = Field(None, description=_DOCS["label"])
    confidence: float|None = Field(None, description=_DOCS["confidence"])
    probabilities: dict[str, float]|None = Field(None, description=_DOCS["probabilities"])
    p_dog: float|None = Field(None, description=_DOCS["p_dog"])
    p_cat_or_dog: float|None = Field(None, description=_DOCS["p_cat_or_dog"])
    explanation: ExplanationOut|None = Field(None, description="With `explain=true`: where the answer comes from")
    error: str|None = None
    status: int = 200

class BatchOut(BaseModel):
    "The answers for a batch, in upload order."
    results: list[BatchItem]
    model_version: str

class UrlIn(BaseModel):
    "JSON body of `/predict` for an image on the web."
    url: str


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
test_eq(UrlIn.model_validate_json('{"url": "https://example.com/cat.jpg"}').url, "https://example.com/cat.jpg")
test_eq(HealthOut().model_dump(), {"status": "ok"})
test_eq(ErrorOut(detail="this file is not an image").model_dump_json(), '{"detail":"this file is not an image"}')
registry = RegistryOut(uri="models:/catsdogs@production", name="catsdogs", version=2, alias="production", run_id="9e1c")
test_eq(PreviousModel(model_version="3f2c9a1b7d4e", registry=registry).registry.version, 2)
PredictionOut.model_json_schema()["examples"][1], BatchOut(results=[item], model_version="3f2c9a1b7d4e").model_dump(exclude_none=True)

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

    async def start(self):
        "Create the batcher and the URL client (inside the running event loop)."
        s = self.settings
        self.batcher = MicroBatcher(self._run_batch, s)
        timeout = httpx.Timeout(s.url_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)

    async def stop(self):
        "Close the batcher (queued requests get 503) and the URL client."
        await self.batcher.close(); await self.client.aclose()

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
        self.metrics.predictions.labels(p.label).inc()
        if explain and p.explanation is None: raise self.no_heat_maps()  # a reload swapped in a model without maps
        why = await self._explained(p.explanation) if explain else None
        return PredictionOut(**{**vars(p), "explanation": why}, model_version=version)

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
        self.metrics.describe(predictor)
        logger.info("reloaded: serving %r", predictor)
        return predictor

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
for method in (Service.start, Service.predict_bytes, Service.reload, Service.fetch, Service.stop): display(show_doc(method))


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

def _errors(*statuses:int) -> dict:
    "OpenAPI `responses` for error `statuses`, each a `{\"detail\": ...}` body (`ErrorOut`)."
    return {s: {"model": ErrorOut, "description": _ERROR_TEXT[s]} for s in statuses}

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
                    registry=p.registry)

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
    if not settings.admin_token: raise HTTPException(404, "Not Found")
    if not secrets.compare_digest((authorization or "").encode(), f"Bearer {settings.admin_token}".encode()):
        raise HTTPException(401, "a valid admin token is needed", headers={"WWW-Authenticate": "Bearer"})
    before = service.predictor
    try: after = await service.reload()
    except Exception as e: raise HTTPException(409, f"the model could not be loaded; still serving the previous one: {e}")
    return ReloadOut(previous=PreviousModel(model_version=before.model_version, registry=before.registry),
                     model_version=after.model_version, registry=after.registry, backend=after.backend, precision=after.precision)

@router.get("/metrics", response_class=_PrometheusText)
def metrics(request:Request) -> _PrometheusText:
    "Prometheus metrics: requests, latency, predictions, batch sizes, model info."
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

def _web_page() -> str:
    "The single-file web page shipped in `catsdogs/static`."
    return (resources.files("catsdogs")/"static"/"index.html").read_text(encoding="utf-8")


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
    app.state.service, app.state.metrics, app.state.page = None, Metrics(), _web_page()
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
    test_eq(set(answer.json()), {"label", "confidence", "probabilities", "p_dog", "p_cat_or_dog", "explanation", "model_version"})
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
# ## `catsdogs_serve`
#
# The artifact is checked before uvicorn starts, so a missing or unreadable model stops the
# command with a clear message and a non-zero exit code. With one worker the app is built
# here; uvicorn needs an import string for several workers, so the flags travel to the
# workers as `CATSDOGS_*` environment variables and each builds its app with `app_from_env`.

# %%
#| export
_SERVE_FIELDS = [InferenceSettings, ServingSettings, *MODEL_SOURCE, "max_image_pixels"]  # the flags of catsdogs_serve

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
