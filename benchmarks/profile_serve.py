"""Where the server's CPU goes under load: `catsdogs_serve` sampled by py-spy while clients post real JPEGs.

    python benchmarks/profile_serve.py --model artifacts/model [--concurrency 8] [--seconds 20] [--precision int8]

Starts the server (the test kit's `serve_process`), drives it with `bench_serve.py`'s keep-alive load generator,
and records the Python threads' stacks with `py-spy record --nonblocking` (idle threads left out; a native call,
such as the engine's forward pass, is charged to the Python frame that made it, and the engine's own worker
threads, which run no Python, are not sampled). Each sample is charged to the first category its stack matches,
innermost frame first: the forward pass, image decoding and preprocessing, multipart and body reading, HTTP
server and routing, the answer, response models and JSON, metrics, batching and thread hand-offs, and the rest.
Prints each category's share of the samples and, in proportion, of the server's CPU time per request (/proc).
Needs py-spy (`pip install py-spy`, in the dev extra) and permission to trace the server (root, or ptrace)."""
import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_serve import cpu_seconds, load_images, load_test  # the serving benchmark's load generator and readings

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers_serving import serve_process  # noqa: E402 (the test kit)

CATEGORIES = [  # (name, substrings of a frame), matched innermost frame first
    ("forward pass (engine)", ("onnxruntime", "openvino", "libdnnl", "mlas", "MlasConv", "ov::", "dnnl")),
    ("decode + preprocess", ("PIL", "ImagingDecode", "jpeg", "presets.py", "eval_array", "libjpeg", "resize")),
    ("answer: softmax, open set, predictions", ("inference.py", "engines.py:softmax")),
    ("multipart and body reading", ("multipart", "http_input.py", "python_multipart")),
    ("HTTP server and routing", ("uvicorn", "httptools", "h11", "starlette", "fastapi/routing", "asyncio")),
    ("response models and JSON", ("pydantic", "json", "encoders")),
    ("metrics", ("prometheus_client",)),
    ("batching and thread hand-offs", ("batching.py", "threading.py", "queue.py", "concurrent/futures")),
]


def categorize(stack: str) -> str:
    "The category of one collapsed stack (frames separated by ';', outermost first)."
    for frame in reversed(stack.split(";")):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles): return name
    return "other"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "model")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    args = parser.parse_args(argv)
    images = load_images(64)
    with serve_process("--model-dir", str(args.model), "--backend", args.backend, "--precision", args.precision,
                       "--max-queue", "1024") as base, tempfile.TemporaryDirectory() as tmp:
        port = int(base.rsplit(":", 1)[1])
        asyncio.run(load_test(port, images, args.concurrency, 50, 30))  # warm-up
        raw = Path(tmp) / "profile.txt"
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(base.pid), "--rate", str(args.rate), "--duration", str(int(args.seconds) + 2),
                                "--format", "raw", "--nonblocking", "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        cpu_before = cpu_seconds(base.pid)
        result = asyncio.run(load_test(port, images, args.concurrency, 100_000, args.seconds))
        cpu = cpu_seconds(base.pid) - cpu_before
        _, err = spy.communicate(timeout=120)
        if spy.returncode != 0 or not raw.exists(): sys.exit(f"py-spy failed: {err[-2000:]}")
        samples = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack: samples[categorize(stack)] += int(count)
    total, requests = sum(samples.values()), result["requests"]
    print(f"{requests} requests at concurrency {args.concurrency} in {args.seconds:g} s ({result['rps']:.1f} req/s, {result['errors']} errors); "
          f"server CPU {1000 * cpu / requests:.1f} ms per request")
    for name, count in samples.most_common():
        print(f"  {name:40} {count / total:6.1%}  {1000 * cpu * count / total / requests:6.2f} ms/request")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
