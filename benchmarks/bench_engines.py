"""Compare the inference engines on this machine: forward-pass speed by batch size and thread count,
the decode + forward ceiling, agreement with ONNX Runtime f32 on real photos, and accuracy.

    python benchmarks/bench_engines.py --model artifacts/model [--batches 1 2 4 8 16] [--threads 1 2]

For each engine the CPU and the artifact offer (ONNX Runtime and OpenVINO in f32, OpenVINO bf16
where the CPU has bf16 units, both in int8 where the artifact has model.int8.onnx), prints
images/s of the forward pass alone at each batch size (median of repeats on preprocessed sample
photos), then the in-process ceiling the service is held to: `Predictor.predict_batch` on
batches of JPEGs (decode on `threads` threads, then one forward pass), over --images photos.
Then each engine's agreement with ONNX Runtime f32 on the artifact's check photos, and its
accuracy, log loss and share of cats and dogs kept at the "neither" threshold on the validation
and test splits of the artifact's prepared data (MODEL/data, or --prepared), side by side.
These figures chose the serving defaults (`max_batch_size`, `threads`) and the int8 recipe;
see the batching and engines notebooks. Run it on a quiet machine: other work moves every figure."""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from catsdogs.presets import sample_photos, shared_sample

REPO = Path(__file__).resolve().parent.parent
SAMPLE = shared_sample()  # ../shared/data/PetImages-mini beside the checkout, or None


def sample_jpegs(n: int) -> list[bytes]:
    "The first n/2 `cat.N.jpg` and n/2 `dog.N.jpg` of the sample."
    if SAMPLE is None: sys.exit("the image sample ../shared/data/PetImages-mini is missing (run from the checkout)")
    return [p.read_bytes() for label in ("cat", "dog") for p in sample_photos(label, n // 2, SAMPLE)]


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
    parser.add_argument("--prepared", type=Path, help="Prepared data for the accuracy table (default: MODEL/data)")
    args = parser.parse_args(argv)
    from bench_serve import ceiling  # the same ceiling the serving benchmark holds the service to
    from catsdogs.config import InferenceSettings
    from catsdogs.engines import INT8_FILE, check_batch, openvino_precisions, softmax
    from catsdogs.inference import Predictor
    engines = [("onnx", "f32")] + [("openvino", p) for p in openvino_precisions()]
    if (args.model / INT8_FILE).is_file(): engines += [("onnx", "int8"), ("openvino", "int8")]
    jpegs = sample_jpegs(args.images)
    print(f"model {args.model}, {os.cpu_count()} cores; OpenVINO precisions on this CPU: {', '.join(openvino_precisions())}")
    rows, outputs = [], {}
    for threads in args.threads:
        for backend, precision in engines:
            p = Predictor(args.model, InferenceSettings(backend=backend, precision=precision, threads=threads))
            x = p.preset.stack(jpegs[: max(args.batches)])
            rates = {b: forward_rate(p.run, x, b) for b in args.batches}
            ceilings = {b: ceiling(p, jpegs, b)[0] for b in args.ceiling_batch}
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
        dp = np.abs(probs - ref_probs).max(1)
        line = f"  {backend}/{precision}: |p - p_ref| max {dp.max():.4f} mean {dp.mean():.4f}, labels agree {np.mean(probs.argmax(1) == ref_probs.argmax(1)):.1%}"
        if len(out) > 1 and p.open_set is not None:
            dq = np.abs(p.open_set.probability(out[1]) - p.open_set.probability(reference[1]))
            line += f", |p_cat_or_dog diff| max {dq.max():.4f} mean {dq.mean():.4f}"
        print(line)
    best = max(rows, key=lambda r: max(r[3].values()))
    print(f"\nfastest decode + forward: {best[0]} with {best[1]} threads, {max(best[3].values()):.1f} images/s")
    prepared = args.prepared or args.model / "data"
    if not (prepared / "manifest.csv").is_file():
        print(f"\nno prepared data at {prepared} (pass --prepared): accuracy not measured"); return 0
    accuracy_table(args.model, prepared, engines)


def accuracy_table(model: Path, prepared: Path, engines: list[tuple[str, str]]):
    "Accuracy, log loss and the open-set share kept of each engine on the validation and test splits, one row per engine."
    from catsdogs.config import InferenceSettings
    from catsdogs.data import load_prepared
    from catsdogs.inference import Prediction, Predictor
    data = load_prepared(prepared)
    print(f"\naccuracy on the prepared splits of {prepared} (dataset {data.version[:12]}):")
    print(f"{'engine':>14} | " + " | ".join(f"{s} accuracy  log loss  kept" for s in ("val", "test")))
    for backend, precision in engines:
        predictor = Predictor(model, InferenceSettings(backend=backend, precision=precision))
        cells = []
        for split in ("val", "test"):
            rows = data.split(split)
            answers = predictor.predict_batch([data.root / p for p in rows.path], 8)
            ok = [(a, label) for a, label in zip(answers, rows.label) if isinstance(a, Prediction)]
            correct = np.mean([max(a.probabilities, key=a.probabilities.get) == label for a, label in ok])
            log_loss = -np.mean([np.log(max(a.probabilities[label], 1e-12)) for a, label in ok])
            kept = np.mean([a.label != "neither" for a, _ in ok])
            cells.append(f"{split} {correct:8.2%} {log_loss:9.4f} {kept:6.1%}")
        print(f"{backend + '/' + precision:>14} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
