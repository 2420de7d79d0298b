"""Fail when the docs would be incomplete: an exported function or class without a docstring or
without an example on its own page (a code cell of its notebook that is not exported and uses
it), a notebook page without outputs, a page missing from the sidebar or named there but missing,
or a file named in `_quarto.yml` that does not exist.

    python scripts/check_docs.py

nbdev renders each exported symbol's signature and docstring; the example cells below it, with
their committed outputs, are what a reader learns the API from."""
import ast
import json
import re
import sys
from pathlib import Path

import yaml

NBS = Path(__file__).resolve().parent.parent / "nbs"


def cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def exported_symbols(code: str) -> list[ast.AST]:
    "Public top-level functions and classes of an exported cell."
    try: tree = ast.parse(code)
    except SyntaxError: return []  # top-level await and the like: never exported
    return [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def check_notebook(nb: Path) -> list[str]:
    problems, code_cells = [], [c for c in cells(nb) if c["cell_type"] == "code"]
    if not any(re.search(r"^#\|\s*default_exp", source(c), re.M) for c in code_cells): return []
    exported = [c for c in code_cells if re.search(r"^#\|\s*export", source(c), re.M)]
    examples = "\n".join(source(c) for c in code_cells if c not in exported)
    for cell in exported:
        for node in exported_symbols(source(cell)):
            if not ast.get_docstring(node): problems.append(f"{nb.name}: {node.name} has no docstring")
            if not re.search(rf"\b{re.escape(node.name)}\b", examples): problems.append(f"{nb.name}: {node.name} has no example")
    if not any(c.get("outputs") for c in code_cells if c not in exported):
        problems.append(f"{nb.name}: no example output is committed (run the notebook and save it)")
    return problems


def check_site() -> list[str]:
    problems = []
    quarto = yaml.safe_load((NBS / "_quarto.yml").read_text())
    named = [quarto["format"]["html"].get("css")] + list(quarto.get("metadata-files", []))
    problems += [f"_quarto.yml names {f}, which does not exist" for f in named if f and not (NBS / f).exists()]
    sidebar = yaml.safe_load((NBS / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    listed = [p if isinstance(p, str) else p.get("href", "") for p in sidebar]
    problems += [f"sidebar.yml lists {p}, which does not exist" for p in listed if not (NBS / p).exists()]
    pages = sorted(p.name for p in NBS.glob("*.ipynb"))
    problems += [f"sidebar.yml leaves out {p}" for p in pages if p not in listed]
    return problems


if __name__ == "__main__":
    notebooks = sorted(NBS.glob("*.ipynb"))
    problems = [p for nb in notebooks for p in check_notebook(nb)] + check_site()
    for p in problems: print("docs:", p)
    if problems: sys.exit(f"{len(problems)} docs problems: add the docstring or an example cell (with its output), or fix the site files")
    print(f"docs: {len(notebooks)} pages, every exported function and class documented with an example, sidebar complete")
