"""Serving what the MLflow Model Registry says: a real SQLite tracking store in a temporary folder,
two model versions, `models:/catsdogs@champion` served by a real uvicorn server, a promotion and a
reload while clients keep sending photos: every request in flight gets its 200."""
import threading
import time

import httpx
import mlflow
import pytest
import torch
from mlflow import MlflowClient

from catsdogs.config import Settings
from catsdogs.inference import Predictor, promote, resolve_model
from catsdogs.model import build_model, config_for_backbone, export_artifact
from catsdogs.serving import create_app
from helpers_serving import demo_artifact, run_server, sample_images


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    "A tracking URI whose registry holds `catsdogs` versions 1 and 2 (two different small models)."
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("catsdogs-test", artifact_location=(tmp / "artifacts").as_uri())
    torch.manual_seed(1)
    second = export_artifact(build_model("small_cnn", pretrained=False), tmp / "second", config_for_backbone("small_cnn", 224, 0.875))
    client.create_registered_model("catsdogs")
    for artifact in (demo_artifact("small_cnn"), second):
        run = client.create_run(experiment)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run.info.run_id): mlflow.log_artifacts(str(artifact), "artifact")
        client.create_model_version("catsdogs", f"runs:/{run.info.run_id}/artifact", run_id=run.info.run_id)
    return uri, tmp


def test_resolve_model_downloads_a_version_once_and_says_what_it_is(registry, tmp_path):
    uri, _ = registry
    promote(1, "champion", tracking_uri=uri)
    folder, facts = resolve_model("models:/catsdogs@champion", uri, tmp_path)
    assert (folder / "model.onnx").is_file() and facts["version"] == 1 and facts["alias"] == "champion"
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    assert resolve_model("models:/catsdogs@champion", uri, tmp_path)[0] == folder and (folder / "model.onnx").stat().st_mtime_ns == stamp
    assert resolve_model("models:/catsdogs/2", uri, tmp_path)[1]["version"] == 2
    assert resolve_model(tmp_path, uri) == (tmp_path, None)  # a folder is a folder
    with pytest.raises(ValueError, match="cannot load models:/catsdogs@nobody from the registry"):
        resolve_model("models:/catsdogs@nobody", uri, tmp_path)


def test_a_promoted_version_is_reloaded_under_load_without_failing_a_request(registry, sample_dir, tmp_path):
    uri, _ = registry
    promote(1, "champion", tracking_uri=uri)
    settings = Settings(model_dir="models:/catsdogs@champion", mlflow_tracking_uri=uri, cache_dir=tmp_path,
                        backend="onnx", admin_token="s3cret")
    photos = [p.read_bytes() for p in sample_images(sample_dir, "cat", 3) + sample_images(sample_dir, "dog", 3)]
    statuses, versions, stop = [], set(), threading.Event()
    with run_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as c:
        before = c.get("/ready").json()
        assert before["registry"]["version"] == 1 and before["registry"]["name"] == "catsdogs"
        def load_loop():
            with httpx.Client(base_url=base, timeout=30) as lc:
                i = 0
                while not stop.is_set():
                    r = lc.post("/predict", content=photos[i % len(photos)], headers={"content-type": "image/jpeg"})
                    statuses.append(r.status_code); versions.add(r.json().get("model_version")); i += 1
        loops = [threading.Thread(target=load_loop) for _ in range(3)]
        for t in loops: t.start()
        deadline = time.monotonic() + 30
        while len(statuses) < 6 and time.monotonic() < deadline: time.sleep(0.01)  # the first model answers before the swap
        promote(2, "champion", tracking_uri=uri)
        assert c.post("/admin/reload").status_code == 401
        assert c.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
        reloaded = c.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
        n_at_reload = len(statuses)
        deadline = time.monotonic() + 30
        while len(statuses) < n_at_reload + 10 and time.monotonic() < deadline: time.sleep(0.01)  # requests flow after the swap
        stop.set()
        for t in loops: t.join()
        after = c.get("/ready").json()
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["registry"]["version"] == 2 and reloaded.json()["previous"]["registry"]["version"] == 1
    assert after["registry"]["version"] == 2 and after["model_version"] != before["model_version"]
    assert statuses and set(statuses) == {200}, set(statuses)
    assert versions == {before["model_version"], after["model_version"]}


def test_the_reload_route_is_off_without_a_token(registry, tmp_path):
    uri, _ = registry
    promote(1, "champion", tracking_uri=uri)
    predictor = Predictor.from_settings(Settings(model_dir="models:/catsdogs@champion", mlflow_tracking_uri=uri, cache_dir=tmp_path,
                                                 backend="onnx"))
    assert predictor.registry["version"] == 1
    with run_server(create_app(Settings(model_dir=predictor.model_dir, backend="onnx"), predictor)) as base:
        assert httpx.post(f"{base}/admin/reload", headers={"Authorization": "Bearer x"}).status_code == 404
