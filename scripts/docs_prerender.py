"""nbdev's docs steps short of the Quarto render: quarto config, module index, sidebar, and the
processing of every notebook into _proc/ (what `nbdev_docs` hands to Quarto)."""
from pathlib import Path

import nbdev.quarto as q

if __name__ == "__main__":
    q._ensure_quarto = lambda: None  # skip the Quarto install check: the render itself is not run here
    cache, cfg, path = q._pre_docs(n_workers=2)
    pages = sorted(p.relative_to(cache).as_posix() for p in Path(cache).glob("*.ipynb"))
    print(f"docs: {len(pages)} notebooks processed into {cache}: {', '.join(pages)}")
    assert "index.ipynb" in pages, "the docs home nbs/index.ipynb is missing"
    assert (path / "sidebar.yml").exists() and (path / "_quarto.yml").exists()
