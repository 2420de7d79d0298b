"""Compare the inference engines on this machine: forward-pass speed by batch size and thread count,
the decode + forward ceiling, and agreement with ONNX Runtime f32 on real photos.

    python benchmarks/bench_engines.py --model artifacts/model [--batches 1 2 4 8 16] [--threads 1 2]

For each engine the CPU offers (ONNX Runtime f32, OpenVINO f32, and OpenVINO bf16 where the CPU
has bf16 units), prints images/s of the forward pass alone at each batch size (median of
repeats on preprocessed sample photos), then the in-process ceiling the service is held to:
decode a batch of JPEGs on `threads` threads, then one forward pass, over --images photos. Last,
each engine's largest probability difference from ONNX Runtime f32 and whether every answer
agrees. These figures chose the serving defaults (`max_batch_size`, `threads`); see the batching
notebook. Run it on a quiet machine: other work moves every figure."""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from catsdogs.presets import shared_sample

REPO = Path(__file__).resolve().parent.parent
SAMPLE = shared_sample()  # ../shared/data/PetImages-mini beside the checkout, or None


def sample_jpegs(n: int) -> list[bytes]:
    "The first n/2 `cat.N.jpg` and n/2 `dog.N.jpg` of the sample."
    if SAMPLE is None: sys.exit("the image sample ../shared/data/PetImages-mini is missing (run from the checkout)")
    out = []
    for label in ("cat", "dog"):
        found = sorted((SAMPLE / label.capitalize()).glob(f"{label}.*.jpg"), key=lambda p: int(p.stem.split(".")[1]))
        out += [p.read_bytes() for p in found[: n // 2]]
    return out


def forward_rate(run, x: np.ndarray, batch: int, seconds: float = 1.5) -> float:
    "Images/s of `run` on batches of `batch`, median over repeats within `seconds` (after a warm-up)."
    xb = np.ascontiguousarray(x[:batch])
    run(xb)
    times, spent = [], 0.0
    while spent < seconds or len(times) < 3:
        start = time.perf_counter(); run(xb); times.append(time.perf_counter() - start); spent += times[-1]
    return batch / statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--images", type=int, default=64, help="Sample JPEGs for the ceiling")
    parser.add_argument("--ceiling-batch", type=int, nargs="+", default=[8, 16], help="Batch sizes of the ceiling")
    args = parser.parse_args(argv)
    from bench_serve import ceiling  # the same ceiling the serving benchmark holds the service to
    from catsdogs.inference import Predictor, check_batch, openvino_precisions, softmax
    engines = [("onnx", "f32")] + [("openvino", p) for p in openvino_precisions()]
    jpegs = sample_jpegs(args.images)
    print(f"model {args.model}, {os.cpu_count()} cores; OpenVINO precisions on this CPU: {', '.join(openvino_precisions())}")
    rows, outputs = [], {}
    for threads in args.threads:
        for backend, precision in engines:
            p = Predictor(args.model, backend=backend, precision=precision, threads=threads)
            x = np.stack([p.preprocess(j) for j in jpegs[: max(args.batches)]])
            rates = {b: forward_rate(p.run, x, b) for b in args.batches}
            ceilings = {b: ceiling(p, jpegs, b) for b in args.ceiling_batch}
            rows.append((f"{backend}/{precision}", threads, rates, ceilings))
            checks, _ = check_batch(p.model_dir, p.preset)
            outputs[(backend, precision)] = p.run(checks), p
            print(f"{backend + '/' + precision:>14} threads {threads}: forward " +
                  " ".join(f"b{b} {r:6.1f}" for b, r in rates.items()) + " img/s; ceiling " +
                  " ".join(f"b{b} {c:6.1f}" for b, c in ceilings.items()) + " img/s", flush=True)
    reference, ref_predictor = outputs[("onnx", "f32")]
    t = ref_predictor.config.temperature
    print("\nagreement with onnx/f32 on the artifact's check photos:")
    for (backend, precision), (out, p) in outputs.items():
        probs, ref_probs = softmax(out[0], t), softmax(reference[0], t)
        line = f"  {backend}/{precision}: max |p - p_ref| {np.abs(probs - ref_probs).max():.4f}, labels agree {np.mean(probs.argmax(1) == ref_probs.argmax(1)):.1%}"
        if len(out) > 1 and p.open_set is not None:
            q, q_ref = p.open_set.probability(out[1]), p.open_set.probability(reference[1])
            line += f", max |p_cat_or_dog diff| {np.abs(q - q_ref).max():.4f}"
        print(line)
    best = max(rows, key=lambda r: max(r[3].values()))
    print(f"\nfastest decode + forward: {best[0]} with {best[1]} threads, {max(best[3].values()):.1f} images/s")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
