"""The service under overload and against slow or vanishing clients, on a real uvicorn server on
127.0.0.1: a bounded queue answers 503 with Retry-After, slow uploads are cut at the body
deadline, clients that go away are a 499 (and their work is skipped), never a 500; plus the
batcher's shutdown and failure paths, and what `/metrics` counts."""
import asyncio
import concurrent.futures
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from catsdogs.batching import BatcherClosed, MicroBatcher
from catsdogs.config import InferenceSettings, ServingSettings, Settings
from catsdogs.http_input import fetch_url
from catsdogs.inference import Predictor
from catsdogs.serving import create_app
from helpers_serving import demo_artifact, file_server, metric_value, run_server, sample_images, serve_process


@pytest.fixture(scope="module")
def effnet():
    "EfficientNet-Lite0 (untrained head): a forward pass slow enough for queues to fill."
    return demo_artifact("efficientnet_lite0")


@pytest.fixture(scope="module")
def jpegs(sample_dir):
    return [p.read_bytes() for p in sample_images(sample_dir, "cat", 8) + sample_images(sample_dir, "dog", 8)]


def post_raw(base: str, body: bytes, ctype="image/jpeg") -> bytes:
    "The request line and headers of a POST /predict with `body`'s Content-Length."
    port = base.rsplit(":", 1)[1]
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()


def connect(base: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30)


def no_errors_logged(caplog):
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# --- overload -------------------------------------------------------------------------------------

def test_a_full_queue_answers_503_with_retry_after_and_health_stays_fast(effnet, jpegs):
    "The server in its own process (as deployed), so /health times the server, not this process's clients."
    health_ms, stop = [], threading.Event()
    with serve_process("--model-dir", str(effnet), "--backend", "onnx", "--max-queue", "4", "--max-batch-size", "4",
                       "--threads", "1") as base:
        def poll_health():
            with httpx.Client(base_url=base, timeout=5) as c:
                while not stop.is_set():
                    start = time.perf_counter(); assert c.get("/health").status_code == 200
                    health_ms.append((time.perf_counter() - start) * 1000); time.sleep(0.02)
        poller = threading.Thread(target=poll_health); poller.start()
        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
                return await asyncio.gather(*(c.post("/predict", content=jpegs[i % len(jpegs)], headers={"content-type": "image/jpeg"})
                                              for i in range(64)))
        try: answers = asyncio.run(burst())
        finally: stop.set(); poller.join()
        metrics = httpx.get(f"{base}/metrics").text
    codes = [r.status_code for r in answers]
    assert len(codes) == 64 and set(codes) <= {200, 503}, codes
    refused = [r for r in answers if r.status_code == 503]
    assert refused and codes.count(200) >= 4, codes  # some refused at once, the queue's worth answered
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["detail"] for r in refused)
    assert metric_value(metrics, "catsdogs_refused_total", reason="overloaded") == len(refused)
    assert metric_value(metrics, "catsdogs_http_requests_total", route="/predict", method="POST", status="503") == len(refused)
    assert health_ms and max(health_ms) < 100, sorted(health_ms)[-5:]
    assert "ERROR" not in serve_process.last_log and "Traceback" not in serve_process.last_log, serve_process.last_log[-2000:]


def test_a_request_past_its_deadline_gets_503_and_is_not_run(effnet, jpegs):
    settings = Settings(model_dir=effnet, backend="onnx", max_batch_size=1, request_timeout_s=0.05, threads=1)
    with run_server(create_app(settings)) as base, \
            httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=16)) as c:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda d: c.post("/predict", content=d, headers={"content-type": "image/jpeg"}), jpegs))
        metrics = c.get("/metrics").text
    late = [r for r in answers if r.status_code == 503]
    assert late and all("no answer within 0.05 s" in r.json()["detail"] and r.headers["retry-after"] for r in late)
    assert metric_value(metrics, "catsdogs_refused_total", reason="deadline") == len(late)
    # images that timed out in the queue were skipped: fewer images ran than were sent
    assert metric_value(metrics, "catsdogs_inference_batch_size_sum") < len(jpegs)


# --- slow and vanishing clients ---------------------------------------------------------------------

def test_slow_uploads_are_closed_at_the_body_deadline_while_real_requests_are_served(effnet, jpegs, caplog):
    settings = Settings(model_dir=effnet, backend="onnx", body_timeout_s=2.0)
    with caplog.at_level(logging.WARNING), run_server(create_app(settings)) as base:
        slow = []
        for _ in range(200):  # each promises 100 kB and sends a byte
            s = connect(base); s.sendall(post_raw(base, b"\0" * 100_000) + b"\xff"); slow.append(s)
        start = time.monotonic()
        with httpx.Client(base_url=base, timeout=30) as c:  # real requests meanwhile
            served = [c.post("/predict", content=jpegs[i], headers={"content-type": "image/jpeg"}).status_code for i in range(4)]
        answers = []
        for s in slow:
            s.settimeout(max(0.1, start + 10 - time.monotonic()))
            data = b""
            try:
                while chunk := s.recv(65536): data += chunk  # until the server closes the connection
            except socket.timeout: pass
            answers.append(data); s.close()
        elapsed = time.monotonic() - start
        metrics = httpx.get(f"{base}/metrics").text
    assert served == [200] * 4
    assert all(a.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in a for a in answers), answers[0][:200]
    assert elapsed < 10
    assert metric_value(metrics, "catsdogs_http_requests_total", route="/predict", method="POST", status="408") == 200
    no_errors_logged(caplog)


def test_a_client_that_disconnects_mid_upload_is_a_499_not_an_error(effnet, caplog):
    settings = Settings(model_dir=effnet, backend="onnx")
    with caplog.at_level(logging.DEBUG, logger="catsdogs.serving"), run_server(create_app(settings)) as base:
        for _ in range(3):
            s = connect(base); s.sendall(post_raw(base, b"\0" * 100_000) + b"\xff\xd8" + b"\0" * 1000); time.sleep(0.2); s.close()
        time.sleep(0.5)
        metrics = httpx.get(f"{base}/metrics").text
    assert metric_value(metrics, "catsdogs_http_requests_total", route="/predict", method="POST", status="499") == 3
    assert metric_value(metrics, "catsdogs_http_requests_total", route="/predict", method="POST", status="500") == 0
    assert "client went away during POST /predict" in caplog.text
    no_errors_logged(caplog)


def test_a_client_that_goes_away_while_queued_is_skipped(effnet, jpegs, caplog):
    "One client sends a photo and hangs up while 24 others keep the single-image batches busy: its image never runs."
    settings = Settings(model_dir=effnet, backend="onnx", max_batch_size=1, threads=1)
    with caplog.at_level(logging.WARNING), run_server(create_app(settings)) as base, \
            httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=24)) as c:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            busy = [pool.submit(c.post, "/predict", content=jpegs[i % len(jpegs)], headers={"content-type": "image/jpeg"})
                    for i in range(24)]
            with httpx.Client(base_url=base, timeout=60) as watcher:  # sent together, the 24 are queued once two have run
                while metric_value(watcher.get("/metrics").text, "catsdogs_inference_batch_size_count") < 2: time.sleep(0.005)
            s = connect(base); s.sendall(post_raw(base, jpegs[0]) + jpegs[0]); time.sleep(0.05); s.close()
            codes = [f.result().status_code for f in busy]
        time.sleep(0.3)
        metrics = c.get("/metrics").text
    assert codes == [200] * 24
    assert metric_value(metrics, "catsdogs_http_requests_total", route="/predict", method="POST", status="499") == 1
    assert metric_value(metrics, "catsdogs_inference_batch_size_sum") == 24  # the 25th image was skipped
    no_errors_logged(caplog)


def test_an_upload_over_the_limit_is_refused_before_the_body_is_read(effnet):
    "A chunked upload with no Content-Length: the server answers 413 after taking little more than the limit."
    limit = 1_000_000
    settings = Settings(model_dir=effnet, backend="onnx", max_upload_bytes=limit)
    with run_server(create_app(settings)) as base:
        s = connect(base)
        port = base.rsplit(":", 1)[1]
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        chunk, sent, answer = b"\0" * 65536, 0, b""
        s.settimeout(0.05)
        for _ in range(int(50 * limit / len(chunk))):  # offers 50 MB
            try:
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"); sent += len(chunk)
            except socket.timeout: pass
            except (BrokenPipeError, ConnectionResetError): break
            try: answer += s.recv(65536)
            except socket.timeout: continue
            if answer: break
        s.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert sent < 5 * limit, sent  # the limit, plus what the kernel's socket buffers held: not the 50 MB offered


# --- the batcher's own failure paths --------------------------------------------------------------

def test_close_answers_every_queued_request_503_and_run_batch_errors_reach_every_request():
    async def scenario():
        def slow(xs): time.sleep(0.2); return xs
        batcher = MicroBatcher(slow, ServingSettings(max_batch_size=1))
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await asyncio.sleep(0.05)  # the first is running, four are queued
        await batcher.close()
        closed = await asyncio.gather(*tasks, return_exceptions=True)
        calls = []
        def failing(xs):
            calls.append(len(xs))
            if len(calls) == 1: raise MemoryError("the whole batch failed")
            return [x * 10 for x in xs]
        batcher = MicroBatcher(failing, ServingSettings(max_batch_size=8, batch_wait_ms=50))
        failed = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        after = await batcher.submit(4)  # the batcher carries on
        await batcher.close()
        return closed, failed, after
    closed, failed, after = asyncio.run(scenario())
    assert closed[0] == 0 and all(isinstance(r, BatcherClosed) for r in closed[1:]), closed
    assert all(isinstance(r, MemoryError) for r in failed) and after == 40


# --- metrics and name resolution --------------------------------------------------------------------

def test_metrics_count_exactly_what_happened(effnet, jpegs):
    with run_server(create_app(Settings(model_dir=effnet, backend="onnx"))) as base, httpx.Client(base_url=base, timeout=30) as c:
        before = c.get("/metrics").text
        answer = c.post("/predict", content=jpegs[0], headers={"content-type": "image/jpeg"}).json()
        bad = c.post("/predict", content=b"hello", headers={"content-type": "image/jpeg"})
        after = c.get("/metrics").text
    route = dict(route="/predict", method="POST")
    assert metric_value(after, "catsdogs_http_requests_total", **route, status="200") - metric_value(before, "catsdogs_http_requests_total", **route, status="200") == 1
    assert metric_value(after, "catsdogs_http_requests_total", **route, status="415") - metric_value(before, "catsdogs_http_requests_total", **route, status="415") == 1
    label = answer["label"]
    assert metric_value(after, "catsdogs_predictions_total", label=label) - metric_value(before, "catsdogs_predictions_total", label=label) == 1
    assert metric_value(after, "catsdogs_inference_batch_size_sum") - metric_value(before, "catsdogs_inference_batch_size_sum") == 1
    assert bad.status_code == 415


def test_the_connection_goes_only_to_the_address_that_was_checked(sample_dir):
    """A host that resolves first to an allowed address, then (a DNS rebinding) to a private one: the fetch
    resolves once, checks, and connects to that very address; the private one is never used."""
    photo = sample_images(sample_dir, "cat", 1)[0].read_bytes()
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))],
                    [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.9", 0))]])
    calls = []
    def rebinding_resolver(host, port, type=0, *args):
        calls.append(host); return [(*info[:4], (info[4][0], port)) for info in next(answers)]
    def guard(address, allow_private):  # the loopback file server stands for a public host
        return None if address == "127.0.0.1" else "private address"
    with file_server({"cat.jpg": photo}) as url:
        port = url.rsplit(":", 1)[1]
        async def fetch():
            async with httpx.AsyncClient(timeout=5, follow_redirects=False, trust_env=False) as client:
                return await fetch_url(f"http://pets.example:{port}/cat.jpg", client, 10_000_000, rebinding_resolver, guard)
        body = asyncio.run(fetch())
    assert body == photo and calls == ["pets.example"]


# --- start-up ----------------------------------------------------------------------------------------

def test_a_truncated_model_onnx_stops_start_up_unless_another_backend_is_asked(effnet, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(effnet, broken)
    data = (broken / "model.onnx").read_bytes(); (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="cannot load .*model.onnx"):
        Predictor(broken, InferenceSettings(backend="auto"))
    with pytest.raises(RuntimeError, match="cannot load .*model.onnx"):
        Predictor(broken, InferenceSettings(backend="openvino"))
    assert Predictor(broken, InferenceSettings(backend="torchscript")).backend == "torchscript"
    done = subprocess.run([sys.executable, "-c", "from catsdogs.serving import serve_cli; serve_cli()", "--model-dir", str(broken),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "model.onnx" in done.stderr


def test_predicting_and_serving_never_import_torch(effnet, sample_dir, tmp_path):
    "With PyTorch made unimportable, the predictor (auto), catsdogs_predict and a served request still work."
    photo = sample_images(sample_dir, "dog", 1)[0]
    code = f"""
import sys; sys.modules["torch"] = None  # import torch now raises ImportError
from fastapi.testclient import TestClient
from catsdogs.config import Settings
from catsdogs.inference import Predictor, predict_cli
from catsdogs.serving import create_app
p = Predictor({str(effnet)!r})
assert p.backend in ("onnx", "openvino"), p
assert predict_cli([{str(photo)!r}, "--model", {str(effnet)!r}]) == 0
with TestClient(create_app(Settings(model_dir={str(effnet)!r}))) as c:
    r = c.post("/predict", content=open({str(photo)!r}, "rb").read(), headers={{"content-type": "image/jpeg"}})
    assert r.status_code == 200, r.text
print("lean ok", p.backend, p.precision)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "lean ok" in done.stdout, done.stderr[-2000:]
