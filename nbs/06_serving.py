# %%
#| default_exp serving

# %% [markdown]
# # Serving
#
# > A FastAPI service around the `Predictor`: uploads and URLs in, calibrated probabilities out, with limits, micro-batching, metrics and a web page.

# %% [markdown]
# `create_app(settings)` builds the service; `catsdogs_serve` runs it under uvicorn.
#
# | route | what it does |
# |---|---|
# | `GET /` | the web page (drop photos or paste a URL) |
# | `GET /health` | liveness: the process answers |
# | `GET /ready` | readiness: 503 until the model is loaded, then which model, engine and registry version |
# | `POST /predict` | one image: multipart `file`, raw `image/*` body, `?url=` or JSON `{"url": ...}` |
# | `POST /predict/batch` | several multipart `files` (at most `max_batch_files`) |
# | `GET /metrics` | Prometheus metrics |
# | `POST /admin/reload` | load the model again (a `models:/NAME@ALIAS` follows its alias); needs `admin_token` |
#
# A reload builds the new predictor beside the old one (engine choice included), then swaps it
# in between two batches: the batch running finishes on the old model, and no request fails.
# With `--workers N` each worker process reloads when a POST reaches it, so send one per worker
# or, in Kubernetes, run one worker per pod and roll the Deployment.
# | `GET /docs` | the OpenAPI page |
#
# Every answer carries `label` (`"cat"`, `"dog"`, or `"neither"` when the photo shows no cat or
# dog: a 200 answer, not an error), `confidence`, `probabilities` and `p_dog` (given that it is a
# cat or a dog), and `p_cat_or_dog`, the probability that it shows one at all (see the model
# notebook's open-set head). `--no-open-set` (or `CATSDOGS_OPEN_SET=false`) answers cat or dog
# for everything; `--open-set-threshold` overrides the artifact's threshold.
#
# Design choices, each against a mistake such services keep making:
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
# - every bad input is a JSON `{"detail": ...}` with a 4xx status, in plain words;
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
import ipaddress
import logging
import os
import queue
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Callable

import anyio
import httpx
import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from catsdogs.config import Settings, get_settings, parse_settings, settings_parser
from catsdogs.inference import Prediction, Predictor, check_artifact, resolve_model
from catsdogs.presets import ImageError

# %%
#| hide
import tempfile
from fastapi.testclient import TestClient
from fastcore.test import test_eq
from catsdogs.presets import demo_data_dir
from catsdogs.model import build_model, config_for_backbone, export_artifact

# %%
#| export
logger = logging.getLogger("catsdogs.serving")

# %% [markdown]
# The examples serve a small untrained model from a temporary folder.

# %%
tmp = tempfile.TemporaryDirectory()
artifact = export_artifact(build_model("small_cnn", pretrained=False), Path(tmp.name)/"model",
                           config_for_backbone("small_cnn", 96, 0.875))
data_dir = demo_data_dir()
cat_jpg = sorted((data_dir/"Cat").glob("cat.*.jpg"))[0]

# %% [markdown]
# ## Bad images in plain words
#
# `load_image` raises `ImageError` with a short reason; the API turns each reason into a
# status and a sentence a person can act on.

# %%
#| export
_IMAGE_ERRORS = {  # ImageError.reason -> (HTTP status, message)
    "empty file": (400, "the file is empty"),
    "not an image": (415, "this file is not an image"),
    "corrupt or truncated image": (400, "the image is corrupt or truncated"),
    "too many pixels": (413, "the image has too many pixels"),
}

def image_http_error(error:ImageError) -> HTTPException:
    "The `HTTPException` (status and plain-words detail) for an `ImageError`."
    status, message = _IMAGE_ERRORS.get(error.reason, (400, f"the image cannot be used ({error.reason})"))
    detail = str(error).split(": ", 1)[1] if ": " in str(error) else ""
    if error.reason == "too many pixels" and detail: message += f" ({detail})"
    return HTTPException(status, message)


# %%
test_eq(image_http_error(ImageError("not an image", "unknown format")).status_code, 415)
test_eq(image_http_error(ImageError("too many pixels", "1x2 is over")).detail, "the image has too many pixels (1x2 is over)")

# %% [markdown]
# ## Which addresses a URL may reach
#
# `refusal_reason` says why an address must not be fetched, or `None`. IPv4 addresses wrapped
# in IPv6 (`::ffff:10.0.0.1`, 6to4) are judged by the IPv4 address inside.

# %%
#| export
_REFUSED_KINDS = ("loopback", "link_local", "multicast", "unspecified", "reserved", "private")

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

def refusal_reason(address:str, # An IP address, as resolution returns it
                   allow_private:bool=False) -> str|None:
    "Why a fetch from `address` is refused (loopback, private, ...), or None when it is allowed."
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64: ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # NAT64 reaches the embedded IPv4 address
        else: ip = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else ip)
    if allow_private: return None
    for kind in _REFUSED_KINDS:
        if getattr(ip, f"is_{kind}"): return f"{kind.replace('_', '-')} address"
    return None if ip.is_global else "non-public address"


# %%
for addr, kind in [("10.0.0.1", "private"), ("169.254.169.254", "link-local"), ("192.168.1.1", "private"),
                   ("::1", "loopback"), ("224.0.0.1", "multicast"), ("127.0.0.1", "loopback"),
                   ("::ffff:10.0.0.1", "private"), ("64:ff9b::a00:1", "private"), ("0.0.0.0", "unspecified"),
                   ("100.64.0.1", "non-public")]:
    test_eq(refusal_reason(addr), f"{kind} address")
test_eq(refusal_reason("93.184.216.34"), None)
test_eq(refusal_reason("127.0.0.1", allow_private=True), None)


# %% [markdown]
# ## Fetching a URL
#
# `fetch_url` follows redirects itself. For each hop it checks the scheme, resolves the host
# with `resolver` (`socket.getaddrinfo` unless a test passes another), refuses the hop if any
# address is refused, and then connects to the checked address, sending the original host
# name in `Host` and TLS SNI. The body streams in chunks and stops at `max_bytes`.

# %%
#| export
class FetchRefused(HTTPException):
    "A URL that is not fetched, with the reason (HTTP 400 unless said otherwise)."
    def __init__(self, reason:str, status:int=400): super().__init__(status, reason)

async def _checked_address(url:httpx.URL, resolver:Callable, guard:Callable, allow_private:bool) -> str:
    "The address to connect to for `url`, after checking every address its host resolves to."
    if url.scheme not in ("http", "https"): raise FetchRefused(f"only http and https URLs are fetched, not {url.scheme or 'this'!r}")
    if not url.host: raise FetchRefused("the URL has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    try: infos = await anyio.to_thread.run_sync(lambda: resolver(url.host, port, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError) as e: raise FetchRefused(f"cannot resolve host {url.host!r}: {e}")
    addresses = sorted(dict.fromkeys(info[4][0] for info in infos), key=lambda a: ":" in a)  # IPv4 first
    if not addresses: raise FetchRefused(f"cannot resolve host {url.host!r}")
    for address in addresses:
        if reason := guard(address, allow_private): raise FetchRefused(f"refused: {url.host} resolves to {address}, a {reason}")
    return addresses[0]

async def fetch_url(url:str, # http(s) URL of an image
                    client:httpx.AsyncClient, # Client with timeouts and `follow_redirects=False`
                    max_bytes:int, # Refuse larger bodies (413) while streaming
                    resolver:Callable=socket.getaddrinfo, # `getaddrinfo`-like host resolver
                    guard:Callable=refusal_reason, # `(address, allow_private) -> reason or None`
                    allow_private:bool=False, max_redirects:int=5) -> bytes:
    "The body of `url`, following redirects by hand and checking every hop's addresses first."
    try: current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e: raise FetchRefused(f"not a valid URL: {e}")
    for _ in range(max_redirects + 1):
        address = await _checked_address(current, resolver, guard, allow_private)
        headers = {"Host": current.netloc.decode("ascii"), "Accept": "image/*", "User-Agent": "catsdogs",
                   "Accept-Encoding": "identity"}  # no compressed bodies that inflate past the size check
        extensions = {"sni_hostname": current.host} if current.scheme == "https" else {}
        async with client.stream("GET", current.copy_with(host=address), headers=headers, extensions=extensions) as response:
            if response.is_redirect and "location" in response.headers:
                current = current.join(response.headers["location"]); continue
            if response.status_code != 200: raise FetchRefused(f"the URL answered HTTP {response.status_code}")
            if int(response.headers.get("content-length") or 0) > max_bytes:
                raise FetchRefused(f"the image at the URL is over the limit of {max_bytes:,} bytes", 413)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes: raise FetchRefused(f"the image at the URL is over the limit of {max_bytes:,} bytes", 413)
            return bytes(body)
    raise FetchRefused(f"more than {max_redirects} redirects")


# %% [markdown]
# Refusals happen before any connection: a non-http scheme, a literal private address, or a
# host name that resolves to one (here through a stand-in resolver, so nothing is sent anywhere).

# %%
def fake_resolver(host, port, type=0):
    "Resolve `internal.example` to a private address, and literal IPs to themselves."
    ip = "10.1.2.3" if host == "internal.example" else host
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

async def refusal(url):
    async with httpx.AsyncClient() as client:
        try: await fetch_url(url, client, 1000, resolver=fake_resolver)
        except FetchRefused as e: return e.detail

test_eq(await refusal("file:///etc/passwd"), "only http and https URLs are fetched, not 'file'")
test_eq(await refusal("http://169.254.169.254/latest/meta-data"), "refused: 169.254.169.254 resolves to 169.254.169.254, a link-local address")
test_eq(await refusal("http://internal.example/cat.jpg"), "refused: internal.example resolves to 10.1.2.3, a private address")


# %% [markdown]
# ## Reading request bodies within the limit
#
# The body is read chunk by chunk; a `Content-Length` over the limit is refused before
# reading, and a body without one (chunked) is refused as soon as it passes the limit.
# Multipart bodies go through python-multipart's streaming parser, so each file is held to the
# limit while it arrives.

# %%
#| export
@dataclass
class Upload:
    "One part of a multipart body."
    name: str = ""
    filename: str = ""
    data: bytearray = field(default_factory=bytearray)

def _too_large(limit:int, what:str="the upload") -> HTTPException:
    return HTTPException(413, f"{what} is over the limit of {limit:,} bytes")

def _check_length(request:Request, limit:int):
    "Refuse early when the declared Content-Length is over `limit`."
    try: declared = int(request.headers.get("content-length") or 0)
    except ValueError: raise HTTPException(400, "invalid Content-Length header")
    if declared > limit: raise _too_large(limit)

async def read_body(request:Request, limit:int) -> bytes:
    "The whole body, refused with 413 as soon as it passes `limit` bytes."
    _check_length(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit: raise _too_large(limit)
    return bytes(body)


# %%
#| export
def _multipart_parser(boundary:bytes, parts:list[Upload]) -> MultipartParser:
    "A streaming parser that appends each part, with its name and filename, to `parts`."
    header = {"field": bytearray(), "value": bytearray()}
    def on_part_begin(): parts.append(Upload())
    def on_header_field(data, start, end): header["field"] += data[start:end]
    def on_header_value(data, start, end): header["value"] += data[start:end]
    def on_header_end():
        if bytes(header["field"]).lower() == b"content-disposition":
            _, options = parse_options_header(bytes(header["value"]))
            parts[-1].name = options.get(b"name", b"").decode("utf-8", "replace")
            parts[-1].filename = options.get(b"filename", b"").decode("utf-8", "replace")
        header["field"].clear(); header["value"].clear()
    def on_part_data(data, start, end): parts[-1].data += data[start:end]
    return MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                      "on_header_value": on_header_value, "on_header_end": on_header_end,
                                      "on_part_data": on_part_data})

async def read_multipart(request:Request,
                         max_part_bytes:int, # Largest file
                         max_files:int=1, # Most parts
                         max_total_bytes:int|None=None) -> list[Upload]:
    "The parts of a multipart body, streamed: 413 as soon as a part, the part count or the total passes its limit."
    _, options = parse_options_header(request.headers.get("content-type", ""))
    if not options.get(b"boundary"): raise HTTPException(400, "multipart body without a boundary")
    total_limit = max_total_bytes or max_part_bytes * max_files + 64 * 1024
    _check_length(request, total_limit)
    parts: list[Upload] = []
    parser, total = _multipart_parser(options[b"boundary"], parts), 0
    async for chunk in request.stream():
        try: parser.write(chunk)
        except Exception as e: raise HTTPException(400, f"malformed multipart body: {e}")
        if sum(1 for p in parts if p.filename) > max_files: raise HTTPException(413, f"too many files: at most {max_files} per request")
        if parts and len(parts[-1].data) > max_part_bytes: raise _too_large(max_part_bytes, f"file {parts[-1].filename or parts[-1].name!r}")
        total += len(chunk)
        if total > total_limit: raise _too_large(total_limit, "the request")
    parser.finalize()
    return parts


# %% [markdown]
# Bodies as a client sends them, in chunks (here fed to starlette's `Request` the way uvicorn
# feeds it): within the limit they are read whole, past it refused with 413 while reading.

# %%
def chunked_request(body:bytes, ctype:str, chunk:int=4096) -> Request:
    "A `Request` whose body arrives in `chunk`-byte messages."
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = iter([{"type": "http.request", "body": c, "more_body": i < len(parts) - 1} for i, c in enumerate(parts)])
    async def receive(): return next(messages)
    return Request({"type": "http", "method": "POST", "headers": [(b"content-type", ctype.encode())]}, receive)

photo = cat_jpg.read_bytes()
test_eq(await read_body(chunked_request(photo, "image/jpeg"), limit=len(photo)), photo)
try: await read_body(chunked_request(photo, "image/jpeg"), limit=10_000); raise AssertionError("not refused")
except HTTPException as e: test_eq(e.status_code, 413)
form = httpx.Request("POST", "http://x/predict", files={"file": ("cat.jpg", photo, "image/jpeg")}, data={"note": "hi"})
parts = await read_multipart(chunked_request(form.read(), form.headers["content-type"]), max_part_bytes=len(photo))
test_eq(isinstance(parts[0], Upload), True)
[(p.name, p.filename, len(p.data)) for p in parts]


# %% [markdown]
# ## The micro-batcher
#
# Requests `submit` their input and wait. The inference thread takes whatever is queued (up to
# `max_batch_size`), runs `run_batch` on the lot and hands each request its result through the
# event loop; then it takes the next batch at once, without waiting for the event loop, so
# requests that arrived during a pass form the next one. One refinement: clients that were just
# answered tend to send their next request at once, so while a batch is smaller than the one
# before it, the thread waits up to `wait_ms` for more. Without it, eight clients settle into
# batches of 7 and 1 (measured), and a batch of one costs a third more per image; with it they
# share batches of 8. A lone client does not wait: after its first request, the batch before
# its own had one image.
# `run_batch` may answer an exception for one input: only that request fails.
#
# ### Engine, threads, batch size and wait: measured, not assumed
#
# The defaults come from `benchmarks/bench_engines.py` and `benchmarks/bench_serve.py` on this
# project's 2-core machine on 2026-12-02 (an AMD EPYC without AVX-512 or AMX, so OpenVINO
# offers f32 only here; on an AMX Xeon it also offers bf16, measured 2.5x faster than ONNX
# Runtime at batch 8). EfficientNet-Lite0 at 288 px, images/s of the forward pass alone:
#
# | engine | threads | batch 1 | batch 2 | batch 4 | batch 8 | batch 16 |
# |---|---|---|---|---|---|---|
# | ONNX Runtime f32 | 1 | 46 | 46 | 46 | 48 | 47 |
# | OpenVINO f32 | 1 | 44 | 44 | 40 | 39 | 37 |
# | ONNX Runtime f32 | 2 | 75 | 77 | 66 | 76 | 73 |
# | OpenVINO f32 | 2 | 55 | 54 | 54 | 52 | 56 |
#
# - **Threads**: both engines run best on every core (`threads=0`), one stream: a second stream
#   would only split the same two cores. Decoding uses the same threads, in turn with the
#   forward pass (decoding beside it left the engine's threads waiting for cores).
# - **Engine**: on this CPU the two are within the machine's day-to-day noise once decoding is
#   counted (decode + forward: 47 to 64 images/s for ONNX Runtime, 41 to 55 for OpenVINO
#   over the runs of the day), so `auto` measures at start-up and may pick either; where bf16
#   units exist, OpenVINO bf16 wins by a wide margin and `auto` finds it.
# - **Batch size 8**: the forward pass gains nothing past batch 8 here, and memory grows with
#   it: ONNX Runtime's process held 246 MB after a batch of 8 and 390 MB after a batch of 16
#   (328 MB and 567 MB with its per-shape memory plans, now off). So `max_batch_size` is 8.
# - **Wait 10 ms**: at concurrency 8, `batch_wait_ms` 2 formed batches of 4 on average, 10 formed
#   batches of 8 (7.7 to 7.9), with 6% and 23% more requests/s and a lower p50 in two paired
#   runs: the wait is short beside a 150 ms forward pass of 8 images. A lone client still never
#   waits.

# %%
#| export
class BatcherClosed(RuntimeError):
    "Raised to requests submitted once the batcher is shutting down, and to those still queued then."

class Overloaded(RuntimeError):
    "Raised at once to a request that finds `max_queue` inputs already waiting."

class DeadlineExceeded(RuntimeError):
    "Raised to a request not answered within `timeout_s`; its input is skipped if it has not run yet."

class MicroBatcher:
    "Collect concurrently submitted inputs into batches for one function run in its own thread; bounded, with a deadline."
    def __init__(self, run_batch:Callable, # list of inputs -> list of results (or exceptions), run in the inference thread
                 max_batch_size:int=16, # Most inputs per call
                 wait_ms:float=2.0, # Most a batch smaller than the previous one waits for more inputs
                 max_queue:int=64, # Most inputs waiting or running; past it `submit` raises `Overloaded`
                 timeout_s:float|None=None): # Deadline of each input, from `submit`; None: none
        self.run_batch, self.max_batch_size, self.wait_s = run_batch, max_batch_size, wait_ms / 1000
        self.max_queue, self.timeout_s, self.waiting = max_queue, timeout_s, 0  # `waiting`: submitted, not yet answered
        self.last_size, self.closed = 1, False  # size of the previous batch; set by `close`
        self.loop = asyncio.get_running_loop()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="catsdogs-inference", daemon=True)
        self.thread.start()

    async def submit(self, x):
        "The result for one input, computed in a shared batch (raised, if `run_batch` answered an exception)."
        if self.closed or not self.thread.is_alive(): raise BatcherClosed("the server is shutting down")
        if self.waiting >= self.max_queue: raise Overloaded(f"the server is busy ({self.waiting} images waiting); retry shortly")
        future = self.loop.create_future()
        self.waiting += 1  # only the event loop's thread counts, so no lock
        try:
            self.queue.put((x, future))
            async with asyncio.timeout(self.timeout_s):  # on expiry the future is cancelled: the inference thread skips it
                return await future
        except TimeoutError: raise DeadlineExceeded(f"no answer within {self.timeout_s:g} s; the server is busy, retry shortly") from None
        finally: self.waiting -= 1

    async def close(self):
        "Stop: the batch running finishes, inputs still queued get `BatcherClosed` (a 503), later submissions too."
        self.closed = True
        self.queue.put(_STOP)
        await anyio.to_thread.run_sync(self.thread.join)

    def _next_batch(self) -> list|None:
        "The queue's head and what else is queued, waiting up to `wait_ms` while smaller than the last batch; None once closed."
        head = self.queue.get()
        if head is _STOP or self.closed: return self._give_back([head])
        batch, deadline = [head], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic() if len(batch) < self.last_size else 0
            try: item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty: break
            if item is _STOP: return self._give_back(batch)
            batch.append(item)
        self.last_size = len(batch)
        return batch

    def _give_back(self, items:list) -> None:
        "Requeue `items` (once closed, the inference thread fails what is queued) and return None."
        for item in items:
            if item is not _STOP: self.queue.put(item)

    def _run_one(self, batch:list) -> list|BaseException:
        "`run_batch` on the inputs of `batch`: its results, or the exception that stopped it (then every input gets it)."
        try: results = self.run_batch([x for x, _ in batch])
        except BaseException as e: return e
        if len(results) != len(batch): return RuntimeError(f"run_batch gave {len(results)} results for {len(batch)} inputs")
        return results

    def _work(self):
        "The inference thread: run batches until closed, then fail whatever is still queued."
        try:
            while (batch := self._next_batch()) is not None:
                batch = [(x, f) for x, f in batch if not f.cancelled()]  # the client went away or the deadline passed: skip
                if batch: self.loop.call_soon_threadsafe(_settle, batch, self._run_one(batch))
        except RuntimeError: return  # the event loop is closed
        finally:
            left = []
            while True:
                try: item = self.queue.get_nowait()
                except queue.Empty: break
                if item is not _STOP: left.append(item)
            if left and not self.loop.is_closed(): self.loop.call_soon_threadsafe(_settle, left, BatcherClosed("the server is shutting down"))

_STOP = None  # what `close` queues

def _settle(batch:list, results:list|BaseException):
    "On the event loop: give each waiting request its result or exception (cancelled ones are skipped)."
    for i, (_, future) in enumerate(batch):
        if future.done(): continue
        r = results if isinstance(results, BaseException) else results[i]
        if isinstance(r, StopIteration): r = RuntimeError(repr(r))  # a future refuses StopIteration
        if isinstance(r, BaseException): future.set_exception(r)
        else: future.set_result(r)


# %%
#| echo: false
from nbdev.showdoc import show_doc
from IPython.display import display
for method in (MicroBatcher.submit, MicroBatcher.close): display(show_doc(method))

# %% [markdown]
# Eight requests submitted together share few batches, and a bad input fails only its own request:

# %%
sizes = []
def double(xs):
    sizes.append(len(xs)); time.sleep(0.01)
    return [ValueError(f"no {x}") if x < 0 else x * 2 for x in xs]

batcher = MicroBatcher(double, max_batch_size=4)
results = await asyncio.gather(*(batcher.submit(i) for i in [0, 1, 2, -3, 4, 5, 6, 7]), return_exceptions=True)
await batcher.close()
test_eq(results[:3] + results[4:], [0, 2, 4, 8, 10, 12, 14])
test_eq(str(results[3]), "no -3")
test_eq(max(sizes) <= 4 and len(sizes) < 8, True)
sizes


# %% [markdown]
# A client answered in a batch of two that comes back within `wait_ms` joins the next batch; a
# lone client is answered without waiting:

# %%
async def submit_later(x, delay:float):
    await asyncio.sleep(delay); return await batcher.submit(x)

batcher = MicroBatcher(double, max_batch_size=8, wait_ms=300)
await asyncio.gather(batcher.submit(0), batcher.submit(1))  # batches of 2 from here on
sizes.clear()
await asyncio.gather(batcher.submit(2), submit_later(3, 0.05))
test_eq(sizes, [2])
await batcher.submit(4); sizes.clear()  # alone, after waiting for a partner: the last batch had one image
start = time.perf_counter(); await batcher.submit(5)
test_eq((sizes, time.perf_counter() - start < 0.2), ([1], True))
await batcher.close()
try: await batcher.submit(6); raise AssertionError("accepted after close")
except BatcherClosed as e: test_eq(str(e), "the server is shutting down")

# %% [markdown]
# Under overload the batcher refuses rather than queueing without end: past `max_queue` inputs
# waiting, `submit` raises `Overloaded` at once (the API answers 503 with `Retry-After`), and
# an input not answered within `timeout_s` raises `DeadlineExceeded` and is never run:

# %%
ran = []
def slow(xs): ran.extend(xs); time.sleep(0.4); return xs
batcher = MicroBatcher(slow, max_batch_size=1, max_queue=3, timeout_s=0.6)
results = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
await batcher.close()
test_eq([type(r).__name__ for r in results], ["int", "DeadlineExceeded", "DeadlineExceeded", "Overloaded", "Overloaded"])
test_eq(ran, [0, 1])  # the second ran but answered too late; the third expired in the queue and never ran
results


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
metrics = Metrics()
metrics.refused.labels("overloaded").inc()
[line for line in generate_latest(metrics.registry).decode().splitlines() if line.startswith("catsdogs_refused")]

# %% [markdown]
# ## The service state
#
# `Service` holds what the lifespan creates: the predictor, the batcher, its decode threads and
# the HTTP client for URL fetches. `predict_bytes` is the one path from uploaded bytes to an
# answer. A batch decodes its images in parallel (one thread per inference thread), then runs one
# forward pass of those that decoded: the same decode-then-forward work as the in-process
# ceiling the serving benchmark measures. Running decoding beside the forward pass instead
# (threads of their own) left ONNX Runtime's threads waiting for cores that decoding held.
# Decompression bombs are refused before decoding, and JPEGs decode at reduced size, but a
# large PNG still delays the batch it is in.

# %%
#| export
_DOCS = {"label": '"cat", "dog", or "neither" when the photo does not look like a cat or a dog (a 200 answer, not an error)',
         "confidence": 'Probability of `label`: P(that class | a cat or a dog), or 1 - p_cat_or_dog for "neither"',
         "probabilities": "Each class's calibrated probability, given that the photo shows a cat or a dog",
         "p_dog": "P(dog | a cat or a dog)",
         "p_cat_or_dog": "Probability that the photo shows a cat or a dog at all (calibrated under an even prior); null when the open set is off"}

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
    model_version: str

class BatchItem(BaseModel):
    "One file of a batch: its prediction, or the error that stopped it."
    filename: str
    label: str|None = Field(None, description=_DOCS["label"])
    confidence: float|None = Field(None, description=_DOCS["confidence"])
    probabilities: dict[str, float]|None = Field(None, description=_DOCS["probabilities"])
    p_dog: float|None = Field(None, description=_DOCS["p_dog"])
    p_cat_or_dog: float|None = Field(None, description=_DOCS["p_cat_or_dog"])
    error: str|None = None
    status: int = 200

class BatchOut(BaseModel):
    "The answers for a batch, in upload order."
    results: list[BatchItem]
    model_version: str

class UrlIn(BaseModel):
    "JSON body of `/predict` for an image on the web."
    url: str


# %%
#| export
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
    decoder: ThreadPoolExecutor|None = None
    reloading: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self):
        "Create the batcher, its decode threads and the URL client (inside the running event loop)."
        s = self.settings
        self.decoder = ThreadPoolExecutor(self.predictor.threads, thread_name_prefix="catsdogs-decode")
        self.batcher = MicroBatcher(self._run_batch, s.max_batch_size, s.batch_wait_ms, s.max_queue, s.request_timeout_s)
        timeout = httpx.Timeout(s.url_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)

    async def stop(self):
        await self.batcher.close(); await self.client.aclose(); self.decoder.shutdown(wait=False)

    def _run_batch(self, datas:list[bytes]) -> list[tuple[Prediction, str]|Exception]:
        "Decode a batch in parallel, then one forward pass of the images that decoded (in the inference thread)."
        predictor = self.predictor  # a reload swaps it between batches, never within one
        def decode(data:bytes) -> np.ndarray|Exception:  # an error (`ImageError` for bad images) fails its request alone
            try: return predictor.preprocess(data, self.settings.max_image_pixels)
            except Exception as e: return e
        decoded = [decode(datas[0])] if len(datas) == 1 else list(self.decoder.map(decode, datas))
        good = [x for x in decoded if isinstance(x, np.ndarray)]
        if not good: return decoded
        start = time.perf_counter()
        predictions = iter(predictor.predict_arrays(np.stack(good)))
        self.metrics.inference.observe(time.perf_counter() - start); self.metrics.batch_size.observe(len(good))
        return [(next(predictions), predictor.model_version) if isinstance(x, np.ndarray) else x for x in decoded]

    async def predict_bytes(self, data:bytes) -> PredictionOut:
        "Decode and predict in a shared batch, off the event loop; bad images raise a 4xx, overload a 503 `HTTPException`."
        try: p, version = await self.batcher.submit(data)
        except ImageError as e: raise image_http_error(e) from None
        except (BatcherClosed, Overloaded, DeadlineExceeded) as e:
            self.metrics.refused.labels(_REFUSALS[type(e)]).inc()
            raise HTTPException(503, str(e), headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        self.metrics.predictions.labels(p.label).inc()
        return PredictionOut(**p.to_dict(), model_version=version)

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
# The response models are what the OpenAPI page documents, with examples:

# %%
item = BatchItem(filename="notes.txt", error="this file is not an image", status=415)
test_eq(UrlIn.model_validate_json('{"url": "https://example.com/cat.jpg"}').url, "https://example.com/cat.jpg")
PredictionOut.model_json_schema()["examples"][1], BatchOut(results=[item], model_version="3f2c9a1b7d4e").model_dump(exclude_none=True)


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
    app.state.service, app.state.metrics = None, Metrics()
    app.add_middleware(_MetricsMiddleware, metrics=app.state.metrics)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request, exc):  # not an error of ours: logged quietly, counted under nginx's 499
        logger.debug("client went away during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error; the server logged it"}, status_code=500)

    _add_routes(app, _web_page())
    return app


# %% [markdown]
# ### Routes
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
_ERRORS = {s: {"description": d} for s, d in [(400, "bad input or refused URL"), (408, "the body took longer than body_timeout_s"),
                                              (413, "too large"), (415, "not an image"),
                                              (503, "model not loaded yet, queue full or past the deadline: retry after Retry-After")]}

async def _within(seconds:float, reading):
    "Await `reading` (of a request body), or 408 with `Connection: close` after `seconds`: a slow upload cannot hold the server."
    try:
        with anyio.fail_after(seconds): return await reading
    except TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {seconds:g} s", headers={"Connection": "close"}) from None

async def _until_disconnect(request:Request):
    "Return once the client has closed the connection (call only after the body is read)."
    while (await request.receive())["type"] != "http.disconnect": pass

async def unless_disconnected(request:Request, work):
    "The result of `work`, or `ClientDisconnect` as soon as the client goes away (then `work` is cancelled: a queued image is skipped)."
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnect(request))
    try: done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done(): task.cancel()
    if task not in done: raise ClientDisconnect()
    return task.result()

async def _image_bytes(request:Request, service:Service, url:str|None) -> bytes:
    "The image of a `/predict` request: from `?url=`, a JSON `{\"url\"}`, a multipart `file` or a raw image body."
    limit, deadline = service.settings.max_upload_bytes, service.settings.body_timeout_s
    if url: return await service.fetch(url)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parts = [p for p in await _within(deadline, read_multipart(request, limit)) if p.name == "file"]
        if not parts: raise HTTPException(400, "send the image in a multipart field named 'file'")
        return bytes(parts[0].data)
    if ctype == "application/json":
        try: body = UrlIn.model_validate_json(await _within(deadline, read_body(request, 64 * 1024)))
        except ValueError: raise HTTPException(400, 'a JSON body must be {"url": "https://..."}')
        return await service.fetch(body.url)
    if ctype.startswith("image/") or ctype == "application/octet-stream": return await _within(deadline, read_body(request, limit))
    raise HTTPException(415, "send multipart/form-data with a 'file' field, an image/* body, ?url=, or JSON {\"url\": ...}")


# %%
#| export
def _add_routes(app:FastAPI, page:str):
    "Register the routes of the service on `app`."
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:  # on the event loop: never waits behind the thread pool
        "Liveness: the process is up."
        return {"status": "ok"}

    @app.get("/ready", responses={503: _ERRORS[503]})
    def ready(service:ServiceDep) -> dict:
        "Readiness: the model, its version (and registry version), the data it was trained on, the engine and precision."
        p, c = service.predictor, service.predictor.config
        return {"status": "ready", "model": c.architecture, "architecture": c.architecture, "model_version": p.model_version,
                "code_version": c.code_version, "created": c.created, "dataset_version": c.dataset_version,
                "backend": p.backend, "precision": p.precision, "tta": p.tta, "class_names": list(c.class_names),
                "metrics": c.metrics, "open_set": p.open_set is not None,
                "open_set_threshold": p.threshold if p.open_set is not None else None, "registry": p.registry}

    @app.post("/predict", response_model=PredictionOut, openapi_extra=_IMAGE_FORMS, responses=_ERRORS)
    async def predict(request:Request, service:ServiceDep,
                      url:Annotated[str|None, Query(description="http(s) URL of an image to fetch")]=None) -> PredictionOut:
        "Cat, dog or neither for one image: a multipart `file`, a raw image body, `?url=` or JSON `{\"url\": ...}`."
        data = await _image_bytes(request, service, url)
        return await unless_disconnected(request, service.predict_bytes(data))

    @app.post("/predict/batch", response_model=BatchOut, openapi_extra=_BATCH_FORM, responses=_ERRORS)
    async def predict_batch(request:Request, service:ServiceDep, settings:SettingsDep) -> BatchOut:
        "Cat, dog or neither for each of several multipart `files`; a bad file gets its own error."
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise HTTPException(415, "send multipart/form-data with one or more 'files' fields")
        parts = await _within(settings.body_timeout_s, read_multipart(request, settings.max_upload_bytes, settings.max_batch_files))
        files = [p for p in parts if p.name in ("files", "file")]
        if not files: raise HTTPException(400, "no files: send them in multipart fields named 'files'")
        answers = await unless_disconnected(request, asyncio.gather(*(service.predict_bytes(bytes(f.data)) for f in files),
                                                                    return_exceptions=True))
        results = []
        for f, a in zip(files, answers):
            if isinstance(a, HTTPException): results.append(BatchItem(filename=f.filename, error=a.detail, status=a.status_code))
            elif isinstance(a, BaseException): raise a
            else: results.append(BatchItem(filename=f.filename, **a.model_dump(exclude={"model_version"})))
        return BatchOut(results=results, model_version=service.predictor.model_version)

    @app.post("/admin/reload", responses={401: {"description": "no or wrong token"}, 404: {"description": "no admin_token set"}})
    async def reload(service:ServiceDep, settings:SettingsDep,
                     authorization:Annotated[str|None, Header(description="Bearer <admin_token>")]=None) -> dict:
        "Load the model again (a `models:/NAME@ALIAS` URI follows its alias) and swap it in without failing a request in flight."
        if not settings.admin_token: raise HTTPException(404, "Not Found")
        if not secrets.compare_digest((authorization or "").encode(), f"Bearer {settings.admin_token}".encode()):
            raise HTTPException(401, "a valid admin token is needed", headers={"WWW-Authenticate": "Bearer"})
        before = service.predictor
        try: after = await service.reload()
        except Exception as e: raise HTTPException(409, f"the model could not be loaded; still serving the previous one: {e}")
        return {"status": "reloaded", "previous": {"model_version": before.model_version, "registry": before.registry},
                "model_version": after.model_version, "registry": after.registry, "backend": after.backend, "precision": after.precision}

    @app.get("/metrics")
    def metrics() -> Response:
        "Prometheus metrics: requests, latency, predictions, batch sizes, model info."
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# %% [markdown]
# ### The app at work
#
# `TestClient` runs the lifespan; `tests/test_serving.py` does the same against a real uvicorn
# server and covers every bad input.

# %%
settings = Settings(model_dir=artifact, backend="onnx")
with TestClient(create_app(settings)) as client:
    test_eq(client.get("/health").json(), {"status": "ok"})
    test_eq(client.get("/ready").json()["backend"], "onnx")
    answer = client.post("/predict", files={"file": ("cat.jpg", cat_jpg.read_bytes(), "image/jpeg")})
    test_eq(answer.status_code, 200)
    test_eq(set(answer.json()), {"label", "confidence", "probabilities", "p_dog", "p_cat_or_dog", "model_version"})
    bad = client.post("/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    test_eq((bad.status_code, bad.json()), (415, {"detail": "this file is not an image"}))
    test_eq(client.post("/predict", json={"url": "http://10.0.0.1/cat.jpg"}).json()["detail"],
            "refused: 10.0.0.1 resolves to 10.0.0.1, a private address")
    test_eq("catsdogs_predictions_total" in client.get("/metrics").text, True)
answer.json()

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
# A client that hangs up while its image waits is noticed at once: `unless_disconnected` raises
# `ClientDisconnect` (answered 499) and cancels the work, so a queued image is never run.

# %%
async def hang_up_soon():
    await asyncio.sleep(0.05); return {"type": "http.disconnect"}
start = time.perf_counter()
try: await unless_disconnected(Request({"type": "http"}, hang_up_soon), asyncio.sleep(5)); raise AssertionError("not noticed")
except ClientDisconnect: test_eq(time.perf_counter() - start < 1, True)
async def stay():
    await asyncio.sleep(10); return {"type": "http.disconnect"}
await unless_disconnected(Request({"type": "http"}, stay), asyncio.sleep(0.01, result="answered"))

# %% [markdown]
# Before the lifespan has run (or after it ends) the app is alive but not ready:

# %%
client = TestClient(create_app(settings))
test_eq(client.get("/health").status_code, 200)
test_eq(client.get("/ready").status_code, 503)

# %% [markdown]
# ## `catsdogs_serve`
#
# The artifact is checked before uvicorn starts, so a missing or unreadable model stops the
# command with a clear message and a non-zero exit code. With one worker the app is built
# here; uvicorn needs an import string for several workers, so the flags travel to the
# workers as `CATSDOGS_*` environment variables and each builds its app with `app_from_env`.

# %%
#| export
_SERVE_FLAGS = ["model_dir", "backend", "precision", "tta", "threads", "host", "port", "workers", "max_upload_bytes",
                "max_batch_files", "max_batch_size", "batch_wait_ms", "max_queue", "request_timeout_s", "retry_after_s",
                "body_timeout_s", "max_connections", "keep_alive_s", "url_timeout_s", "allow_private_urls", "max_image_pixels",
                "open_set", "open_set_threshold", "mlflow_tracking_uri", "cache_dir", "admin_token"]

def app_from_env() -> FastAPI:
    "The app configured from `CATSDOGS_*` variables (uvicorn factory for `--workers` > 1)."
    return create_app(Settings())

def _to_env(settings:Settings, names:list[str]):
    "Export the named settings as `CATSDOGS_*` variables for worker processes."
    for name in names:
        value = getattr(settings, name)
        if value is None: os.environ.pop(f"CATSDOGS_{name.upper()}", None)
        else: os.environ[f"CATSDOGS_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)

def serve_cli(argv:list[str]|None=None):
    "Console script `catsdogs_serve`: serve the model over HTTP with uvicorn."
    parser = settings_parser("Serve the cats-vs-dogs model over HTTP.", _SERVE_FLAGS)
    parser.add_argument("--model", dest="model", type=Path, default=None, help="Same as --model-dir (a folder or a models:/ URI)")
    settings, args = parse_settings(parser, argv)
    if args.model is not None: settings.model_dir = args.model
    try: check_artifact(resolve_model(settings.model_dir, settings.mlflow_tracking_uri, settings.cache_dir)[0])
    except (OSError, ValueError) as e: parser.exit(2, f"catsdogs_serve: cannot serve: {e}\n")
    if not str(settings.model_dir).startswith("models:/"): settings.model_dir = Path(settings.model_dir).resolve()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    limits = dict(limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s)
    if settings.workers > 1:
        _to_env(settings, _SERVE_FLAGS)
        uvicorn.run("catsdogs.serving:app_from_env", factory=True, host=settings.host, port=settings.port, workers=settings.workers, **limits)
    else:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, **limits)


# %%
try: serve_cli(["--model-dir", str(Path(tmp.name)/"missing")])
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
tmp.cleanup()
