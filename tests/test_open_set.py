"""The "neither" answer on real photos: a model trained on the sample answers "neither" for a
kangaroo, a face and a bear through the HTTP API, the console scripts and the evaluation, still
answers cats and dogs as themselves, and answers two ways when the open set is turned off."""
import json
import shutil
import subprocess

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch

from catsdogs.config import InferenceSettings, Settings
from catsdogs.presets import Preset
from catsdogs.inference import Predictor
from catsdogs.model import load_model
from catsdogs.serving import create_app
from helpers_serving import run_server

pytestmark = pytest.mark.slow  # a model trained on the whole sample (about 3 minutes): benchmarks/slow_tests.sh runs these


@pytest.fixture(scope="module")
def pets(unseen_pets):
    return unseen_pets


@pytest.fixture(scope="module")
def server(sample_model):
    with run_server(create_app(Settings(model_dir=sample_model, backend="onnx"))) as url:
        yield url


def post(url, path):
    return httpx.post(url + "/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, timeout=30)


def test_api_answers_neither_for_a_kangaroo_a_face_and_a_bear(server, not_pets, sample_model):
    threshold = json.loads((sample_model / "model_config.json").read_text())["open_set"]["threshold"]
    for kind, photo in not_pets.items():
        answer = post(server, photo)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["label"] == "neither", (kind, body)
        assert 0 <= body["p_cat_or_dog"] < threshold
        assert body["confidence"] == pytest.approx(1 - body["p_cat_or_dog"])
        assert body["probabilities"]["cat"] + body["probabilities"]["dog"] == pytest.approx(1)


def test_api_still_answers_cats_and_dogs(server, pets):
    for label, photos in pets.items():
        for photo in photos:
            body = post(server, photo).json()
            assert body["label"] == label, (photo.name, body)
            assert body["p_cat_or_dog"] > 0.5


def test_batch_and_metrics_count_neither(server, not_pets, pets):
    before = _neither_count(server)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in [*not_pets.values(), pets["dog"][0]]]
    results = httpx.post(server + "/predict/batch", files=files, timeout=30).json()["results"]
    assert [r["label"] for r in results] == ["neither"] * 3 + ["dog"]
    assert all(r["status"] == 200 and r["p_cat_or_dog"] is not None for r in results)
    assert _neither_count(server) == before + 3


def _neither_count(url) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "catsdogs_predictions_total" and sample.labels.get("label") == "neither": return sample.value
    return 0.0


def test_ready_and_openapi_show_the_open_set(server, sample_model):
    ready = httpx.get(server + "/ready").json()
    config = json.loads((sample_model / "model_config.json").read_text())
    assert ready["open_set"] is True and ready["open_set_threshold"] == pytest.approx(config["open_set"]["threshold"])
    schema = httpx.get(server + "/openapi.json").json()["components"]["schemas"]
    assert "p_cat_or_dog" in schema["PredictionOut"]["properties"] and "p_cat_or_dog" in schema["BatchItem"]["properties"]
    assert "neither" in schema["PredictionOut"]["properties"]["label"]["description"]
    assert any(e["label"] == "neither" for e in schema["PredictionOut"]["examples"])


def test_closed_set_setting_restores_two_way_answers(sample_model, not_pets):
    with run_server(create_app(Settings(model_dir=sample_model, backend="onnx", open_set=False))) as url:
        for photo in not_pets.values():
            body = post(url, photo).json()
            assert body["label"] in ("cat", "dog") and body["p_cat_or_dog"] is None
        assert httpx.get(url + "/ready").json()["open_set"] is False


def test_threshold_override_at_serving_time(sample_model, pets):
    strict = Predictor(sample_model, InferenceSettings(backend="onnx", open_set_threshold=1.0))
    lenient = Predictor(sample_model, InferenceSettings(backend="onnx", open_set_threshold=0.0))
    assert strict.predict(pets["cat"][0]).label == "neither" and lenient.predict(pets["cat"][0]).label == "cat"


def cli(*args, env=None):
    import os
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_predict_cli_answers_neither_and_closed_set_by_flag_or_env(sample_model, not_pets, pets):
    photos = [*not_pets.values(), pets["cat"][0]]
    done = cli("catsdogs_predict", "--model", str(sample_model), "--backend", "onnx", "--json", *map(str, photos))
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["label"] for a in answers] == ["neither"] * 3 + ["cat"]
    text = cli("catsdogs_predict", "--model", str(sample_model), "--backend", "onnx", str(photos[0])).stdout
    assert ": neither " in text and "p_cat_or_dog=" in text
    for extra, env in ((["--no-open-set"], None), ([], {"CATSDOGS_OPEN_SET": "false"})):
        done = cli("catsdogs_predict", "--model", str(sample_model), "--backend", "onnx", "--json", *extra, *map(str, photos), env=env)
        assert [json.loads(line)["label"] in ("cat", "dog") for line in done.stdout.splitlines()] == [True] * 4


def test_eval_cli_with_an_outlier_folder(sample_model, small_sample_dir, not_pets, tmp_path):
    outliers = tmp_path / "neither" / "nested"
    outliers.mkdir(parents=True)
    for folder in {p.parent for p in not_pets.values()}:
        for photo in sorted(folder.glob("*.jpg"))[:6]: shutil.copy(photo, outliers / f"{folder.name}-{photo.name}")
    (outliers / "notes.txt").write_text("not an image")
    done = cli("catsdogs_eval", "--model", str(sample_model), "--data-dir", str(small_sample_dir),
               "--ood-dir", str(tmp_path / "neither"), "--backend", "onnx", "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["n_outliers"] == 18 and metrics["n_outliers_skipped"] == 1
    assert 0.9 < metrics["ood_roc_auc"] <= 1 and metrics["ood_refused"] >= 0.8
    assert 0 <= metrics["ood_fpr_at_95_tpr"] <= metrics["ood_fpr_at_99_tpr"] <= 1
    assert metrics["open_set_kept"] >= 0.9 and metrics["accuracy_kept"] >= 0.9
    assert "ood_roc_auc: " in done.stdout and "unreadable skipped" in done.stdout
    assert "cats and dogs: 100%" in done.stderr and "neither: 100%" in done.stderr  # progress bars, beside the JSON
    closed = cli("catsdogs_eval", "--model", str(sample_model), "--data-dir", str(small_sample_dir),
                 "--ood-dir", str(tmp_path / "neither"), "--no-open-set")
    assert closed.returncode == 2 and "needs the open set" in closed.stderr


def test_exported_graphs_carry_the_open_set_score(sample_model, not_pets, pets):
    model, config = load_model(sample_model)
    preset = Preset.from_config(config)
    x = torch.stack([torch.from_numpy(preset.eval_array(preset.load(p))) for p in [*not_pets.values(), *pets["cat"], *pets["dog"]]])
    with torch.no_grad():
        logits, score = model.forward_open_set(x)
        ts_logits, ts_score, _ = torch.jit.load(str(sample_model / "model.ts"))(x)  # and the heat maps
    session = ort.InferenceSession(str(sample_model / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_score = session.run(["logits", "open_set_score"], {"images": x.numpy()})
    assert torch.allclose(ts_logits, logits, atol=1e-4) and torch.allclose(ts_score, score, atol=1e-4)
    assert np.allclose(onnx_logits, logits.numpy(), atol=1e-3) and np.allclose(onnx_score, score.numpy(), atol=1e-3)
    p = config.open_set.probability(score.numpy())
    assert (p[:3] < config.open_set.threshold).all() and (p[3:] >= config.open_set.threshold).all()


def test_open_set_flags_reach_uvicorn_workers(sample_model, monkeypatch):
    "With --workers > 1 the settings travel as CATSDOGS_* variables: the open-set switch and an unset threshold too."
    from fastapi.testclient import TestClient
    from catsdogs.config import field_names
    from catsdogs.serving import _SERVE_FIELDS, _to_env, app_from_env
    cases = [(Settings(model_dir=sample_model, backend="onnx", workers=2, open_set=open_set, open_set_threshold=threshold), open_set, threshold)
             for open_set, threshold in ((True, 0.3), (True, None), (False, None))]
    config = json.loads((sample_model / "model_config.json").read_text())["open_set"]
    for name in field_names(_SERVE_FIELDS): monkeypatch.setenv(f"CATSDOGS_{name.upper()}", "")  # monkeypatch restores them afterwards
    for settings, open_set, threshold in cases:
        _to_env(settings, _SERVE_FIELDS)
        with TestClient(app_from_env()) as client: ready = client.get("/ready").json()
        expected = (threshold or config["threshold"]) if open_set else None
        assert ready["open_set"] is open_set and ready["open_set_threshold"] == pytest.approx(expected)

