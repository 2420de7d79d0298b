"""Training end to end on real JPEGs: the console scripts, a real MLflow store, exports that
match eager, exact resume, DDP with two gloo processes, and the offline weight paths."""
import json
import os
import subprocess
import sys

import mlflow
import onnxruntime as ort
import pytest
import torch

from catsdogs.model import build_model, load_model
from catsdogs.presets import Preset


def run(*cmd, env=None, timeout=600):
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(small_sample_dir, tmp_path_factory):
    "A --quick model trained by the console script, tracked in a fresh SQLite MLflow store."
    tmp = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{tmp}/mlflow.db"
    result = run("catsdogs_train", "--data-dir", str(small_sample_dir), "--model-dir", str(tmp / "model"), "--quick",
                 "--mlflow-tracking-uri", uri, "--num-workers", "1", env={"MLFLOW_TRACKING_URI": ""})
    return tmp / "model", uri, result.stdout


def test_artifact_and_config(trained):
    model_dir, _, stdout = trained
    for name in ("weights.pt", "model_config.json", "model.ts", "model.onnx", "figures/confusion_matrix.png",
                 "figures/roc.png", "figures/reliability.png", "figures/training_curves.png", "figures/worst_mistakes.png"):
        assert (model_dir / name).exists(), name
    config = json.loads((model_dir / "model_config.json").read_text())
    assert config["architecture"] == "efficientnet_lite0" and config["class_names"] == ["cat", "dog"]
    assert config["image_size"] == 96 and config["temperature"] > 0 and len(config["dataset_version"]) == 64
    assert {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "ece", "confusion_matrix", "open_set_kept"} <= set(config["metrics"])
    assert 0 < config["open_set"]["threshold"] < 1 and config["open_set"]["keep_rate"] == 0.99
    assert config["open_set"]["bank_size"] == 48 and config["open_set"]["val_kept"] >= 0.99  # --quick: 24 training photos a class
    assert config["code_version"]
    assert "epoch 1/2 [frozen]" in stdout and "epoch 2/2 [finetune]" in stdout


def test_mlflow_run_is_complete(trained):
    model_dir, uri, _ = trained
    run_id = json.loads((model_dir / "mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(uri)
    run_ = client.get_run(run_id)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["epochs"] == "2" and run_.data.params["quick"] == "True"
    assert len(client.get_metric_history(run_id, "val_loss")) == 2
    assert "test_accuracy" in run_.data.metrics and "temperature" in run_.data.metrics
    assert {"open_set_threshold", "open_set_val_kept", "test_open_set_kept", "test_accuracy_kept"} <= set(run_.data.metrics)
    dataset = run_.inputs.dataset_inputs[0].dataset
    config = json.loads((model_dir / "model_config.json").read_text())
    assert dataset.name == "catsdogs-manifest" and dataset.digest == config["dataset_version"][:32]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"figures", "artifact"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "artifact")} >= {"artifact/model.onnx", "artifact/model_config.json"}
    versions = client.search_model_versions("name='catsdogs'")
    assert any(v.run_id == run_id for v in versions)


def test_exports_match_eager_on_real_images(trained, sample_dir):
    model_dir, _, _ = trained
    model, config = load_model(model_dir)
    preset = Preset.from_config(config)
    paths = sorted((sample_dir / "Cat").glob("cat.*.jpg"))[:4] + sorted((sample_dir / "Dog").glob("dog.*.jpg"))[:4]
    x = torch.from_numpy(preset.stack(paths))
    with torch.no_grad():
        eager = model.exported(x)  # logits, the open-set score, the heat maps
        scripted = torch.jit.load(str(model_dir / "model.ts"))(x)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx = [torch.from_numpy(o) for o in session.run(["logits", "open_set_score", "maps"], {"images": x.numpy()})]
    assert len(eager) == 3 and eager[2].shape[1:] == (3, 3, 3)  # cat, dog and open-set maps; --quick trains at 96 px: 3x3 cells
    for got_ts, got_onnx, expected in zip(scripted, onnx, eager, strict=True):
        assert torch.allclose(got_ts, expected, atol=1e-4, rtol=1e-4)
        assert torch.allclose(got_onnx, expected, atol=1e-3, rtol=1e-4)


def test_eval_cli_json(trained, small_sample_dir):
    model_dir, _, _ = trained
    out = run("catsdogs_eval", "--model", str(model_dir), "--data-dir", str(small_sample_dir), "--json").stdout
    metrics = json.loads(out.strip().splitlines()[-1])
    assert {"accuracy", "log_loss", "n_images"} <= set(metrics)
    assert metrics["n_images"] >= 120 and metrics["n_skipped"] >= 2  # the empty file and the truncated JPEG
    assert "unreadable skipped" in out


@pytest.mark.slow  # trains three times (benchmarks/slow_tests.sh runs it)
def test_resume_ends_where_an_uninterrupted_run_ends(small_sample_dir, tmp_path):
    common = ["--data-dir", str(small_sample_dir), "--quick", "--num-workers", "1"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run("catsdogs_train", *common, "--output", str(tmp_path / "straight"), "--no-mlflow")
    first = run("catsdogs_train", *common, "--output", str(tmp_path / "resumed"), "--mlflow-tracking-uri", uri, "--stop-after-epochs", "1")
    assert "continue with --resume" in first.stdout and not (tmp_path / "resumed" / "weights.pt").exists()
    run_id = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)["run_id"]
    run("catsdogs_train", *common, "--output", str(tmp_path / "resumed"), "--mlflow-tracking-uri", uri, "--resume")
    straight = torch.load(tmp_path / "straight" / "weights.pt")
    resumed = torch.load(tmp_path / "resumed" / "weights.pt")
    for name, tensor in straight.items():
        assert torch.allclose(tensor.float(), resumed[name].float(), atol=1e-6), name
    assert json.loads((tmp_path / "resumed" / "mlflow_run.json").read_text())["run_id"] == run_id
    assert len(mlflow.MlflowClient(uri).get_metric_history(run_id, "val_loss")) == 2


@pytest.mark.slow  # two processes training (benchmarks/slow_tests.sh runs it)
def test_ddp_two_gloo_processes_agree(small_sample_dir, tmp_path):
    run("torchrun", "--standalone", "--nproc-per-node", "2", "--no-python", "catsdogs_train", "--data-dir", str(small_sample_dir),
        "--output", str(tmp_path / "model"), "--quick", "--no-mlflow", "--device", "cpu", "--num-workers", "1",
        "--freeze-epochs", "0", "--epochs", "1", env={"OMP_NUM_THREADS": "1"})
    check = json.loads((tmp_path / "model" / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["agree"] and len(set(check["param_checksums"])) == 1
    assert (tmp_path / "model" / "model.onnx").exists()


def test_torchvision_weights_load_from_the_torch_hub_cache(tmp_path, monkeypatch):
    import torchvision
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    reference = torchvision.models.mobilenet_v3_small()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    model = build_model("mobilenet_v3_small", pretrained=True)
    assert torch.equal(model.backbone[0][0][0].weight, reference.features[0][0].weight)


def test_unknown_architecture_is_a_clear_error(small_sample_dir, tmp_path):
    result = subprocess.run(["catsdogs_train", "--data-dir", str(small_sample_dir), "--output", str(tmp_path),
                             "--architecture", "resnet9000", "--no-mlflow"], capture_output=True, text=True)
    assert result.returncode != 0 and "choose one of" in result.stderr


def test_start_up_mistakes_are_one_line_errors(small_sample_dir, tmp_path):
    "A registry URI as the folder to write, or --resume without a checkpoint: exit status 2 and one line, no traceback."
    for flags, message in ((["--model-dir", "models:/catsdogs@champion"], "is a registry URI"),
                           (["--model-dir", str(tmp_path / "fresh"), "--resume"], "no checkpoint to resume from")):
        result = subprocess.run(["catsdogs_train", "--data-dir", str(small_sample_dir), "--no-mlflow", *flags],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_training_twice_in_one_process_after_inference(small_sample_dir, tmp_path):
    """As in a Jupyter kernel: OpenVINO and ONNX Runtime answer first (their thread pools are up), then two trainings
    with a loader worker process each, then inference again. Loader workers start from a forkserver, never by
    forking this many-threaded process, so nothing inherits a thread pool in an undefined state."""
    code = f"""
import sys
from pathlib import Path
from catsdogs.config import InferenceSettings, Settings
from catsdogs.inference import Predictor
from catsdogs.model import demo_artifact
from catsdogs.training import train
photo = sorted(Path({str(small_sample_dir)!r}).glob("Cat/cat.*.jpg"))[0]
artifact = demo_artifact(Path({str(tmp_path)!r}) / "demo", "small_cnn", 64, check_images=[photo])
for backend in ("openvino", "onnx", "auto"): Predictor(artifact, InferenceSettings(backend=backend)).predict(photo)
for run in range(2):
    settings = Settings(data_dir={str(small_sample_dir)!r}, model_dir=Path({str(tmp_path)!r}) / f"model{{run}}", architecture="small_cnn",
                        image_size=64, epochs=1, freeze_epochs=0, batch_size=16, num_workers=1, quantize=run == 1)
    result = train(settings, mlflow=False, progress=False)
    print("trained", run, Predictor(result.model_dir).predict(photo).label, flush=True)
"""
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}: " + done.stderr[-3000:]
    assert "trained 0" in done.stdout and "trained 1" in done.stdout


def test_training_reads_its_photos_from_a_pixel_cache_of_every_photo(sample_model):
    "The sample model's run built the pixel cache of its photos at its size, under this test run's cache_dir."
    from catsdogs.config import Settings
    from catsdogs.data import load_prepared, pixel_cache_folder
    from catsdogs.presets import ModelConfig
    prepared = load_prepared(sample_model / "data")
    preset = Preset.from_config(ModelConfig.load(sample_model / "model_config.json"))
    folder = pixel_cache_folder(Settings().cache_dir, prepared, preset)
    index = json.loads((folder / "index.json").read_text())
    assert index["paths"] == prepared.manifest.path.tolist() and index["resize_size"] == preset.resize_size == 256
    assert min(min(shape) for shape in index["shapes"]) == 256
