"""The predictor on real photos: backends agree with eager, `auto` picks one and says so, the
preprocessing is the training one, temperature and TTA apply, and `catsdogs_predict` works."""
import json
import logging
import shutil
import subprocess

import numpy as np
import pytest
import torch

from torchvision.transforms import v2 as T

from catsdogs.config import InferenceSettings
from catsdogs.engines import AUTO_BACKENDS, BACKENDS, TOLERANCES, softmax
from catsdogs.inference import Prediction, Predictor, predict_cli
from catsdogs.model import load_model
from catsdogs.presets import ModelConfig, Preset
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
    preset = Preset.from_config(config)
    x = torch.from_numpy(preset.stack(photos))
    with torch.no_grad(): expected = softmax(model(x).numpy(), config.temperature)
    for backend in BACKENDS:
        predictor = Predictor(effnet, InferenceSettings(backend=backend, precision="f32"))
        assert (predictor.backend, predictor.precision) == (backend, "f32")
        got = np.array([[p.probabilities["cat"], p.probabilities["dog"]] for p in predictor.predict_batch(photos)])
        assert np.abs(got - expected).max() < 1e-3, backend


def test_auto_picks_the_fastest_matching_backend_and_says_so(effnet, photos, caplog):
    with caplog.at_level(logging.INFO, logger="catsdogs.engines"):
        predictor = Predictor(effnet, InferenceSettings(backend="auto"))
    chosen = f"{predictor.backend}/{predictor.precision}"
    assert predictor.backend in AUTO_BACKENDS and set(predictor.timings) >= {"onnx/f32", "openvino/f32"}
    assert predictor.timings[chosen] == min(predictor.timings.values())
    assert f"engine auto: chose {chosen}" in caplog.text and "check_images" not in caplog.text  # real check photos
    assert "torch" not in predictor.run.__module__
    eager = Predictor(effnet, InferenceSettings(backend="eager"))
    assert abs(predictor.predict(photos[0]).p_dog - eager.predict(photos[0]).p_dog) < TOLERANCES[predictor.precision], predictor


def test_preprocessing_is_torchvisions_eval_transform_pixel_for_pixel(sample_dir, photos):
    """The NumPy eval path that serves equals torchvision's Resize/CenterCrop/Normalize within 1e-5 (float32 rounding),
    on 40 real photos of every size and the odd-but-valid files, at the default 288 px and at 224 px."""
    many = sample_images(sample_dir, "cat", 20) + sample_images(sample_dir, "dog", 20)
    for preset in (Preset(288, 0.875, (0.498,) * 3, (0.502,) * 3), Preset(224, 0.875)):
        reference = T.Compose([T.Resize(preset.resize_size, antialias=True), T.CenterCrop(preset.image_size), T.ToImage(),
                               T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std)])
        for source in [*many, *odd_images(photos[0]).values()]:
            img = preset.load(source)
            assert np.abs(preset.eval_array(img) - reference(img).numpy()).max() < 1e-5


def test_predictor_uses_the_artifacts_preset(small, photos):
    predictor = Predictor(small, InferenceSettings(backend="onnx"))
    preset = Preset.from_config(predictor.config)
    expected = preset.eval_array(preset.load(photos[0]))
    assert np.array_equal(predictor.preprocess(photos[0]), expected)
    assert np.array_equal(predictor.preprocess(photos[0].read_bytes()), expected)


def test_prediction_fields_and_batch_equals_single(small, photos):
    predictor = Predictor(small, InferenceSettings(backend="onnx"))
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
    plain, calibrated = Predictor(small, InferenceSettings(backend="eager")), Predictor(hot, InferenceSettings(backend="eager"))
    x = plain.preprocess(photos[0])[None]
    logits = plain.run(x)[0]
    assert np.allclose(calibrated.probabilities(x), softmax(logits / 3.0), atol=1e-6)


def test_flip_tta_averages_image_and_mirror(small, photos):
    plain, tta = Predictor(small, InferenceSettings(backend="eager")), Predictor(small, InferenceSettings(backend="eager", tta=True))
    x = plain.preprocess(photos[3])[None]
    expected = (plain.probabilities(x) + plain.probabilities(np.ascontiguousarray(x[..., ::-1]))) / 2
    assert np.allclose(tta.probabilities(x), expected, atol=1e-6)
    assert abs(tta.predict(photos[3]).p_dog - expected[0, 1]) < 1e-5


def test_odd_but_valid_images_predict(small, photos):
    predictor = Predictor(small, InferenceSettings(backend="onnx"))
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
    assert "engine auto: chose" in done.stderr


def test_predict_cli_exit_code_zero_when_all_files_are_images(small, photos, capsys):
    assert predict_cli([str(p) for p in photos[:2]] + ["--model", str(small), "--backend", "onnx"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
