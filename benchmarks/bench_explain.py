"""What heat maps cost: in the forward pass when nobody asks, per image in-process, and served at concurrency 8.

    python benchmarks/bench_explain.py --model artifacts/model
    python benchmarks/bench_explain.py --model artifacts/model --precision int8 --rounds 5

Three measurements in one run, on the same cores:
1. the forward pass of the artifact's graph (batch 8) against the same graph with the `maps` output pruned away (what
   an artifact without heat maps runs), rounds interleaved, median images/s: the cost when nobody asks;
2. in-process CPU per image of `Predictor.predict_batch` without and with `explain`, and of drawing the PNG overlay
   and encoding it for JSON (what the service adds per explained answer);
3. `catsdogs_serve` on 127.0.0.1 at concurrency 8: requests/s of `POST /predict` and of `POST /predict?explain=true`,
   rounds interleaved, medians, and the server's CPU per request. Target: explaining costs at most 10% of throughput.
"""
import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from bench_serve import REPO, load_images, measure
from helpers_serving import serve_process  # the test kit (bench_serve puts tests/ on the path)


def pruned_graph(model_onnx: Path, out: Path) -> Path:
    "`model_onnx` without its `maps` output and the nodes only it needs."
    import onnx
    from onnx.utils import Extractor
    graph = onnx.load(str(model_onnx))
    keep = [o.name for o in graph.graph.output if o.name != "maps"]
    onnx.save(Extractor(graph).extract_model(["images"], keep), str(out))
    return out


def forward_rates(paths: dict[str, Path], batch: np.ndarray, threads: int, rounds: int) -> dict[str, float]:
    "Median images/s of each ONNX graph on `batch`, rounds interleaved."
    from catsdogs.engines import _onnx_runner
    runners = {name: _onnx_runner(path, threads) for name, path in paths.items()}
    rates = {name: [] for name in runners}
    for run in runners.values(): run(batch)
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(4): run(batch)
            rates[name].append(4 * len(batch) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def cpu_per_image(fn, n: int, repeats: int = 3) -> float:
    "Least CPU time of this process per image (ms) over `repeats` calls of `fn`, which handles `n` images."
    fn()
    best = float("inf")
    for _ in range(repeats):
        cpu = time.process_time(); fn(); best = min(best, time.process_time() - cpu)
    return 1000 * best / n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "model", help="Model artifact directory")
    parser.add_argument("--backend", default="onnx", choices=["onnx", "openvino"], help="Engine of the in-process and served runs")
    parser.add_argument("--precision", default="f32", choices=["f32", "int8"])
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of each measurement")
    parser.add_argument("--requests", type=int, default=300, help="Requests per served round (at most)")
    parser.add_argument("--seconds", type=float, default=20, help="Seconds per served round (at most)")
    parser.add_argument("--images", type=int, default=64, help="Distinct sample JPEGs to cycle through")
    args = parser.parse_args(argv)
    if not (args.model / "model_config.json").is_file(): sys.exit(f"no model artifact at {args.model}")

    from catsdogs.config import InferenceSettings, Settings
    from catsdogs.engines import INT8_FILE
    from catsdogs.inference import Predictor, heat_overlay
    settings = Settings()
    images = load_images(args.images)
    datas = [d for _, d in images]
    predictor = Predictor(args.model, InferenceSettings(backend=args.backend, precision=args.precision))
    if not predictor.config.heat_maps: sys.exit(f"{args.model} has no heat maps: python scripts/quantize_model.py {args.model} --export")
    print(f"model {args.model}, engine {predictor.run.name}, {len(images)} sample JPEGs, {os.cpu_count()} cores, {args.rounds} rounds",
          flush=True)

    graph = args.model / ("model.onnx" if args.precision == "f32" else INT8_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        rates = forward_rates({"with maps": graph, "maps pruned": pruned_graph(graph, Path(tmp) / "pruned.onnx")},
                              predictor.preset.stack(datas[:8]), predictor.threads, 2 * args.rounds)
    cost = 1 - rates["with maps"] / rates["maps pruned"]
    print(f"\n1. forward pass, ONNX Runtime {args.precision}, batch 8: {rates['with maps']:.1f} images/s with the maps output, "
          f"{rates['maps pruned']:.1f} with it pruned: the maps cost {100 * cost:.1f}% of the forward pass")

    batch = settings.max_batch_size
    def run(explain):
        return lambda: [predictor.predict_batch(datas[i:i + batch], batch, explain=explain) for i in range(0, len(datas), batch)]
    plain_ms, explained_ms = cpu_per_image(run(False), len(datas)), cpu_per_image(run(True), len(datas))
    explanations = [a.explanation for a in predictor.predict_batch(datas, batch, explain=True)]
    overlay_ms = cpu_per_image(lambda: [base64.b64encode(heat_overlay(e, settings.heat_map_max_side)) for e in explanations], len(datas))
    sizes = [len(heat_overlay(e, settings.heat_map_max_side)) for e in explanations]
    print(f"2. in-process CPU per image: predict_batch {plain_ms:.2f} ms, with explain {explained_ms:.2f} ms "
          f"(+{explained_ms - plain_ms:.2f}); the PNG overlay and its base64 {overlay_ms:.2f} ms "
          f"(median {statistics.median(sizes) / 1024:.1f} KB a photo)")

    served = {"plain": [], "explain": []}
    with serve_process("--model-dir", str(args.model), "--backend", args.backend, "--precision", args.precision,
                       "--max-queue", "1024") as base:
        port = int(base.rsplit(":", 1)[1])
        for _ in range(args.rounds):
            for name, path in (("plain", "/predict"), ("explain", "/predict?explain=true")):
                served[name].append(measure(port, base.pid, images, 8, args.requests, args.seconds, path=path))
    med = {name: statistics.median(r["rps"] for r in rounds) for name, rounds in served.items()}
    cpu = {name: statistics.median(r["cpu_ms"] for r in rounds) for name, rounds in served.items()}
    errors = sum(r["errors"] for rounds in served.values() for r in rounds)
    drop = 1 - med["explain"] / med["plain"]
    print(f"3. served at concurrency 8 (median of {args.rounds} rounds): /predict {med['plain']:.1f} req/s ({cpu['plain']:.1f} ms CPU a request), "
          f"/predict?explain=true {med['explain']:.1f} req/s ({cpu['explain']:.1f} ms CPU a request), {errors} errors")
    print("   rounds, req/s: " + "; ".join(f"{name} " + ", ".join(f"{r['rps']:.1f}" for r in rounds) for name, rounds in served.items()))
    held = drop <= 0.10 and errors == 0
    print(f"\ntarget: explain=true costs at most 10% of served throughput: {'HOLDS' if held else 'MISSED'} ({100 * drop:+.1f}%)")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
