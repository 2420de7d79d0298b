"""Check the rendered docs site (`_docs/`, made by `nbdev_docs`) as a reader sees it.

Fails, naming page and line, when a page shows:
- a machine path: an absolute path under the home, temporary, Python or checkout folders of the machine that
  rendered it, or into a `site-packages` folder;
- a progress bar (tqdm's `42%|####` lines, MLflow's "Downloading artifacts");
- a Python warning (`...Warning:`) or a timestamped log line of a library;
- content cut off at the right edge: a code line, an output or a table wider than its box, in a real browser;
- a figure that does not load; or a sidebar that does not list every page.

    python scripts/check_site.py [_docs]        # what scripts/docs.sh runs after the render
"""
import argparse
import html
import os
import re
import sys
import sysconfig
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine_folders() -> list[str]:
    """Absolute folders whose paths say which machine rendered the site: home, temp, the checkout's parent, the
    virtual environment and site-packages (not a system prefix such as /usr, which a page may name on purpose)."""
    folders = {Path.home(), Path(tempfile.gettempdir()), ROOT.parent, Path(sysconfig.get_paths()["purelib"])}
    if sys.prefix != sys.base_prefix: folders.add(Path(sys.prefix))
    system = {Path(d) for d in ("/", "/usr", "/usr/local", "/opt", "/srv", "/var", "/etc", "/bin", "/lib")}
    return sorted({str(f.resolve()) for f in folders if f.resolve() not in system}, key=len, reverse=True)


def page_problems(text: str, folders: list[str]) -> list[str]:
    "What a reader should not see in a page's text: machine paths, progress bars, warnings, library log lines."
    found = []
    patterns = [("machine path", re.compile("|".join(re.escape(f) + r"(?=/|\b)" for f in folders) + r"|[\w.-]*/site-packages/")),
                ("machine path", re.compile(r"(?<![\w.:/])/(?:tmp|home|root|Users|private/var|var/folders)/\S")),
                ("progress bar", re.compile(r"\d+%\|[^|\n]*\||[\d?] ?(?:it|s|[kMG]?B)/(?:s|it)\]|Downloading artifacts")),
                ("warning", re.compile(r"\b\w*Warning: |^WARN(?:ING)?\b", re.M)),
                ("log line", re.compile(r"^\d{4}[/-]\d\d[/-]\d\d[ T]\d\d:\d\d:\d\d\S* +(?:INFO|WARNING|DEBUG|ERROR)\b", re.M))]
    for n, line in enumerate(text.splitlines(), 1):
        kinds = list(dict.fromkeys(what for what, pattern in patterns if pattern.search(line)))
        if kinds: found.append(f"line {n}: {', '.join(kinds)}: {line.strip()[:160]}")
    return found


def page_text(page: Path) -> str:
    "The text of a page's main column, tags removed, one output line per line."
    source = page.read_text(encoding="utf-8")
    main = re.search(r"<main\b.*?</main>", source, re.S)
    body = re.sub(r"<(script|style)\b.*?</\1>", "", main.group(0) if main else source, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", body))


def text_problems(site: Path) -> dict[str, list[str]]:
    "`page_problems` of every page of `site`."
    folders = machine_folders()
    return {page.name: found for page in sorted(site.glob("*.html")) if (found := page_problems(page_text(page), folders))}


# Run in each page: boxes in the main column whose content is wider than the box (cut off or hidden behind a scroll
# bar), or that stick out of the column; images that did not load; the pages the sidebar links to.
LAYOUT_JS = """() => {
  const main = document.querySelector('main');
  const right = main.getBoundingClientRect().right;
  const cut = [];
  for (const el of main.querySelectorAll('pre, table, img')) {
    const box = el.getBoundingClientRect();
    if (box.width === 0) continue;
    const wider = el.tagName !== 'IMG' && el.scrollWidth > el.clientWidth + 1;
    if (wider || box.right > right + 1)
      cut.push(`${el.tagName.toLowerCase()}.${el.className}: ${Math.round(el.scrollWidth)} px of content in ${Math.round(el.clientWidth)}, `
               + `right edge ${Math.round(box.right)} of ${Math.round(right)}: ${(el.innerText || el.src || '').trim().slice(0, 80)}`);
  }
  const broken = [...document.images].filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.getAttribute('src'));
  const sidebar = [...document.querySelectorAll('#quarto-sidebar a.sidebar-link')].map(a => new URL(a.href).pathname.split('/').pop());
  return {cut, broken, sidebar};
}"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def serve(site: Path) -> tuple[ThreadingHTTPServer, str]:
    "Serve `site` on 127.0.0.1 (a free port) in a thread; returns the server and its base URL."
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def stop(server: ThreadingHTTPServer) -> None:
    server.shutdown(); server.server_close()


def launch_browser(playwright):
    "Headless Chromium (Debian's /usr/bin/chromium when present), with no network traffic of its own."
    exe = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return playwright.chromium.launch(executable_path=exe if Path(exe).exists() else None,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                            "--disable-component-update", "--disable-sync", "--no-first-run"])


def layout_problems(site: Path, browser=None, width: int = 1280, height: int = 900) -> dict[str, list[str]]:
    "Cut-off content, images that do not load and sidebar gaps of every page of `site`, in a browser `width` px wide."
    if browser is None:
        from playwright.sync_api import sync_playwright
        with sync_playwright() as pw:
            try: browser = launch_browser(pw)
            except Exception as e:  # no browser binary
                raise SystemExit(f"check_site: cannot start a browser ({str(e).splitlines()[0]}): install Chromium "
                                 "(scripts/setup.sh does) or name a browser binary in CHROMIUM")
            try: return layout_problems(site, browser, width, height)
            finally: browser.close()
    pages = sorted(p.name for p in site.glob("*.html") if p.name != "404.html")
    problems: dict[str, list[str]] = {}
    server, base = serve(site)
    tab = browser.new_page(viewport={"width": width, "height": height})
    try:
        for name in pages:
            tab.goto(base + name, wait_until="load")
            found = tab.evaluate(LAYOUT_JS)
            missing = sorted(set(pages) - set(found["sidebar"]) - {"index.html"})  # the home page is the title's link
            problems[name] = ([f"cut off: {c}" for c in found["cut"]] + [f"image does not load: {b}" for b in found["broken"]]
                              + ([f"sidebar lacks {', '.join(missing)}"] if missing else []))
    finally:
        tab.close()
        stop(server)
    return {name: found for name, found in problems.items() if found}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", type=Path, default=ROOT / "_docs")
    parser.add_argument("--no-browser", action="store_true", help="only the text checks")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").exists():
        print(f"check_site: {args.site} has no index.html: render the site first (scripts/docs.sh)", file=sys.stderr)
        return 2
    problems = text_problems(args.site)
    if not args.no_browser:
        for name, found in layout_problems(args.site).items(): problems.setdefault(name, []).extend(found)
    pages = len(list(args.site.glob("*.html")))
    if problems:
        for name, found in sorted(problems.items()):
            print(f"{name}:", file=sys.stderr)
            for line in found: print(f"  {line}", file=sys.stderr)
        print(f"check_site: FAIL: {sum(map(len, problems.values()))} problems in {len(problems)} of {pages} pages", file=sys.stderr)
        return 1
    print(f"check_site: {pages} pages clean: no machine paths, progress bars, warnings or cut-off content; figures load; sidebar complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
