"""The HTTP service, through `TestClient` and a real uvicorn server on 127.0.0.1: every route, every
kind of bad input, URL fetches from a local server, SSRF refusals, micro-batching, metrics, and
`catsdogs_serve`. No traffic goes anywhere but 127.0.0.1: hosts that would resolve elsewhere go
through a stand-in resolver and are refused before any connection."""
import concurrent.futures
import shutil
import socket
import subprocess

import httpx
import pytest
from fastapi.testclient import TestClient

from catsdogs.config import InferenceSettings, Settings
from catsdogs.http_input import refusal_reason
from catsdogs.inference import Predictor
from catsdogs.serving import create_app
from helpers_serving import bomb_png, demo_artifact, file_server, metric_samples, metric_value, odd_images, run_server, sample_images, serve_process

LIMIT = 2_000_000  # upload limit of the test apps, small so oversize tests stay quick


def resolver(host, port, type=0, *args):
    "`pets.test` is the local file server; `internal.test` stands for a host inside the network."
    ip = {"pets.test": "127.0.0.1", "internal.test": "10.0.0.7", "metadata.test": "169.254.169.254"}.get(host)
    if ip is None: return socket.getaddrinfo(host, port, type=type)  # literal addresses
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]


def only_loopback_is_public(address, allow_private):
    "Treat the local file server as if it were on the internet; judge every other address as in production."
    return None if address == "127.0.0.1" else refusal_reason(address, allow_private)


@pytest.fixture(scope="module")
def artifact():
    return demo_artifact("small_cnn")


@pytest.fixture(scope="module")
def predictor(artifact):
    return Predictor(artifact, InferenceSettings(backend="onnx"))


def make_settings(artifact, **kwargs):
    return Settings(model_dir=artifact, backend="onnx", max_upload_bytes=LIMIT, max_batch_files=4, **kwargs)


@pytest.fixture(scope="module")
def photos(sample_dir):
    return {"cat": sample_images(sample_dir, "cat", 1)[0], "dog": sample_images(sample_dir, "dog", 1)[0]}


@pytest.fixture(scope="module")
def client(artifact, predictor):
    "Default URL policy (private addresses refused), stand-in resolver."
    with TestClient(create_app(make_settings(artifact), predictor, resolver=resolver)) as c:
        yield c


@pytest.fixture(scope="module")
def server(artifact, predictor):
    "A real uvicorn server that may fetch from 127.0.0.1 (allow_private_urls)."
    with run_server(create_app(make_settings(artifact, allow_private_urls=True), predictor, resolver=resolver)) as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def pets(photos):
    "A local HTTP server with photos, a text file and an oversized file."
    files = {"cat.jpg": photos["cat"].read_bytes(), "notes.txt": b"hello", "huge.jpg": b"\xff" * (LIMIT + 1)}
    with file_server(files) as url:
        yield url


def upload(http_client, name, data, ctype="application/octet-stream", route="/predict"):
    return http_client.post(route, files={"file": (name, data, ctype)})


# --- routes -------------------------------------------------------------------------------------

def test_health_ready_docs_page_and_schema(http, client, predictor):
    for c in (http, client):
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready").json()
        assert ready["status"] == "ready" and ready["backend"] == "onnx" and ready["architecture"] == "small_cnn"
        assert ready["model_version"] == predictor.model_version and ready["created"] and "dataset_version" in ready
        docs = c.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert {"/predict", "/predict/batch", "/health", "/ready"} <= set(c.get("/openapi.json").json()["paths"])
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "Cat or dog?" in page.text


def test_ready_is_503_until_the_model_is_loaded(artifact):
    c = TestClient(create_app(make_settings(artifact)))  # lifespan not entered: nothing loaded
    assert c.get("/health").status_code == 200
    r = c.get("/ready")
    assert r.status_code == 503 and r.json() == {"detail": "the model is not loaded yet"}
    assert c.post("/predict", content=b"x", headers={"content-type": "image/jpeg"}).status_code == 503


def test_predict_real_photos_matches_the_predictor(http, photos, predictor):
    for label, path in photos.items():
        r = upload(http, path.name, path.read_bytes(), "image/jpeg")
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"id", "label", "confidence", "probabilities", "p_dog", "p_cat_or_dog", "explanation", "model_version"}
        assert body["explanation"] is None  # only with explain=true
        assert set(body["probabilities"]) == {"cat", "dog"} and body["model_version"] == predictor.model_version
        assert abs(body["p_dog"] - predictor.predict(path).p_dog) < 1e-5
        raw = http.post("/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"})
        assert raw.status_code == 200 and abs(raw.json()["p_dog"] - body["p_dog"]) < 1e-6


def test_odd_but_valid_images(http, photos):
    for name, data in odd_images(photos["dog"]).items():
        r = upload(http, name, data)
        assert r.status_code == 200, (name, r.text)
        assert 0 <= r.json()["p_dog"] <= 1


# --- bad input: 4xx with a reason, never 500, server stays up ---------------------------------------

def test_bad_files_get_clear_errors(http, photos):
    jpeg = photos["cat"].read_bytes()
    cases = [("notes.txt", b"just some text", 415, "this file is not an image"),
             ("empty.jpg", b"", 400, "the file is empty"),
             ("truncated.jpg", jpeg[:len(jpeg) // 3], 400, "the image is corrupt or truncated"),
             ("bomb.png", bomb_png(), 413, "the image has too many pixels"),
             ("cut_header.png", bomb_png()[:20], 400, "the image is corrupt or truncated"),
             ("bad_header.ppm", b"P6\n4x 3\n255\n" + bytes(36), 400, "the image is corrupt or truncated")]
    for name, data, status, detail in cases:
        r = upload(http, name, data)
        assert r.status_code == status, (name, r.text)
        assert r.json()["detail"].startswith(detail), (name, r.text)
    assert http.get("/health").status_code == 200


def test_extra_form_fields_are_ignored(http, photos):
    r = http.post("/predict", files={"file": ("cat.jpg", photos["cat"].read_bytes(), "image/jpeg")}, data={"note": "from a form"})
    assert r.status_code == 200, r.text


def test_malformed_requests(http):
    r = http.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = http.post("/predict", files={"photo": ("a.jpg", b"x")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = http.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "url" in r.json()["detail"]
    r = http.post("/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["detail"]
    assert http.post("/predict/batch", json={"url": "x"}).status_code == 415


def test_oversized_uploads_are_refused_while_reading(http, server):
    big = b"\xff\xd8" + b"\0" * LIMIT
    r = upload(http, "big.jpg", big)  # Content-Length known: refused before the body is read
    assert r.status_code == 413 and "over the limit of 2,000,000 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: refused once the streamed body passes the limit
        for _ in range(40): yield b"\0" * 100_000
    r = http.post("/predict", content=chunks(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413, r.text
    boundary = "testboundary"
    def multipart_chunks():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'.encode()
        for _ in range(40): yield b"\0" * 100_000
        yield f"\r\n--{boundary}--\r\n".encode()
    r = http.post("/predict", content=multipart_chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "big.jpg" in r.json()["detail"]
    assert http.get("/health").status_code == 200


# --- batch -----------------------------------------------------------------------------------------

def test_batch(http, photos, predictor):
    files = [("files", ("cat.jpg", photos["cat"].read_bytes(), "image/jpeg")),
             ("files", ("dog.jpg", photos["dog"].read_bytes(), "image/jpeg")),
             ("files", ("notes.txt", b"hello", "text/plain"))]
    r = http.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["cat.jpg", "dog.jpg", "notes.txt"]
    assert [x["status"] for x in results] == [200, 200, 415]
    assert results[2]["error"] == "this file is not an image"
    assert abs(results[1]["p_dog"] - predictor.predict(photos["dog"]).p_dog) < 1e-5
    too_many = [("files", (f"{i}.jpg", photos["cat"].read_bytes(), "image/jpeg")) for i in range(5)]
    r = http.post("/predict/batch", files=too_many)
    assert r.status_code == 413 and "at most 4" in r.json()["detail"]
    r = http.post("/predict/batch", files={"other": ("a.txt", b"x")})
    assert r.status_code == 400 and "no files" in r.json()["detail"]


# --- micro-batching and metrics -------------------------------------------------------------------

def test_concurrent_requests_share_forward_passes(server, sample_dir):
    images = [p.read_bytes() for p in sample_images(sample_dir, "cat", 12) + sample_images(sample_dir, "dog", 12)]
    with httpx.Client(base_url=server, timeout=60, limits=httpx.Limits(max_connections=24)) as c:
        before = [metric_value(c.get("/metrics").text, f"catsdogs_inference_batch_size_{s}") for s in ("sum", "count")]
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(lambda d: upload(c, "x.jpg", d).status_code, images))
        after = [metric_value(c.get("/metrics").text, f"catsdogs_inference_batch_size_{s}") for s in ("sum", "count")]
    assert codes == [200] * len(images)
    images_run, passes = after[0] - before[0], after[1] - before[1]
    assert images_run == len(images) and passes < len(images), (images_run, passes)


def test_metrics(http, photos):
    before = http.get("/metrics").text
    upload(http, "cat.jpg", photos["cat"].read_bytes())
    upload(http, "notes.txt", b"hello")
    text = http.get("/metrics").text
    route = {"method": "POST", "route": "/predict"}
    for status in ("200", "415"):
        assert metric_value(text, "catsdogs_http_requests_total", **route, status=status) \
            - metric_value(before, "catsdogs_http_requests_total", **route, status=status) == 1
    assert metric_value(text, "catsdogs_http_request_duration_seconds_bucket", le="+Inf", **route, status="200") >= 1
    assert sum(metric_value(text, "catsdogs_predictions_total", label=label) for label in ("cat", "dog", "neither")) >= 1
    assert metric_value(text, "catsdogs_inference_batch_size_count") >= 1
    info = [labels for (name, labels) in metric_samples(text) if name == "catsdogs_model_info"]
    assert ("architecture", "small_cnn") in info[0] and ("backend", "onnx") in info[0], info
    assert metric_value(text, "catsdogs_model_ready") == 1


# --- URLs ------------------------------------------------------------------------------------------

def test_url_fetch_from_a_local_server(http, pets, photos, predictor):
    expected = predictor.predict(photos["cat"]).p_dog
    for r in (http.post("/predict", params={"url": f"{pets}/cat.jpg"}),
              http.post("/predict", json={"url": f"{pets}/cat.jpg"}),
              http.post("/predict", json={"url": f"{pets.replace('127.0.0.1', 'pets.test')}/cat.jpg"}),
              http.post("/predict", json={"url": f"{pets}/redirect?to={pets}/cat.jpg"})):
        assert r.status_code == 200, r.text
        assert abs(r.json()["p_dog"] - expected) < 1e-5
    r = http.post("/predict", json={"url": f"{pets}/missing.jpg"})
    assert r.status_code == 400 and r.json()["detail"] == "the URL answered HTTP 404"
    r = http.post("/predict", json={"url": f"{pets}/notes.txt"})
    assert r.status_code == 415
    r = http.post("/predict", json={"url": f"{pets}/huge.jpg"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    r = http.post("/predict", json={"url": "http://127.0.0.1:1/cat.jpg"})  # nothing listens on port 1
    assert r.status_code == 400 and r.json()["detail"].startswith("could not fetch the URL")


def test_url_refusals_with_the_default_policy(client, pets):
    cases = {f"{pets}/cat.jpg": "a loopback address",
             "http://internal.test/cat.jpg": "internal.test resolves to 10.0.0.7, a private address",
             "http://metadata.test/latest/meta-data": "a link-local address",
             "http://[::1]:9/x.jpg": "a loopback address",
             "http://192.168.1.1/x.jpg": "a private address",
             "http://224.0.0.1/x.jpg": "a multicast address",
             "ftp://pets.test/cat.jpg": "only http and https URLs are fetched",
             "not a url": "only http and https"}
    for url, reason in cases.items():
        r = client.post("/predict", json={"url": url})
        assert r.status_code == 400, (url, r.text)
        assert reason in r.json()["detail"], (url, r.json())


def test_every_redirect_hop_is_checked(artifact, predictor, pets):
    app = create_app(make_settings(artifact), predictor, resolver=resolver, url_guard=only_loopback_is_public)
    with TestClient(app) as c:
        assert c.post("/predict", json={"url": f"{pets}/redirect?to={pets}/cat.jpg"}).status_code == 200
        for target in ("http://internal.test/cat.jpg", "http://10.0.0.1/cat.jpg", "http://metadata.test/"):
            r = c.post("/predict", json={"url": f"{pets}/redirect?to={target}"})
            assert r.status_code == 400 and r.json()["detail"].startswith("refused:"), r.text
        r = c.post("/predict", json={"url": f"{pets}/redirect?to={pets}/redirect?to=http://internal.test/"})
        assert r.status_code == 400 and "10.0.0.7, a private address" in r.json()["detail"]


@pytest.mark.parametrize("address,reason", [("10.0.0.1", "private"), ("169.254.169.254", "link-local"),
                                            ("192.168.1.1", "private"), ("::1", "loopback"), ("224.0.0.1", "multicast"),
                                            ("127.0.0.1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("fe80::1", "link-local"),
                                            ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved")])
def test_refusal_reason_on_literal_addresses(address, reason):
    assert refusal_reason(address) == f"{reason} address"
    assert refusal_reason(address, allow_private=True) is None


def test_public_addresses_are_allowed():
    for address in ("93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"):
        assert refusal_reason(address) is None


# --- catsdogs_serve -------------------------------------------------------------------------------

def _serve(*args, timeout=60):
    script = shutil.which("catsdogs_serve") or pytest.skip("catsdogs_serve is not installed")
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_a_missing_model(tmp_path):
    done = _serve("--model-dir", str(tmp_path / "no-model"), "--port", "0")
    assert done.returncode != 0
    assert "cannot serve" in done.stderr and "does not exist" in done.stderr


def test_serve_refuses_a_corrupt_model(artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "weights.pt").write_bytes(b"not torch weights")
    done = _serve("--model-dir", str(broken), "--port", "0", "--backend", "eager")
    assert done.returncode != 0
    assert f"cannot load the model from {broken}" in done.stderr


def test_workers_build_their_app_from_the_environment(artifact, monkeypatch):
    "With --workers > 1 uvicorn imports `app_from_env`; the flags reach it as CATSDOGS_* variables."
    import os
    from catsdogs.config import field_names
    from catsdogs.serving import _SERVE_FIELDS, _to_env, app_from_env
    settings = make_settings(artifact, allow_private_urls=True, workers=2)
    for name in field_names(_SERVE_FIELDS): monkeypatch.setenv(f"CATSDOGS_{name.upper()}", "")  # monkeypatch restores them afterwards
    _to_env(settings, _SERVE_FIELDS)
    assert os.environ["CATSDOGS_MODEL_DIR"] == str(artifact) and os.environ["CATSDOGS_ALLOW_PRIVATE_URLS"] == "true"
    with TestClient(app_from_env()) as c:
        ready = c.get("/ready").json()
    assert ready["backend"] == "onnx" and ready["architecture"] == "small_cnn"


def test_serve_answers_over_http(artifact):
    with serve_process("--model-dir", str(artifact), "--backend", "onnx") as base:
        r = httpx.get(f"{base}/ready", timeout=5)
        assert r.status_code == 200 and r.json()["backend"] == "onnx"
