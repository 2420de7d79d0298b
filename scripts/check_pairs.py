"""Fail when a notebook pair in nbs/ is out of sync: each .ipynb must have its percent .py,
and that .py must be exactly what Jupytext writes from the .ipynb (so edits on either side show)."""
import subprocess
import sys
from pathlib import Path

nbs = Path(__file__).resolve().parent.parent / "nbs"
notebooks = {p.stem for p in nbs.glob("*.ipynb")}
scripts = {p.stem for p in nbs.glob("*.py")}
problems = [f"{s}.py has no {s}.ipynb" for s in sorted(scripts - notebooks)]
problems += [f"{s}.ipynb has no {s}.py" for s in sorted(notebooks - scripts)]
for stem in sorted(notebooks & scripts):
    rendered = subprocess.run(["jupytext", "--to", "py:percent", "--output", "-", f"{stem}.ipynb"],
                              cwd=nbs, capture_output=True, text=True, check=True).stdout
    if rendered != (nbs / f"{stem}.py").read_text():
        problems.append(f"{stem}.py differs from {stem}.ipynb")
for p in problems: print("out of sync:", p)
if problems:
    print("Fix: edit one side, then run scripts/sync_notebooks.sh and commit both files.")
    sys.exit(1)
print(f"{len(notebooks)} notebook pairs in sync")
