"""The test and benchmark kit of the inference, serving and web tests and of `benchmarks/bench_serve.py`: a demo model
artifact (built once per process), sample photos, a real uvicorn server in a background thread or `catsdogs_serve` in a
process of its own, a local HTTP file server, odd images, and Prometheus readings."""
import http.server
import io
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from catsdogs.model import demo_artifact as export_demo_artifact
from catsdogs.presets import sample_photos, shared_sample

SAMPLE = shared_sample()  # ../shared/data/PetImages-mini beside the checkout, or None

_ARTIFACTS: dict[str, Path] = {}
_TMP = tempfile.TemporaryDirectory(prefix="catsdogs-test-artifacts-")


def demo_artifact(architecture: str = "small_cnn") -> Path:
    "An untrained artifact of `architecture` (ImageNet backbone where it has one), exported once per test process."
    if architecture not in _ARTIFACTS:
        checks = sample_images(SAMPLE, "cat", 4) + sample_images(SAMPLE, "dog", 4) if SAMPLE is not None else []
        _ARTIFACTS[architecture] = export_demo_artifact(Path(_TMP.name) / architecture, architecture, 224, check_images=checks)
    return _ARTIFACTS[architecture]


def sample_images(sample_dir: Path, label: str, n: int) -> list[Path]:
    "The first `n` well-formed `cat.N.jpg` / `dog.N.jpg` photos of the sample."
    return sample_photos(label, n, sample_dir)


def free_socket() -> socket.socket:
    "A socket bound to a free port on 127.0.0.1."
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def run_server(app, timeout: float = 60, **config):
    "Serve `app` with a real uvicorn server on 127.0.0.1 in a thread (more `uvicorn.Config` in `config`); yields its base URL."
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline: raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class Served(str):
    "The base URL of a server started by `serve_process`, with the process id (`pid`) for CPU and memory readings."
    pid: int


@contextmanager
def serve_process(*args: str, script: str | None = None, timeout: float = 120):
    """`catsdogs_serve ARGS` (this environment's, or the console script `script` of another) in its own process on a
    free port of 127.0.0.1, until /ready answers; yields its base URL (a `Served`)."""
    import subprocess, sys, httpx
    sock = free_socket(); port = sock.getsockname()[1]; sock.close()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    command = [script] if script else [sys.executable, "-c", "from catsdogs.serving import serve_cli; serve_cli()"]
    proc = subprocess.Popen([*command, *args, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, text=True)
    base = Served(f"http://127.0.0.1:{port}"); base.pid = proc.pid
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None: log.seek(0); raise RuntimeError(f"catsdogs_serve exited:\n{log.read()}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200: break
            except httpx.TransportError: pass
            if time.monotonic() > deadline: raise RuntimeError("catsdogs_serve did not become ready")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate(); proc.wait(timeout=30)
        log.seek(0); serve_process.last_log = log.read(); log.close()


class _FileHandler(http.server.BaseHTTPRequestHandler):
    "GET /<name> serves files[name]; /redirect?to=URL answers 302 to URL."
    files: dict[str, bytes] = {}

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            self.send_response(302); self.send_header("Location", query.removeprefix("to=")); self.end_headers(); return
        body = self.files.get(path.lstrip("/"))
        if body is None:
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
        self.send_response(200); self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)

    def log_message(self, *args): pass


@contextmanager
def file_server(files: dict[str, bytes]):
    "A local HTTP server on 127.0.0.1 serving `files` by name; yields its base URL."
    handler = type("Handler", (_FileHandler,), {"files": files})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown(); httpd.server_close()


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    "`img` saved in `fmt` as bytes."
    buf = io.BytesIO(); img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def odd_images(photo: Path) -> dict[str, bytes]:
    "Odd-but-valid image files made from a real photo: PNG, WebP, GIF, grayscale, CMYK, RGBA, EXIF-rotated, 1x1, very wide."
    rgb = Image.open(photo).convert("RGB")
    exif = Image.Exif(); exif[0x0112] = 6
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    gif = io.BytesIO(); frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    rgba = rgb.convert("RGBA"); rgba.putalpha(128)
    return {
        "photo.png": encode(rgb, "PNG"),
        "photo.webp": encode(rgb, "WEBP"),
        "animated.gif": gif.getvalue(),
        "gray.jpg": encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "rgba.png": encode(rgba, "PNG"),
        "exif_rotated.jpg": encode(rgb, "JPEG", exif=exif),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG"),
        "very_wide.jpg": encode(rgb.resize((4000, 40)), "JPEG"),
    }


def bomb_png() -> bytes:
    "A tiny PNG that decodes to 60 million pixels."
    return encode(Image.new("1", (10000, 6000)), "PNG")


def metric_samples(text: str) -> dict:
    "Every sample of a Prometheus text page, keyed by (name, sorted labels)."
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_value(text: str, name: str, **labels) -> float:
    "One sample's value (0 when the page does not have it yet)."
    return metric_samples(text).get((name, tuple(sorted(labels.items()))), 0.0)
