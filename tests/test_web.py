"""The web page in real headless Chromium against a real server: upload a cat and a dog photo and see
the labels the API gives for those files, then a text file and see the error in plain words."""
from pathlib import Path

import httpx
import pytest

from catsdogs.config import Settings
from catsdogs.serving import create_app
from helpers_serving import demo_artifact, run_server, sample_images

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def server():
    settings = Settings(model_dir=demo_artifact("small_cnn"), backend="onnx")
    with run_server(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                         "--disable-component-update", "--no-first-run"])
        page = browser.new_page()
        page.goto(server + "/")
        yield page
        browser.close()


def test_page_shows_the_api_labels_for_real_photos(page, server, sample_dir):
    photos = [sample_images(sample_dir, "cat", 1)[0], sample_images(sample_dir, "dog", 1)[0]]
    expected = {p.name: httpx.post(server + "/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")}).json() for p in photos}
    page.set_input_files("#files", [str(p) for p in photos])
    for p in photos:
        card = page.locator(f'article.card[data-name="{p.name}"]')
        card.locator(".label").wait_for(timeout=20_000)
        assert card.get_attribute("data-label") == expected[p.name]["label"]
        text = card.locator(".label").inner_text().lower()
        assert text.startswith(expected[p.name]["label"]) and f"{100 * expected[p.name]['confidence']:.1f}%" in text
        assert card.locator("img.thumb").get_attribute("src").startswith("blob:")
        width = card.locator(".bar > span").evaluate("e => parseFloat(e.style.width)")
        assert abs(width - 100 * expected[p.name]["p_dog"]) <= 0.05
    assert "onnx" in page.locator("#model").inner_text()


def test_page_explains_a_file_that_is_not_an_image(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping: milk, eggs")
    page.set_input_files("#files", [str(notes)])
    error = page.locator('article.card[data-name="notes.txt"] .status.error')
    error.wait_for(timeout=20_000)
    assert error.inner_text() == "notes.txt: this file is not an image"
