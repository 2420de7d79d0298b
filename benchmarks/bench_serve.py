"""Load-test the real HTTP service and compare it with the in-process ceiling on the same cores.

    python benchmarks/bench_serve.py --model artifacts/model
    python benchmarks/bench_serve.py --make-demo-artifact        # untrained EfficientNet-Lite0 head

First measures, in this process, the ceiling of every engine this CPU offers (ONNX Runtime
and OpenVINO, f32, bf16 where there are bf16 units, int8 where the artifact has it): decode a
batch of the same JPEGs on the inference threads, then one forward pass, and notes the fastest.
Then starts `catsdogs_serve` (backend auto) on 127.0.0.1 as a subprocess and
measures in `--rounds` rounds; each round runs the served engine's ceiling in this process on as
many images as one load level posts, then posts real JPEGs from ../shared/data/PetImages-mini at
each concurrency (bounded by --requests and --seconds). The other work on the machine moves both
alike within a round, so each round's service rate is divided by that round's ceiling, and the
figures printed are medians over the rounds: requests/s, share of the ceiling, p50/p95/p99
latency, errors, the server's mean batch size, its CPU per request and the client's, and the
server's resident memory idle (ready, before any request) and after the load.
Targets: at concurrency 8, >= 85% of the served engine's ceiling with zero errors (how close
`auto`'s choice comes to the fastest engine is printed beside it: `auto` leaves out an engine
whose stored int8 figures miss their tolerance); at concurrency 1,
p50 <= 1.5x one image in-process; server CPU per request <= in-process CPU per image + 3 ms;
RSS <= 350 MB idle and <= 450 MB after load. Client and server share the machine, so the
figures include the client's own CPU use (printed per request) and anything else running.
"""
import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# libgomp's busy-waiting threads fight for the cores with decoding and with anything else running;
# passive waiting made preprocessing ~10x and eager ~3x faster on a shared 2-core machine. It must be
# set before torch loads, and the server subprocess inherits it (the Dockerfile sets it too).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx
import numpy as np

from catsdogs.presets import sample_photos, shared_sample

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers_serving import metric_value, serve_process  # the test kit: a served model started and awaited, Prometheus readings

SAMPLE = shared_sample()  # ../shared/data/PetImages-mini beside the checkout, or None


def load_images(n: int) -> list[tuple[str, bytes]]:
    "The first n/2 `cat.N.jpg` and n/2 `dog.N.jpg` of the sample, as (name, bytes)."
    if SAMPLE is None: sys.exit("the image sample ../shared/data/PetImages-mini is missing (run from the checkout)")
    return [(p.name, p.read_bytes()) for label in ("cat", "dog") for p in sample_photos(label, n // 2, SAMPLE)]


def demo_artifact() -> Path:
    "An EfficientNet-Lite0 artifact with ImageNet weights and an untrained head, in a temporary folder."
    from catsdogs.model import demo_artifact
    out = Path(tempfile.mkdtemp(prefix="catsdogs-bench-")) / "model"
    print("exporting an untrained EfficientNet-Lite0 artifact (about 30 s)...", flush=True)
    return demo_artifact(out, "efficientnet_lite0", 288)


def ceiling(predictor, datas: list[bytes], batch_size: int, repeats: int = 3, warm_up: bool = True) -> tuple[float, float]:
    """Images/s of `predict_batch` on `batch_size` images at a time (what the service's batcher calls), best of `repeats`
    passes (after a warm-up pass unless `warm_up` is False), and the CPU time of this process per image (ms, all threads)
    in that best pass."""
    def one_pass():
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(datas), batch_size): predictor.predict_batch(datas[i:i + batch_size], batch_size)
        return time.perf_counter() - start, time.process_time() - cpu
    if warm_up: one_pass()
    wall, cpu = min(one_pass() for _ in range(repeats))
    return len(datas) / wall, 1000 * cpu / len(datas)


def in_process(model: Path, backend: str, precision: str, images: list[tuple[str, bytes]], batch_size: int, threads: int) -> dict:
    """Ceiling images/s (decode a batch on the inference threads, then one forward pass) and one image's time, best of
    three; the loaded `Predictor` under "predictor"."""
    from catsdogs.config import InferenceSettings
    from catsdogs.inference import Predictor
    predictor = Predictor(model, InferenceSettings(backend=backend, precision=precision, threads=threads))
    datas = [d for _, d in images]
    rate, cpu_ms = ceiling(predictor, datas, batch_size)
    def one_image(data):
        start = time.perf_counter(); predictor.predict(data); return time.perf_counter() - start
    single = min(statistics.median(one_image(d) for d in datas[:20]) for _ in range(3))  # best of three medians
    return {"backend": predictor.backend, "precision": predictor.precision, "ceiling_rps": rate, "cpu_ms": cpu_ms,
            "single_ms": 1000 * single, "predictor": predictor}


def cpu_seconds(pid: int) -> float:
    "User plus system CPU time of process `pid` and its threads so far, in seconds."
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    "Resident memory of process `pid` now and at its peak (VmRSS, VmHWM), in MB."
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def encode_requests(images: list[tuple[str, bytes]], port: int, path: str = "/predict") -> list[bytes]:
    "Each image as the complete bytes of a keep-alive `POST path` multipart request, built once."
    encoded = []
    for name, data in images:
        request = httpx.Request("POST", f"http://127.0.0.1:{port}{path}", files={"file": (name, data, "image/jpeg")})
        body = request.read()
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {request.headers['content-type']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        encoded.append(head.encode() + body)
    return encoded


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes, bool]:
    "Send one request on a keep-alive connection; the response's status, body and whether the server keeps the connection."
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    headers = dict(line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
    if "content-length" not in headers: raise ValueError("response without Content-Length")
    body = await reader.readexactly(int(headers["content-length"]))
    return status, body, headers.get("connection", "").strip() != "close"


async def load_test(port: int, images: list[tuple[str, bytes]], concurrency: int, max_requests: int, max_seconds: float,
                    timeout: float = 60, path: str = "/predict") -> dict:
    """Post images with `concurrency` requests in flight until `max_requests` or `max_seconds`; latency and errors.

    Like `wrk`, the load generator writes pre-built requests on raw keep-alive connections and reads
    the responses with little parsing, so it takes a small share of the cores it shares with the server.
    A request counts as an error unless it answers 200 with a JSON prediction within `timeout` seconds."""
    latencies, errors, sent = [], 0, 0
    requests = encode_requests(images, port, path)
    ready = asyncio.Barrier(concurrency)  # every connection open and warmed before the clock starts
    clock = {}

    async def worker():
        nonlocal sent, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            try: await asyncio.wait_for(exchange(reader, writer, requests[0]), timeout)  # warm-up, not counted
            except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
                writer.close(); reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await ready.wait()
            clock.setdefault("start", time.perf_counter())  # the first one through starts the clock
            while sent < max_requests and time.perf_counter() < clock["start"] + max_seconds:
                request = requests[sent % len(requests)]; sent += 1
                start = time.perf_counter()
                try:
                    status, body, keep = await asyncio.wait_for(exchange(reader, writer, request), timeout)
                    ok = status == 200 and b'"label"' in body
                except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
                    ok, keep = False, False
                latencies.append(time.perf_counter() - start)
                errors += not ok
                if not keep:  # a fresh connection; if the server is gone, this worker stops (its errors are counted)
                    writer.close()
                    try: reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError: return
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - clock["start"]
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "rps": len(latencies) / elapsed, "errors": errors,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99))}


def images_and_batches(port: int) -> tuple[float, float]:
    "Images run and forward passes so far, from the server's Prometheus batch-size histogram."
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return metric_value(text, "catsdogs_inference_batch_size_sum"), metric_value(text, "catsdogs_inference_batch_size_count")


def measure(port: int, pid: int, images, concurrency: int, max_requests: int, max_seconds: float, path: str = "/predict") -> dict:
    "One load level, with the mean batch size the server formed, its CPU time per request (ms) during it (one worker) and the client's."
    images_before, passes_before = images_and_batches(port)
    cpu_before, client_before = cpu_seconds(pid), time.process_time()
    result = asyncio.run(load_test(port, images, concurrency, max_requests, max_seconds, path=path))
    answered = max(1, result["requests"] + result["errors"])
    result["cpu_ms"] = 1000 * (cpu_seconds(pid) - cpu_before) / answered
    result["client_cpu_ms"] = 1000 * (time.process_time() - client_before) / answered
    images_after, passes_after = images_and_batches(port)
    result["mean_batch"] = (images_after - images_before) / max(1, passes_after - passes_before)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "model", help="Model artifact directory")
    parser.add_argument("--make-demo-artifact", action="store_true", help="Build an untrained EfficientNet-Lite0 artifact instead")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx", "openvino", "torchscript", "eager"],
                        help="The server's backend (the ceiling is always the fastest engine)")
    parser.add_argument("--precision", default="auto", choices=["auto", "f32", "bf16", "int8"], help="The server's precision")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="Requests per concurrency level (at most)")
    parser.add_argument("--seconds", type=float, default=60, help="Seconds per concurrency level (at most)")
    parser.add_argument("--images", type=int, default=64, help="Distinct sample JPEGs to cycle through")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of (in-process ceiling, every load level); medians printed")
    parser.add_argument("--server-arg", action="append", default=[], help="Extra catsdogs_serve flag (repeatable)")
    parser.add_argument("--serve-script", default=None, help="catsdogs_serve of another environment (e.g. the lean one of "
                        "bench_serve_install.py --keep DIR)")
    args = parser.parse_args(argv)
    if args.rounds < 1: parser.error("--rounds must be at least 1")

    model = demo_artifact() if args.make_demo_artifact else args.model
    if not (model / "model_config.json").exists(): sys.exit(f"no model artifact at {model}; pass --model DIR or --make-demo-artifact")
    from catsdogs.config import Settings
    settings = Settings()
    images = load_images(args.images)
    print(f"model {model}, {len(images)} sample JPEGs, {os.cpu_count()} cores, max_batch_size {settings.max_batch_size}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)

    from catsdogs.engines import INT8_FILE, openvino_precisions
    engines = [("onnx", "f32")] + [("openvino", p) for p in openvino_precisions()]
    if (model / INT8_FILE).is_file(): engines += [("onnx", "int8"), ("openvino", "int8")]
    ceilings = [in_process(model, b, p, images, settings.max_batch_size, settings.threads) for b, p in engines]
    for c in ceilings:
        print(f"in-process {c['backend']}/{c['precision']}: ceiling {c['ceiling_rps']:.1f} images/s, CPU {c['cpu_ms']:.1f} ms per image, "
              f"one image {c['single_ms']:.1f} ms", flush=True)
    fastest = max(ceilings, key=lambda c: c["ceiling_rps"])
    print(f"fastest engine on this machine: {fastest['backend']}/{fastest['precision']}, ceiling {fastest['ceiling_rps']:.1f} images/s", flush=True)
    datas = [d for _, d in images]
    round_images = datas * max(1, -(-args.requests // len(datas)))  # as many images as one load level posts (at most)

    # --max-queue 1024: the load levels here must not be refused
    with serve_process("--model-dir", str(model), "--backend", args.backend, "--precision", args.precision, "--max-queue", "1024",
                       *args.server_arg, script=args.serve_script) as base:
        port = int(base.rsplit(":", 1)[1])
        ready = httpx.get(f"{base}/ready", timeout=10).json()
        idle_rss, _ = rss_mb(base.pid)
        # the served engine, loaded here too, runs the ceiling of every round; the others are let go
        ref = (next((c for c in ceilings if (c["backend"], c["precision"]) == (ready["backend"], ready["precision"])), None)
               or in_process(model, ready["backend"], ready["precision"], images, settings.max_batch_size, settings.threads))
        for c in ceilings:
            if c is not ref: c.pop("predictor")
        rounds = {c: [] for c in args.concurrency}
        for n in range(args.rounds):
            for c in args.concurrency:
                rate, cpu_ms = ceiling(ref["predictor"], round_images, settings.max_batch_size, repeats=1, warm_up=False)
                r = measure(port, base.pid, images, c, args.requests, args.seconds)
                r.update(ceiling_rps=rate, share=r["rps"] / rate, in_process_cpu_ms=cpu_ms)
                rounds[c].append(r)
                print(f"round {n + 1}, concurrency {c}: {r['rps']:.1f} req/s against a ceiling of {rate:.1f} images/s "
                      f"({100 * r['share']:.0f}%), p50 {r['p50']:.1f} ms, {r['errors']} errors, batches of {r['mean_batch']:.1f}, "
                      f"server CPU {r['cpu_ms']:.1f} ms per request, in-process {cpu_ms:.1f} ms per image", flush=True)
        loaded_rss, peak_rss = rss_mb(base.pid)
    print(f"server engine: {ready['backend']}/{ready['precision']}; RSS idle {idle_rss:.0f} MB, after the load {loaded_rss:.0f} MB "
          f"(peak {peak_rss:.0f} MB, at start-up while auto compares the engines)")

    def median(c, key): return statistics.median(r[key] for r in rounds[c])
    results = [{"concurrency": c, **{k: median(c, k) for k in ("requests", "rps", "share", "p50", "p95", "p99", "mean_batch", "cpu_ms",
                                                              "client_cpu_ms", "ceiling_rps", "in_process_cpu_ms")},
                "errors": sum(r["errors"] for r in rounds[c])} for c in args.concurrency]
    print(f"\nmedians of {args.rounds} rounds (errors: the sum)")
    print(f"{'conc':>5} {'requests':>8} {'req/s':>8} {'ceiling':>8} {'% ceil':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'batch':>6} {'CPU ms/req':>10} {'client CPU':>10}")
    for r in results:
        print(f"{r['concurrency']:>5} {r['requests']:>8.0f} {r['rps']:>8.1f} {r['ceiling_rps']:>8.1f} {100 * r['share']:>6.0f}% "
              f"{r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} {r['errors']:>6} {r['mean_batch']:>6.1f} {r['cpu_ms']:>10.1f} "
              f"{r['client_cpu_ms']:>10.2f}")
    by_c = {r["concurrency"]: r for r in results}
    served_cpu_ms = by_c[8 if 8 in by_c else args.concurrency[0]]["in_process_cpu_ms"]
    print(f"(ceiling and in-process CPU per image: the served engine {ref['backend']}/{ref['precision']}, {served_cpu_ms:.1f} ms per image; "
          f"at the start its ceiling was {ref['ceiling_rps']:.1f} images/s, {100 * ref['ceiling_rps'] / fastest['ceiling_rps']:.0f}% of "
          f"the fastest engine's, {fastest['backend']}/{fastest['precision']})")
    ok = True
    if 8 in by_c:
        held = by_c[8]["share"] >= 0.85 and by_c[8]["errors"] == 0
        ok &= held
        print(f"\ntarget concurrency 8: >= 85% of the served engine's ceiling in the same round (median), 0 errors: "
              f"{'HOLDS' if held else 'MISSED'} ({100 * by_c[8]['share']:.0f}%: {by_c[8]['rps']:.1f} req/s, {by_c[8]['errors']} errors)")
    if 1 in by_c:
        held = by_c[1]["p50"] <= 1.5 * ref["single_ms"]
        ok &= held
        print(f"target concurrency 1: p50 <= 1.5 x one image in-process ({1.5 * ref['single_ms']:.1f} ms): "
              f"{'HOLDS' if held else 'MISSED'} (p50 {by_c[1]['p50']:.1f} ms)")
    if 8 in by_c:
        overhead = by_c[8]["cpu_ms"] - served_cpu_ms
        held = overhead <= 3
        ok &= held
        print(f"target server CPU per request at concurrency 8 <= in-process CPU per image + 3 ms: {'HOLDS' if held else 'MISSED'} "
              f"({by_c[8]['cpu_ms']:.1f} ms against {served_cpu_ms:.1f} ms, {overhead:+.1f} ms)")
    held = idle_rss <= 350 and loaded_rss <= 450
    ok &= held
    print(f"target RSS: <= 350 MB idle, <= 450 MB after load: {'HOLDS' if held else 'MISSED'} ({idle_rss:.0f} MB, {loaded_rss:.0f} MB)")
    errors = sum(r["errors"] for r in results)
    if errors: print(f"{errors} errors in all")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
