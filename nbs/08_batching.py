# %%
#| default_exp batching

# %% [markdown]
# # Micro-batching
#
# > A `MicroBatcher` that gives requests arriving together one shared decode-then-forward pass in its own thread, bounded: past `max_queue` it refuses at once, past `timeout_s` a request gives up and its input is skipped.

# %% [markdown]
# A forward pass of eight images costs far less than eight passes of one, but HTTP requests
# come one image at a time. The micro-batcher sits between them: each request `submit`s its
# input and awaits its own result, while one inference thread runs whatever has queued up
# as one batch. The serving notebook's `Service` gives it a function that decodes a batch of
# uploads and runs the model once on them.
#
# Overload is refused, not queued without end: past `max_queue` inputs waiting, `submit`
# raises `Overloaded` at once (the API answers 503 with `Retry-After`), and a request not
# answered within `timeout_s` raises `DeadlineExceeded` and its input is skipped if it has not
# run yet. A request cancelled while it waits (its client went away) is skipped the same way.
#
# The module knows nothing of HTTP or models: it batches any function of a list, so the
# examples below batch plain numbers.

# %%
#| export
from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Callable

import anyio

from catsdogs.config import ServingSettings

# %%
#| hide
from fastcore.test import test_eq
from IPython.display import display
from nbdev.showdoc import show_doc


# %% [markdown]
# ## How batches form
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
                 settings:ServingSettings|None=None): # `max_batch_size`, `batch_wait_ms`, `max_queue`, `request_timeout_s`
        s = settings or ServingSettings()
        self.run_batch, self.max_batch_size, self.wait_s = run_batch, s.max_batch_size, s.batch_wait_ms / 1000
        self.max_queue, self.timeout_s, self.waiting = s.max_queue, s.request_timeout_s, 0  # `waiting`: submitted, not yet answered
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
for method in (MicroBatcher.submit, MicroBatcher.close): display(show_doc(method))

# %% [markdown]
# Eight requests submitted together share few batches, and a bad input fails only its own request:

# %%
sizes = []
def double(xs):
    sizes.append(len(xs)); time.sleep(0.01)
    return [ValueError(f"no {x}") if x < 0 else x * 2 for x in xs]

batcher = MicroBatcher(double, ServingSettings(max_batch_size=4))
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

batcher = MicroBatcher(double, ServingSettings(max_batch_size=8, batch_wait_ms=300))
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
batcher = MicroBatcher(slow, ServingSettings(max_batch_size=1, max_queue=3, request_timeout_s=0.6))
results = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
await batcher.close()
test_eq([type(r).__name__ for r in results], ["int", "DeadlineExceeded", "DeadlineExceeded", "Overloaded", "Overloaded"])
test_eq(ran, [0, 1])  # the second ran but answered too late; the third expired in the queue and never ran
results

# %% [markdown]
# ## Engine, threads, batch size and wait: measured, not assumed
#
# The defaults come from `benchmarks/bench_engines.py --model artifacts/model --prepared
# artifacts/data --threads 1 2 --batches 1 2 4 8 16 --ceiling-batch 4 8 16` and
# `benchmarks/bench_serve.py` on this project's 2-core machine on 2026-12-06 (an AMD EPYC with
# AVX2 and neither VNNI nor bf16 units), with the default model (EfficientNet-Lite0, 288 px)
# and its int8 model. Images/s, one run; the forward pass alone, then the ceiling the service
# is held to (`predict_batch`: decode the batch on the same threads, then one forward pass):
#
# | engine | threads | forward b1 | b2 | b4 | b8 | b16 | ceiling b4 | b8 | b16 |
# |---|---|---|---|---|---|---|---|---|---|
# | ONNX Runtime f32 | 1 | 34 | 34 | 33 | 33 | 29 | 30 | 28 | 29 |
# | OpenVINO f32 | 1 | 32 | 37 | 37 | 37 | 40 | 29 | 27 | 27 |
# | ONNX Runtime int8 | 1 | 66 | 67 | 69 | 59 | 66 | 44 | 40 | 46 |
# | OpenVINO int8 | 1 | 59 | 66 | 71 | 70 | 63 | 47 | 45 | 40 |
# | ONNX Runtime f32 | 2 | 56 | 66 | 70 | 83 | 77 | 62 | 66 | 64 |
# | OpenVINO f32 | 2 | 61 | 59 | 68 | 64 | 64 | 50 | 46 | 52 |
# | ONNX Runtime int8 | 2 | 88 | 86 | 95 | 100 | 94 | 67 | 69 | 72 |
# | OpenVINO int8 | 2 | 65 | 68 | 89 | 99 | 87 | 62 | 64 | 64 |
#
# The same command on 2026-12-07 on an AMD EPYC Zen 4 with AVX-512, VNNI and bf16 units (a
# model trained there by the same command; OpenVINO bf16 runs on such a CPU):
#
# | engine | threads | forward b1 | b2 | b4 | b8 | b16 | ceiling b4 | b8 | b16 |
# |---|---|---|---|---|---|---|---|---|---|
# | ONNX Runtime f32 | 1 | 64 | 65 | 65 | 60 | 63 | 50 | 52 | 52 |
# | OpenVINO f32 | 1 | 62 | 63 | 58 | 52 | 52 | 43 | 44 | 46 |
# | OpenVINO bf16 | 1 | 106 | 117 | 121 | 115 | 111 | 80 | 74 | 77 |
# | ONNX Runtime int8 | 1 | 122 | 132 | 126 | 132 | 121 | 83 | 80 | 78 |
# | OpenVINO int8 | 1 | 116 | 135 | 143 | 145 | 143 | 91 | 96 | 89 |
# | ONNX Runtime f32 | 2 | 94 | 120 | 104 | 114 | 117 | 84 | 97 | 98 |
# | OpenVINO f32 | 2 | 108 | 94 | 97 | 101 | 105 | 82 | 67 | 76 |
# | OpenVINO bf16 | 2 | 113 | 135 | 171 | 184 | 187 | 122 | 127 | 134 |
# | ONNX Runtime int8 | 2 | 142 | 197 | 204 | 213 | 223 | 155 | 167 | 154 |
# | OpenVINO int8 | 2 | 189 | 225 | 210 | 226 | 249 | 146 | 149 | 169 |
#
# The choices below hold on both kinds: two threads beat one by 1.4x to 2.1x at batch 8 for
# int8, batch 16 gains nothing that the run's noise does not also give or take, and decoding
# is a larger share of the int8 ceiling than of f32's.
#
# - **Threads**: every engine runs best on every core (`threads=0`), one stream: with two
#   threads the ceiling at batch 8 is 2.3x (ONNX Runtime f32) and 1.7x (int8) that of one, so
#   a second stream of one thread each would only split the same two cores. Decoding uses the
#   same threads, in turn with the forward pass (decoding beside it left the engine's threads
#   waiting for cores).
# - **Decode share**: int8 makes the forward pass faster, so decoding, 3 to 4 ms of wall time
#   per image on two threads in this run, becomes a third of the int8 ceiling (ONNX Runtime,
#   batch 8: 10.0 ms per image for the forward pass, 14.4 ms with decoding) against a fifth of
#   f32's (12.0 and 15.2 ms). JPEGs already decode at reduced size (draft mode), and the
#   decode threads are the inference threads, so there is no idle core to give them.
# - **Batch size 8**: past batch 8 the ceiling gains nothing beyond the run's noise (int8: 69
#   and 64 at 8, 72 and 64 at 16), and memory grows with the batch (measured on 2026-12-03:
#   ONNX Runtime's process held 246 MB after a batch of 8 and 390 MB after a batch of 16). So
#   `max_batch_size` is 8.
# - **Wait 10 ms**: at concurrency 8, `batch_wait_ms` 2 formed batches of 4 on average
#   (2026-12-03) and 10 forms batches of 7.8 to 8.0 (`bench_serve.py`, here), with more
#   requests/s and a lower p50; a forward pass of 8 images takes 80 ms (int8) to 125 ms (f32)
#   here, so the wait stays short beside it. A lone client never waits.
