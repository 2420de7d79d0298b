"""Run every notebook top to bottom, each in a fresh process of its own (`nbdev_test --path NB --n_workers 0`),
two at a time: as a reader runs them, one kernel per notebook, so no notebook inherits another's threads,
loaded engines or global state. A notebook whose process dies from a signal is named with the signal, and
`PYTHONFAULTHANDLER` (set here) prints the native stack of a crash.

    python scripts/test_notebooks.py                 # every notebook in nbs/
    python scripts/test_notebooks.py 03a_engines 05_inference --jobs 1"""
import argparse
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NBS = Path(__file__).resolve().parent.parent / "nbs"


def run(path: Path) -> tuple[Path, int, float, str]:
    "Test one notebook in its own process: its path, exit status, seconds and output."
    start = time.monotonic()
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(["nbdev_test", "--path", str(path), "--n_workers", "0"], capture_output=True, text=True, env=env)
    return path, done.returncode, time.monotonic() - start, done.stdout + done.stderr


def describe(code: int) -> str:
    "`failed` for an exit status, or the signal that killed the process."
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"failed (exit {code})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="Notebook names without .ipynb (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="Notebooks at once")
    args = parser.parse_args()
    paths = [NBS / f"{n}.ipynb" for n in args.names] if args.names else sorted(NBS.glob("*.ipynb"))
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for path, code, seconds, output in pool.map(run, sorted(paths, key=lambda p: -p.stat().st_size)):  # largest first
            print(f"{path.name}: {'ok' if code == 0 else describe(code)} in {seconds:.0f} s", flush=True)
            if code != 0:
                failed.append(path.name)
                print(output[-6000:], flush=True)
    if failed: sys.exit(f"notebooks that failed: {', '.join(failed)}")
    print(f"all {len(paths)} notebooks ran")
