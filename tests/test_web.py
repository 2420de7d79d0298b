"""The web page in real headless Chromium against a real server: upload a cat and a dog photo and see
the labels the API gives for those files, a text file and see the error in plain words, and photos
of neither (a kangaroo, a face, a bear) and see that said in plain words."""
import os
from pathlib import Path

import httpx
from PIL import Image
import pytest

from catsdogs.config import Settings
from catsdogs.serving import create_app
from helpers_serving import demo_artifact, run_server, sample_images

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Chromium at {CHROMIUM} (or a browser binary in $CHROMIUM)")


@pytest.fixture(scope="module")
def server():
    settings = Settings(model_dir=demo_artifact("small_cnn"), backend="onnx")
    with run_server(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                         "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    page = browser.new_page()
    page.goto(server + "/")
    yield page
    page.close()


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


def test_page_says_when_a_photo_is_neither_a_cat_nor_a_dog(browser, sample_model, not_pets, unseen_pets):
    cat = unseen_pets["cat"][0]
    with run_server(create_app(Settings(model_dir=sample_model, backend="onnx"))) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#files", [str(p) for p in [*not_pets.values(), cat]])
        for photo in not_pets.values():
            expected = httpx.post(url + "/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).json()
            card = page.locator(f'article.card[data-name="{photo.name}"]')
            card.locator(".label").wait_for(timeout=30_000)
            assert card.get_attribute("data-label") == "neither"
            assert card.locator(".label").inner_text() == "This doesn't look like a cat or a dog"
            assert card.locator(".open-set").inner_text() == f"chance it shows a cat or a dog: {100 * expected['p_cat_or_dog']:.1f}%"
            assert card.locator(".bar").count() == 0
        card = page.locator(f'article.card[data-name="{cat.name}"]')
        card.locator(".label").wait_for(timeout=30_000)
        assert card.get_attribute("data-label") == "cat" and "chance it shows a cat or a dog" in card.locator(".open-set").inner_text()
        page.close()


def test_page_shows_the_heat_map_over_the_photo(browser, sample_model, unseen_pets):
    dog = unseen_pets["dog"][0]
    with run_server(create_app(Settings(model_dir=sample_model, backend="onnx"))) as url:
        expected = httpx.post(url + "/predict?explain=true", files={"file": (dog.name, dog.read_bytes(), "image/jpeg")}, timeout=60).json()
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('onnx')")  # /ready read: explain is on
        page.set_input_files("#files", [str(dog)])
        card = page.locator(f'article.card[data-name="{dog.name}"]')
        toggle = card.locator("button.why-toggle")
        toggle.wait_for(timeout=30_000)
        assert card.locator(".why").is_hidden() and toggle.get_attribute("aria-expanded") == "false"
        toggle.click()
        overlay = card.locator(".why img.overlay")
        overlay.wait_for(state="visible")
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
        photo = Image.open(dog)
        assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(photo.size)  # the PNG has the photo's size
        shown = card.locator(".why img.photo").bounding_box()
        laid = overlay.bounding_box()
        assert abs(shown["width"] - laid["width"]) < 1 and abs(shown["height"] - laid["height"]) < 1  # lies exactly over the photo
        what = "not a cat or a dog" if expected["label"] == "neither" else f"a {expected['label']}"
        assert card.locator(".explains").inner_text() == what
        assert overlay.get_attribute("src") == expected["explanation"]["overlay"]
        card.locator("input.opacity").fill("30")
        assert overlay.evaluate("img => img.style.opacity") == "0.3"
        toggle.click()
        assert card.locator(".why").is_hidden()
        page.close()


def test_page_sends_a_correction_and_the_review_page_labels_a_photo(browser, sample_dir, tmp_path):
    """On the page: a photo's answer, then "Wrong? It is ..." clicked, and the correction is in the store. On /review (HTTP
    Basic with the admin token, as a browser sends it): the queued photos, one labelled with a click."""
    from catsdogs.feedback import FeedbackStore
    folder = tmp_path / "store"
    settings = Settings(model_dir=demo_artifact("small_cnn"), backend="onnx", feedback_dir=folder, admin_token="s3cret",
                        review_margin=100.0)  # an untrained model: every answer is doubtful, so each photo is queued
    cat, dog = sample_images(sample_dir, "cat", 1)[0], sample_images(sample_dir, "dog", 1)[0]
    with run_server(create_app(settings)) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('onnx')")  # /ready read: feedback is on
        page.set_input_files("#files", [str(cat)])
        card = page.locator(f'article.card[data-name="{cat.name}"]')
        card.locator(".feedback button").first.wait_for(timeout=20_000)
        answered = card.get_attribute("data-label")
        choices = card.locator(".feedback button").evaluate_all("bs => bs.map(b => b.dataset.label)")
        assert answered not in choices and len(choices) == 2
        card.locator('.feedback button[data-label="neither"]' if answered != "neither" else '.feedback button[data-label="cat"]').click()
        card.locator(".feedback .thanks").wait_for(timeout=20_000)
        assert card.locator(".feedback .thanks").inner_text().startswith("Thanks: saved as")
        page.close()
        httpx.post(url + "/predict", files={"file": (dog.name, dog.read_bytes(), "image/jpeg")})  # queued for review

        context = browser.new_context(http_credentials={"username": "reviewer", "password": "s3cret"})
        review = context.new_page()
        review.goto(url + "/review")
        item = review.locator("article.item").first
        item.wait_for(timeout=20_000)
        sha = item.get_attribute("data-sha256")
        review.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=item.locator("img.photo").element_handle())
        overlay = item.locator("img.overlay")  # the served model's heat map over the photo, the photo's size
        review.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
        assert overlay.evaluate("img => img.naturalWidth") == item.locator("img.photo").evaluate("img => img.naturalWidth")
        assert item.locator("img.photo").bounding_box() == overlay.bounding_box()
        item.locator(".heat-toggle input").uncheck()
        assert overlay.is_hidden()
        item.locator('button[data-label="dog"]').click()
        item.locator(".status").filter(has_text="Labelled dog").wait_for(timeout=20_000)
        context.close()
        store = FeedbackStore(Settings(feedback_dir=folder))
        corrections = {c["sha256"]: c for c in store.corrections()}
        store.close()
    import hashlib
    assert corrections[hashlib.sha256(cat.read_bytes()).hexdigest()]["source"] == "feedback"
    assert (corrections[sha]["label"], corrections[sha]["source"]) == ("dog", "review")
