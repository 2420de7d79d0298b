"""Run notebooks top to bottom and save their outputs, so the docs pages show what each example
produces. Cells flagged with a test flag of settings.ini (`#| slow`, `#| cuda`) are not run and
keep the outputs they have (from the last time someone ran them with --flags).

    python scripts/execute_notebooks.py                      # every notebook in nbs/
    python scripts/execute_notebooks.py 05_inference 09_serving
    python scripts/execute_notebooks.py 04_training --flags slow   # also the slow cells

Then `bash scripts/sync_notebooks.sh` (nbdev_clean keeps outputs) and commit. Outputs are kept
small: figures are PNGs of a few tens of kB, and nothing prints whole arrays."""
import argparse
import os
import sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.config import get_config

NBS = Path(__file__).resolve().parent.parent / "nbs"


def execute(path: Path, skip: set[str]):
    "Run `path` in a fresh shell from the nbs/ folder; stop at the first error."
    nb = read_nb(path)
    shell = CaptureShell()
    def skipped(cell):
        if cell.cell_type != "code" or skip & set(getattr(cell, "directives_", {}) or {}): return True
        cell.outputs = []  # execnb keeps a cell's old outputs when it now prints nothing
        return False
    cwd = os.getcwd(); os.chdir(NBS)
    try: shell.run_all(nb, exc_stop=True, preproc=skipped)
    finally: os.chdir(cwd)
    write_nb(nb, path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="Notebook names without .ipynb (default: all)")
    parser.add_argument("--flags", nargs="*", default=[], help="Test flags to run anyway (e.g. slow)")
    args = parser.parse_args()
    skip = set(get_config().tst_flags.split()) - set(args.flags)
    paths = [NBS / f"{n}.ipynb" for n in args.names] if args.names else sorted(NBS.glob("*.ipynb"))
    for path in paths:
        print(f"running {path.name}", flush=True)
        execute(path, skip)
    sys.exit(0)
