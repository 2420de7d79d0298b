"""Load-test the real HTTP service and compare it with the in-process ceiling on the same cores.

    python benchmarks/bench_serve.py --model artifacts/model
    python benchmarks/bench_serve.py --make-demo-artifact        # untrained EfficientNet-Lite0 head

Starts `catsdogs_serve` on 127.0.0.1 as a subprocess, posts real JPEGs from
../shared/data/PetImages-mini at each concurrency (bounded by --requests and --seconds), and prints
requests/s, p50/p95/p99 latency and errors next to the in-process ceiling (decode + preprocess +
batched forward of the same images, same backend, same cores) and one image's in-process time.
Targets: at concurrency 8, >= 80% of the ceiling with zero errors; at concurrency 1, p50 <= 1.5x
the single-image in-process time. Client and server share the machine, so the figures include
the client's own CPU use and anything else running.
"""
import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# libgomp's busy-waiting threads fight for the cores with decoding and with anything else running;
# passive waiting made preprocessing ~10x and eager ~3x faster on a shared 2-core machine. It must be
# set before torch loads, and the server subprocess inherits it (the Dockerfile sets it too).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "data" / "PetImages-mini"


def load_images(n: int) -> list[tuple[str, bytes]]:
    "The first n/2 `cat.N.jpg` and n/2 `dog.N.jpg` of the sample, as (name, bytes)."
    if not SAMPLE.is_dir(): sys.exit(f"the image sample {SAMPLE} is missing")
    files = []
    for label in ("cat", "dog"):
        found = sorted((SAMPLE / label.capitalize()).glob(f"{label}.*.jpg"), key=lambda p: int(p.stem.split(".")[1]))
        files += found[: n // 2]
    return [(p.name, p.read_bytes()) for p in files]


def demo_artifact() -> Path:
    "An EfficientNet-Lite0 artifact with ImageNet weights and an untrained head, in a temporary folder."
    from catsdogs.model import ModelConfig, build_model, export_artifact
    out = Path(tempfile.mkdtemp(prefix="catsdogs-bench-")) / "model"
    print("exporting an untrained EfficientNet-Lite0 artifact (about 30 s)...", flush=True)
    return export_artifact(build_model("efficientnet_lite0", pretrained=True), out, ModelConfig.for_backbone("efficientnet_lite0"))


def in_process(model: Path, backend: str, images: list[tuple[str, bytes]], batch_size: int, threads: int) -> dict:
    "Ceiling images/s (parallel decode, batched forward) and one image's decode + forward time, best of three."
    from catsdogs.inference import Predictor
    predictor = Predictor(model, backend=backend, threads=threads)
    datas = [d for _, d in images]
    with ThreadPoolExecutor(predictor.threads) as pool:
        def one_pass():
            start = time.perf_counter()
            tensors = list(pool.map(predictor.preprocess, datas))
            for i in range(0, len(tensors), batch_size): predictor.predict_tensors(torch.stack(tensors[i:i + batch_size]))
            return time.perf_counter() - start
        one_pass()  # warm-up
        ceiling = len(datas) / min(one_pass() for _ in range(3))
    def one_image(data):
        start = time.perf_counter(); predictor.predict(data); return time.perf_counter() - start
    single = min(statistics.median(one_image(d) for d in datas[:20]) for _ in range(3))  # best of three medians
    return {"backend": predictor.backend, "ceiling_rps": ceiling, "single_ms": 1000 * single}


def start_server(model: Path, backend: str, port: int, extra: list[str]) -> subprocess.Popen:
    "`catsdogs_serve` on 127.0.0.1:port, once /ready answers 200."
    script = shutil.which("catsdogs_serve") or sys.exit("catsdogs_serve is not installed (pip install -e .)")
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([script, "--model-dir", str(model), "--host", "127.0.0.1", "--port", str(port), "--backend", backend, *extra],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None: log.seek(0); sys.exit(f"the server exited:\n{log.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200: return proc
        except httpx.TransportError: pass
        time.sleep(0.2)
    proc.kill(); sys.exit("the server did not become ready in 120 s")


async def load_test(url: str, images: list[tuple[str, bytes]], concurrency: int, max_requests: int, max_seconds: float) -> dict:
    "Post images with `concurrency` requests in flight until `max_requests` or `max_seconds`; latency and errors."
    latencies, errors, sent = [], 0, 0
    # multipart bodies encoded once, so the load generator spends its share of the cores on sending
    encoded = []
    for name, data in images:
        request = httpx.Request("POST", url + "/predict", files={"file": (name, data, "image/jpeg")})
        encoded.append((request.read(), {"content-type": request.headers["content-type"]}))
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def worker():
            nonlocal sent, errors
            while sent < max_requests and time.perf_counter() < deadline:
                body, headers = encoded[sent % len(encoded)]; sent += 1
                start = time.perf_counter()
                try:
                    r = await client.post("/predict", content=body, headers=headers)
                    ok = r.status_code == 200
                except httpx.HTTPError: ok = False
                latencies.append(time.perf_counter() - start)
                errors += not ok
        for _ in range(min(concurrency, 4)):  # warm the connections
            await client.get("/health")
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "rps": len(latencies) / elapsed, "errors": errors,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "model", help="Model artifact directory")
    parser.add_argument("--make-demo-artifact", action="store_true", help="Build an untrained EfficientNet-Lite0 artifact instead")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx", "torchscript", "eager"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="Requests per concurrency level (at most)")
    parser.add_argument("--seconds", type=float, default=60, help="Seconds per concurrency level (at most)")
    parser.add_argument("--images", type=int, default=64, help="Distinct sample JPEGs to cycle through")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--server-arg", action="append", default=[], help="Extra catsdogs_serve flag (repeatable)")
    args = parser.parse_args(argv)

    model = demo_artifact() if args.make_demo_artifact else args.model
    if not (model / "model_config.json").exists(): sys.exit(f"no model artifact at {model}; pass --model DIR or --make-demo-artifact")
    from catsdogs.config import Settings
    settings = Settings()
    images = load_images(args.images)
    print(f"model {model}, {len(images)} sample JPEGs, {os.cpu_count()} cores, max_batch_size {settings.max_batch_size}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)

    ref = in_process(model, args.backend, images, settings.max_batch_size, settings.threads)
    print(f"in-process ({ref['backend']}): ceiling {ref['ceiling_rps']:.1f} images/s, one image {ref['single_ms']:.1f} ms", flush=True)

    if args.port == 0:
        with socket.socket() as s: s.bind(("127.0.0.1", 0)); args.port = s.getsockname()[1]
    server = start_server(model, ref["backend"], args.port, args.server_arg)
    try:
        results = [asyncio.run(load_test(f"http://127.0.0.1:{args.port}", images, c, args.requests, args.seconds)) for c in args.concurrency]
    finally:
        server.terminate(); server.wait(timeout=20)

    print(f"\n{'conc':>5} {'requests':>8} {'req/s':>8} {'% ceil':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for r in results:
        print(f"{r['concurrency']:>5} {r['requests']:>8} {r['rps']:>8.1f} {100 * r['rps'] / ref['ceiling_rps']:>6.0f}% "
              f"{r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} {r['errors']:>6}")
    by_c = {r["concurrency"]: r for r in results}
    ok = True
    if 8 in by_c:
        held = by_c[8]["rps"] >= 0.8 * ref["ceiling_rps"] and by_c[8]["errors"] == 0
        ok &= held
        print(f"\ntarget concurrency 8: >= 80% of ceiling ({0.8 * ref['ceiling_rps']:.1f} req/s), 0 errors: "
              f"{'HOLDS' if held else 'MISSED'} ({by_c[8]['rps']:.1f} req/s, {by_c[8]['errors']} errors)")
    if 1 in by_c:
        held = by_c[1]["p50"] <= 1.5 * ref["single_ms"]
        ok &= held
        print(f"target concurrency 1: p50 <= 1.5 x one image in-process ({1.5 * ref['single_ms']:.1f} ms): "
              f"{'HOLDS' if held else 'MISSED'} (p50 {by_c[1]['p50']:.1f} ms)")
    errors = sum(r["errors"] for r in results)
    if errors: print(f"{errors} errors in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
