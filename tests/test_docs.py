"""The rendered docs site (`_docs/`, from `scripts/docs.sh`) in a real browser, and the site check that guards it:
planted faults (a progress bar, a machine path, a warning, a cut-off line) make `scripts/check_site.py` fail.
Skipped where the site is not rendered (no Quarto)."""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_docs"
spec = importlib.util.spec_from_file_location("check_site", ROOT / "scripts" / "check_site.py")
check_site = importlib.util.module_from_spec(spec); spec.loader.exec_module(check_site)

pytestmark = pytest.mark.skipif(not (SITE / "index.html").exists() or not shutil.which("quarto"),
                                reason="the docs site is not rendered here (scripts/docs.sh renders it with Quarto)")
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
PAGES = sorted(p.name for p in SITE.glob("*.html") if p.name != "404.html")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists(): pytest.skip(f"needs Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = check_site.launch_browser(pw)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def tab(browser):
    "A browser tab of 1280 by 900 pixels, and the base URL of the site served on 127.0.0.1."
    server, base = check_site.serve(SITE)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    yield page, base
    page.close()
    check_site.stop(server)


@pytest.mark.parametrize("name, min_figures", [("index.html", 1), ("eda.html", 4)])
def test_page_figures_load_and_the_sidebar_lists_every_page(tab, name, min_figures):
    tab, base = tab
    tab.goto(base + name, wait_until="load")
    figures = tab.eval_on_selector_all("main img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    assert len(figures) >= min_figures and all(loaded for _, loaded in figures), figures
    sidebar = tab.eval_on_selector_all("#quarto-sidebar a.sidebar-link", "links => links.map(a => new URL(a.href).pathname.split('/').pop())")
    assert set(PAGES) - {"index.html"} <= set(sidebar), set(PAGES) - set(sidebar)
    assert tab.title() and "catsdogs" in tab.title()


@pytest.fixture
def site_copy(tmp_path):
    "A copy of the rendered site to plant faults in."
    copy = tmp_path / "site"
    shutil.copytree(SITE, copy)
    return copy


def plant(page: Path, html: str):
    "Put `html` as a cell output at the end of `page`'s main column."
    text = page.read_text()
    page.write_text(text.replace("</main>", f'<div class="cell-output cell-output-stderr"><pre><code>{html}</code></pre></div></main>', 1))


def test_the_rendered_site_is_clean():
    assert check_site.text_problems(SITE) == {}


@pytest.mark.parametrize("fault, kind", [
    ("validating:  42%|####2     | 845/2009 [00:01&lt;00:02, 598.65it/s]", "progress bar"),
    ("Downloading artifacts: 100%|##########| 12/12", "progress bar"),
    ("845it [00:01, 598.65it/s]", "progress bar"),  # tqdm without a total: no bar, still progress
    ("downloading PetImages.zip: 12.3MB [00:02, 5.1MB/s]", "progress bar"),
    (f"{Path.home()}/project/.venv/lib/python3.11/site-packages/torch/jit/_trace.py:1006: FutureWarning: deprecated", "machine path"),
    (f"model directory {tempfile.gettempdir()}/tmpab12cd/missing does not exist", "machine path"),
    ("catsdogs/model.py:182: UserWarning: only 16 validation photos", "warning"),
    ("2026/12/03 10:57:20 INFO mlflow.store.db.utils: Creating initial MLflow database tables...", "log line"),
])
def test_a_planted_fault_fails_the_check(site_copy, fault, kind):
    plant(site_copy / "data.html", fault)
    problems = check_site.text_problems(site_copy)
    assert list(problems) == ["data.html"] and any(kind in p for p in problems["data.html"]), problems
    assert check_site.main([str(site_copy), "--no-browser"]) == 1


def test_a_cut_off_line_fails_the_check(site_copy, browser):
    page = site_copy / "config.html"
    page.write_text(page.read_text().replace("</main>", '<pre style="white-space: pre; overflow: hidden">' + "x" * 400 + "</pre></main>", 1))
    problems = check_site.layout_problems(site_copy, browser)
    assert list(problems) == ["config.html"] and problems["config.html"][0].startswith("cut off: pre"), problems
