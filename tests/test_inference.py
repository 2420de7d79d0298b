"""The predictor on real photos: backends agree with eager, `auto` picks one and says so, the
preprocessing is the training one, temperature and TTA apply, and `catsdogs_predict` works."""
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from catsdogs.data import decode_size, eval_transform, load_image
from catsdogs.inference import BACKENDS, Prediction, Predictor, predict_cli, softmax
from catsdogs.model import ModelConfig, load_model
from helpers_serving import demo_artifact, odd_images, sample_images


@pytest.fixture(scope="module")
def photos(sample_dir):
    return sample_images(sample_dir, "cat", 3) + sample_images(sample_dir, "dog", 3)


@pytest.fixture(scope="module")
def effnet():
    "EfficientNet-Lite0 with ImageNet weights and an untrained head: realistic graphs for every backend."
    return demo_artifact("efficientnet_lite0")


@pytest.fixture(scope="module")
def small():
    return demo_artifact("small_cnn")


def test_every_backend_matches_eager_on_real_photos(effnet, photos):
    model, config = load_model(effnet)
    tf = eval_transform(config.image_size, config.crop_fraction, config.mean, config.std)
    x = torch.stack([tf(load_image(p, draft_size=decode_size(config.image_size, config.crop_fraction))) for p in photos])
    with torch.no_grad(): expected = softmax(model(x).numpy(), config.temperature)
    for backend in BACKENDS:
        predictor = Predictor(effnet, backend=backend)
        assert predictor.backend == backend
        got = np.array([[p.probabilities["cat"], p.probabilities["dog"]] for p in predictor.predict_batch(photos)])
        assert np.abs(got - expected).max() < 1e-3, backend


def test_auto_picks_the_fastest_matching_backend_and_says_so(effnet, photos, caplog):
    with caplog.at_level(logging.INFO, logger="catsdogs.inference"):
        predictor = Predictor(effnet, backend="auto")
    assert predictor.backend in BACKENDS
    assert predictor.timings[predictor.backend] == min(predictor.timings.values())
    assert f"backend auto: chose {predictor.backend}" in caplog.text
    eager = Predictor(effnet, backend="eager")
    assert abs(predictor.predict(photos[0]).p_dog - eager.predict(photos[0]).p_dog) < 1e-3


def test_preprocessing_is_the_training_transform(small, photos):
    predictor = Predictor(small, backend="eager")
    c = predictor.config
    expected = eval_transform(c.image_size, c.crop_fraction, c.mean, c.std)(load_image(photos[0], draft_size=decode_size(c.image_size, c.crop_fraction)))
    assert torch.equal(predictor.preprocess(photos[0]), expected)
    assert torch.equal(predictor.preprocess(photos[0].read_bytes()), expected)


def test_prediction_fields_and_batch_equals_single(small, photos):
    predictor = Predictor(small, backend="onnx")
    batch = predictor.predict_batch(photos, batch_size=4)
    for path, p in zip(photos, batch):
        assert isinstance(p, Prediction)
        assert set(p.probabilities) == {"cat", "dog"}
        assert abs(sum(p.probabilities.values()) - 1) < 1e-6
        assert p.p_dog == p.probabilities["dog"]
        assert p.confidence == max(p.probabilities.values()) and p.label == max(p.probabilities, key=p.probabilities.get)
        assert abs(predictor.predict(path).p_dog - p.p_dog) < 1e-5


def test_stored_temperature_is_applied(small, photos, tmp_path):
    hot = tmp_path / "hot"
    shutil.copytree(small, hot)
    config = ModelConfig.load(hot / "model_config.json"); config.temperature = 3.0; config.save(hot / "model_config.json")
    plain, calibrated = Predictor(small, backend="eager"), Predictor(hot, backend="eager")
    x = plain.preprocess(photos[0])[None]
    logits = plain.run(x.numpy())[0]
    assert np.allclose(calibrated.probabilities(x), softmax(logits / 3.0), atol=1e-6)


def test_flip_tta_averages_image_and_mirror(small, photos):
    plain, tta = Predictor(small, backend="eager"), Predictor(small, backend="eager", tta=True)
    x = plain.preprocess(photos[3])[None]
    expected = (plain.probabilities(x) + plain.probabilities(torch.flip(x, [-1]))) / 2
    assert np.allclose(tta.probabilities(x), expected, atol=1e-6)
    assert abs(tta.predict(photos[3]).p_dog - expected[0, 1]) < 1e-5


def test_odd_but_valid_images_predict(small, photos):
    predictor = Predictor(small, backend="onnx")
    for name, data in odd_images(photos[0]).items():
        assert 0 <= predictor.predict(data).p_dog <= 1, name


def test_not_a_model_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"): Predictor(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_config.json is missing"): Predictor(tmp_path / "empty")


def test_predict_cli_in_process(small, photos, tmp_path, capsys):
    notes = tmp_path / "notes.txt"; notes.write_text("not a photo")
    code = predict_cli([str(photos[0]), str(notes), str(photos[4]), "--model", str(small), "--json", "--backend", "eager"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert [line["path"] for line in lines] == [str(photos[0]), str(notes), str(photos[4])]
    assert lines[1]["error"].startswith("not an image") and "label" in lines[0] and "label" in lines[2]


def test_predict_console_script(small, photos, tmp_path):
    empty = tmp_path / "empty.jpg"; empty.write_bytes(b"")
    script = shutil.which("catsdogs_predict") or pytest.skip("catsdogs_predict is not installed")
    done = subprocess.run([script, str(photos[0]), str(empty), "--model", str(small), "--tta"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    out = done.stdout.splitlines()
    assert out[0].startswith(f"{photos[0]}: ") and out[0].split(": ")[1].split()[0] in ("cat", "dog")
    assert out[1] == f"{empty}: error: empty file"
    assert "backend auto: chose" in done.stderr


def test_predict_cli_exit_code_zero_when_all_files_are_images(small, photos, capsys):
    assert predict_cli([str(p) for p in photos[:2]] + ["--model", str(small), "--backend", "onnx"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
