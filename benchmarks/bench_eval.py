"""`catsdogs_eval` at serving speed: 3,000 labelled photos through the console script, timed, against
the in-process decode + forward rate of the same engine.

    python benchmarks/bench_eval.py --model artifacts/model [--n 3000]

Builds a folder of --n photos from ../shared/data/PetImages-mini (links, repeating the sample to
reach --n), runs `catsdogs_eval --model M --data-dir DIR --json` (its progress bar goes to stderr,
shown here), and prints the wall time, images/s, the engine it chose, and the ratio to the
engine's in-process ceiling measured in the same run. The wall time includes loading the model
and choosing the engine (a few seconds)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from catsdogs.presets import shared_sample

REPO = Path(__file__).resolve().parent.parent
SAMPLE = shared_sample()  # ../shared/data/PetImages-mini beside the checkout, or None


def linked_folder(dest: Path, n: int) -> Path:
    "`dest/Cat` and `dest/Dog` with n links to the sample's well-formed photos, repeated as needed."
    photos = {label: sorted((SAMPLE / label.capitalize()).glob(f"{label}.*.jpg")) for label in ("cat", "dog")}
    for label, files in photos.items():
        (dest / label.capitalize()).mkdir(parents=True)
        for i in range(n // 2):
            (dest / label.capitalize() / f"{label}.{i}.jpg").symlink_to(files[i % len(files)])
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "model")
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args(argv)
    if SAMPLE is None: sys.exit("the image sample ../shared/data/PetImages-mini is missing (run from the checkout)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = linked_folder(Path(tmp) / "photos", args.n)
        cmd = [sys.executable, "-c", "from catsdogs.evaluation import eval_cli; eval_cli()", "--model", str(args.model),
               "--data-dir", str(folder), "--json"]
        print("$ catsdogs_eval --model", args.model, "--data-dir", f"<{args.n} photos>", "--json", flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (the progress bar) passes through
        wall = time.perf_counter() - start
    if done.returncode: sys.exit(f"catsdogs_eval failed ({done.returncode})")
    lines = done.stdout.strip().splitlines()
    metrics = json.loads(lines[-1])
    engine = lines[0].split("backend=", 1)[1].split(",", 1)[0]
    print("\n".join(lines[:-1]))
    from bench_serve import in_process, load_images
    backend, precision = engine.split("/")
    ref = in_process(args.model, backend, precision, load_images(64), 16, 0)
    rate = metrics["n_images"] / wall
    print(f"\n== catsdogs_eval on {metrics['n_images']} photos ({os.cpu_count()} cores): {wall:.1f} s wall, {rate:.1f} images/s "
          f"with {engine}; in-process ceiling of {engine}: {ref['ceiling_rps']:.1f} images/s ({100 * rate / ref['ceiling_rps']:.0f}%)")
    print(f"accuracy {metrics['accuracy']:.4f}, log loss {metrics['log_loss']:.4f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
