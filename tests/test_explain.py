"""Heat maps through the real server on 127.0.0.1: on composites of a real cat or dog beside a real photo of something
else, the evidence for the answer lies on the animal's side; the overlay is a PNG of the photo's size, for uploads, batches
and URLs; explained and plain requests share forward passes; a model exported without heat maps says so with a 501;
`catsdogs_predict --explain` writes pictures."""
import base64
import io
import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from catsdogs.config import Settings
from catsdogs.data import load_prepared
from catsdogs.model import build_model, config_for_backbone, export_artifact, export_onnx
from catsdogs.presets import load_image
from catsdogs.serving import create_app
from helpers_serving import demo_artifact, file_server, metric_samples, run_server, sample_images

N_COMPOSITES = 48


def composite(pet, background, animal_second: bool, vertical: bool, side: int = 384) -> bytes:
    "A square JPEG: `background` filling it, the pet photo over one half (the second half: right or bottom)."
    half = (side, side // 2) if vertical else (side // 2, side)
    canvas = ImageOps.fit(load_image(background), (side, side))
    corner = ((0, side // 2) if vertical else (side // 2, 0)) if animal_second else (0, 0)
    canvas.paste(ImageOps.fit(load_image(pet), half), corner)
    out = io.BytesIO()
    canvas.save(out, format="JPEG", quality=90)
    return out.getvalue()


def heat_side(explanation: dict, vertical: bool) -> str:
    """The half of the photo ('first': left or top, 'second': right or bottom) where the strongest cell lies or, when it
    straddles the middle (odd grids), where most of the evidence for the answer lies."""
    grid = np.asarray(explanation["grid"])
    if vertical: grid = grid.T  # halves along the columns either way
    left, _, right, _ = explanation["box"] if not vertical else (explanation["box"][1], 0, explanation["box"][3], 0)
    centres = left + (np.arange(grid.shape[1]) + 0.5) / grid.shape[1] * (right - left)  # each column's centre in the photo
    peak = centres[np.unravel_index(grid.argmax(), grid.shape)[1]]
    if abs(peak - 0.5) > 1e-6: return "second" if peak > 0.5 else "first"
    mass = np.clip(grid, 0, None).sum(0)
    return "second" if mass[centres > 0.5].sum() > mass[centres < 0.5].sum() else "first"


def decode_overlay(explanation: dict) -> Image.Image:
    head, data = explanation["overlay"].split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def explaining_server(sample_model):
    with run_server(create_app(Settings(model_dir=sample_model, backend="onnx"))) as url:
        yield url


def test_heat_map_points_at_the_animal_in_composites(explaining_server, sample_model, not_pets):
    prepared = load_prepared(sample_model / "data")
    test = prepared.split("test")
    pets = [(prepared.root / path, label) for path, label in zip(test.path, test.label)]  # photos the model never trained on
    backgrounds = sorted(next(iter(not_pets.values())).parents[2].rglob("*.jpg"))  # the whole outlier sample
    rng = random.Random(0)
    cases = [(rng.choice(pets), rng.choice(backgrounds), rng.random() < 0.5, rng.random() < 0.5) for _ in range(N_COMPOSITES)]
    answered, on_animal, right = 0, 0, 0
    with httpx.Client(base_url=explaining_server, timeout=60) as client:
        for (pet, label), background, second, vertical in cases:
            response = client.post("/predict", params={"explain": "true"},
                                   files={"file": ("composite.jpg", composite(pet, background, second, vertical), "image/jpeg")})
            assert response.status_code == 200, response.text
            answer = response.json()
            explanation = answer["explanation"]
            assert explanation["label"] == answer["label"] and explanation["size"] == [384, 384]
            if answer["label"] == "neither": continue  # its evidence is for "neither": the background's side
            answered += 1
            right += answer["label"] == label
            on_animal += heat_side(explanation, vertical) == ("second" if second else "first")
    print(f"{answered} of {N_COMPOSITES} composites answered cat or dog; of those, label right {right}, peak on the animal {on_animal}")
    assert answered >= N_COMPOSITES // 2
    assert on_animal >= 0.9 * answered
    assert right >= 0.85 * answered


def test_overlay_is_a_png_of_the_photos_size(explaining_server, sample_dir):
    cat, dog = sample_images(sample_dir, "cat", 1)[0], sample_images(sample_dir, "dog", 1)[0]
    big = io.BytesIO()
    load_image(cat).resize((1600, 1200)).save(big, format="JPEG")
    with httpx.Client(base_url=explaining_server, timeout=60) as client:
        one = client.post("/predict?explain=true", files={"file": (cat.name, cat.read_bytes(), "image/jpeg")}).json()
        overlay = decode_overlay(one["explanation"])
        assert overlay.format == "PNG" and overlay.size == Image.open(cat).size == tuple(one["explanation"]["size"])
        assert "transparency" in overlay.info  # to lay over the photo
        assert np.asarray(overlay.convert("RGBA"))[..., 3].max() > 0  # some heat is drawn
        large = client.post("/predict?explain=true", content=big.getvalue(), headers={"content-type": "image/jpeg"}).json()
        assert large["explanation"]["size"] == [1600, 1200]
        assert decode_overlay(large["explanation"]).size == (1024, 768)  # scaled down to heat_map_max_side
        batch = client.post("/predict/batch?explain=true", files=[("files", (cat.name, cat.read_bytes(), "image/jpeg")),
                                                                  ("files", ("notes.txt", b"milk, eggs", "text/plain")),
                                                                  ("files", (dog.name, dog.read_bytes(), "image/jpeg"))]).json()
        good = [r for r in batch["results"] if r["status"] == 200]
        assert [r["filename"] for r in good] == [cat.name, dog.name]
        assert [decode_overlay(r["explanation"]).size for r in good] == [Image.open(cat).size, Image.open(dog).size]
        assert batch["results"][1]["status"] == 415 and batch["results"][1]["explanation"] is None
        assert client.post("/predict", files={"file": (cat.name, cat.read_bytes(), "image/jpeg")}).json()["explanation"] is None
        with file_server({"dog.jpg": dog.read_bytes()}) as photos:
            by_url = client.post("/predict", params={"explain": "true"}, json={"url": f"{photos}/dog.jpg"})
        assert by_url.status_code == 400  # loopback URLs are refused unless allowed: the explain flag changes nothing there
    with run_server(create_app(Settings(model_dir=demo_artifact(), backend="onnx", allow_private_urls=True))) as url, \
            file_server({"dog.jpg": dog.read_bytes()}) as photos:
        by_url = httpx.post(f"{url}/predict", params={"explain": "true"}, json={"url": f"{photos}/dog.jpg"}, timeout=60)
        assert by_url.status_code == 200 and decode_overlay(by_url.json()["explanation"]).size == Image.open(dog).size


def test_a_model_without_heat_maps_says_so(tmp_path, sample_dir):
    model = build_model("small_cnn", pretrained=False, open_set=False).eval()
    config = config_for_backbone("small_cnn", 64, 0.875)
    export_artifact(model, tmp_path, config)
    export_onnx(model, tmp_path / "model.onnx", torch.zeros(2, 3, 64, 64))  # logits only, as exported without heat maps
    config.heat_maps = False
    config.save(tmp_path / "model_config.json")
    cat = sample_images(sample_dir, "cat", 1)[0]
    with run_server(create_app(Settings(model_dir=tmp_path, backend="onnx"))) as url:
        plain = httpx.post(f"{url}/predict", files={"file": (cat.name, cat.read_bytes(), "image/jpeg")}, timeout=60)
        assert plain.status_code == 200 and plain.json()["explanation"] is None
        for route in ("/predict", "/predict/batch"):
            field = "file" if route == "/predict" else "files"
            refused = httpx.post(f"{url}{route}?explain=true", files={field: (cat.name, cat.read_bytes(), "image/jpeg")}, timeout=60)
            assert refused.status_code == 501 and "no heat maps" in refused.json()["detail"]
        assert httpx.get(f"{url}/ready").json()["heat_maps"] is False
    cli = subprocess.run([shutil.which("catsdogs_predict"), str(cat), "--model", str(tmp_path), "--explain", str(tmp_path / "why")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "no heat maps" in cli.stderr


def test_predict_cli_writes_heat_pictures(sample_model, sample_dir, tmp_path):
    photos = sample_images(sample_dir, "cat", 2) + sample_images(sample_dir, "dog", 1)
    out = subprocess.run([shutil.which("catsdogs_predict"), *map(str, photos), "--model", str(sample_model), "--explain", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    for photo, line in zip(photos, out):
        answer = json.loads(line)
        picture = Image.open(answer["heat_map"])
        assert picture.size == Image.open(photo).size and picture.format == "JPEG"
        assert answer["heat_map"].endswith(f"{photo.stem}.{answer['label']}.jpg")
        assert np.shape(answer["explanation"]["grid"]) == (7, 7)  # 224 px: 7x7 cells


def test_explained_and_plain_requests_share_batches(explaining_server, sample_dir):
    photos = sample_images(sample_dir, "cat", 4) + sample_images(sample_dir, "dog", 4)
    alone = {p.name: httpx.post(f"{explaining_server}/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")}, timeout=60).json()
             for p in photos}
    before = metric_samples(httpx.get(f"{explaining_server}/metrics").text)

    def ask(i_photo):
        i, photo = i_photo
        explain = i % 2 == 0
        answer = httpx.post(f"{explaining_server}/predict", params={"explain": str(explain).lower()},
                            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=60).json()
        return photo, explain, answer

    for _ in range(3):
        with ThreadPoolExecutor(len(photos)) as pool:
            for photo, explain, answer in pool.map(ask, enumerate(photos)):
                assert (answer["explanation"] is not None) == explain
                assert answer["label"] == alone[photo.name]["label"]
                assert abs(answer["p_dog"] - alone[photo.name]["p_dog"]) < 1e-4
                if explain: assert decode_overlay(answer["explanation"]).size == Image.open(photo).size
    after = metric_samples(httpx.get(f"{explaining_server}/metrics").text)
    images = after[("catsdogs_inference_batch_size_sum", ())] - before[("catsdogs_inference_batch_size_sum", ())]
    passes = after[("catsdogs_inference_batch_size_count", ())] - before[("catsdogs_inference_batch_size_count", ())]
    assert images == 3 * len(photos) and passes < images  # requests were batched together, each answered as it asked
