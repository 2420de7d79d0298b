"""Data preparation speed: validate, hash, group and split every file of a folder.

    python benchmarks/bench_prepare.py [--data-dir ../shared/data/PetImages-mini] [--repeat 3]

Prints files/s for the whole `build_manifest` (decode, sha256, perceptual hash, duplicate
groups, split) with one worker process per core. Target: >= 400 files/s on 2 cores."""
import argparse
import os
import statistics
import time
from pathlib import Path

from catsdogs.config import Settings
from catsdogs.data import build_manifest, find_images
from catsdogs.presets import shared_sample

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", type=Path, default=shared_sample())
parser.add_argument("--repeat", type=int, default=3)
args = parser.parse_args()

n_files = len(find_images(args.data_dir))
rates = []
for i in range(args.repeat):
    start = time.perf_counter()
    manifest, skipped = build_manifest(args.data_dir, Settings(), progress=False)
    seconds = time.perf_counter() - start
    rates.append(n_files / seconds)
    print(f"run {i + 1}: {n_files} files ({len(manifest)} usable, {len(skipped)} skipped) in {seconds:.2f}s = {rates[-1]:.0f} files/s")
print(f"prepare throughput on {os.cpu_count()} cores: median {statistics.median(rates):.0f} files/s, best {max(rates):.0f} files/s "
      f"(target >= 400: {'met' if statistics.median(rates) >= 400 else 'NOT met'})")
