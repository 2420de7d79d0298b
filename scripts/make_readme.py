"""Write README.md from nbs/index.ipynb, the docs home (nbdev_readme needs Quarto; this needs
nothing). Markdown cells are copied; visible code cells become fenced Python blocks.
With --check, fail instead of writing when README.md is out of date."""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nb = json.loads((root / "nbs" / "index.ipynb").read_text())
parts = []
for cell in nb["cells"]:
    source = "".join(cell["source"]).strip()
    if not source: continue
    if cell["cell_type"] == "markdown": parts.append(source.replace("](images/", "](nbs/images/"))  # README.md sits above nbs/
    elif cell["cell_type"] == "code" and not source.startswith(("#| hide", "#|hide")): parts.append(f"```python\n{source}\n```")
readme = "<!-- Generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file. -->\n\n" + "\n\n".join(parts) + "\n"
target = root / "README.md"
if "--check" in sys.argv:
    if target.read_text() != readme:
        sys.exit("README.md is out of date: run scripts/sync_notebooks.sh (or python scripts/make_readme.py)")
    print("README.md matches nbs/index.ipynb")
else:
    target.write_text(readme)
