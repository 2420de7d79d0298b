"""The feedback loop through real servers on 127.0.0.1: corrections stored durably (a server killed with SIGKILL in the
middle of a burst loses none it acknowledged), every bad input refused with a clear 4xx, the review queue, retraining on
the corrections (prepare and a quick training, with a real MLflow store), and drift measured on a stream of photos and
alerted on by a real Prometheus server."""
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from catsdogs.config import Settings
from catsdogs.data import load_prepared
from catsdogs.feedback import Answered, FeedbackStore
from catsdogs.serving import create_app
from helpers_serving import demo_artifact, metric_value, run_server, sample_images, serve_process

REPO = Path(__file__).resolve().parent.parent


def post_photo(base: str, photo: Path, client: httpx.Client | None = None) -> dict:
    answer = (client or httpx).post(f"{base}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def check_store_is_whole(folder: Path) -> list[dict]:
    "The store's database passes SQLite's integrity check and every row names a whole photo (its sha256 matches); its corrections."
    with sqlite3.connect(folder / "feedback.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = FeedbackStore(Settings(feedback_dir=folder))
    try:
        corrections = store.corrections()
        for item in corrections + store.review_items(10_000):
            assert hashlib.sha256(item["path"].read_bytes()).hexdigest() == item["sha256"]
        return corrections
    finally:
        store.close()


def test_corrections_are_stored_with_their_photos_and_survive_sigkill(sample_dir, tmp_path):
    store_dir = tmp_path / "feedback"
    args = ["--model-dir", str(demo_artifact()), "--backend", "onnx", "--feedback-dir", str(store_dir),
            "--feedback-per-minute", "100000", "--review-queue-size", "0"]
    photos = sample_images(sample_dir, "cat", 25) + sample_images(sample_dir, "dog", 25)
    with serve_process(*args) as base, httpx.Client(timeout=30) as client:
        answers = [(photo, post_photo(base, photo, client)) for photo in photos[:20]]
        corrected = answers[:5]
        for photo, answer in corrected:
            label = "dog" if answer["label"] != "dog" else "cat"
            stored = client.post(f"{base}/feedback", json={"id": answer["id"], "label": label, "note": photo.name})
            assert stored.status_code == 201, stored.text
            assert stored.json()["sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest()
        corrections = check_store_is_whole(store_dir)
        assert sorted(c["id"] for c in corrections) == sorted(a["id"] for _, a in corrected)  # exactly those five
        by_id = {c["id"]: c for c in corrections}
        for photo, answer in corrected:
            kept = by_id[answer["id"]]
            assert kept["path"].read_bytes() == photo.read_bytes() and kept["note"] == photo.name
            assert kept["answer"]["label"] == answer["label"] and kept["model_version"] == answer["model_version"]
            assert kept["answer"]["confidence"] == pytest.approx(answer["confidence"])
        assert len(list((store_dir / "photos").glob("*/*"))) == 5  # uncorrected answers never reach the disk

        # a burst of corrections from four clients at once, and SIGKILL in the middle of it
        burst = [post_photo(base, photo, client) for photo in photos[20:]]
        acknowledged, lock = [], threading.Lock()
        def send(chunk):
            with httpx.Client(timeout=30) as own:
                for answer in chunk:
                    try: response = own.post(f"{base}/feedback", json={"id": answer["id"], "label": "cat"})
                    except httpx.TransportError: return  # the server is gone
                    if response.status_code == 201:
                        with lock: acknowledged.append(answer["id"])
        threads = [threading.Thread(target=send, args=(burst[i::4],)) for i in range(4)]
        for t in threads: t.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 8 and time.monotonic() < deadline: time.sleep(0.005)
        os.kill(base.pid, signal.SIGKILL)
        for t in threads: t.join(timeout=30)
    assert 8 <= len(acknowledged) < len(burst), "the kill should land in the middle of the burst"
    after = check_store_is_whole(store_dir)
    assert set(acknowledged) <= {c["id"] for c in after}  # nothing acknowledged is lost
    assert len(after) <= 5 + len(burst)

    with serve_process(*args) as base:  # the store opens again, and takes more
        assert httpx.get(f"{base}/ready").json()["feedback"] is True
        answer = post_photo(base, photos[-1])
        assert httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "dog"}).status_code == 201
    assert len(check_store_is_whole(store_dir)) == len(after) + (answer["id"] not in {c["id"] for c in after})


@pytest.fixture(scope="module")
def photos_by_size(sample_dir) -> list[Path]:
    return sorted(sample_images(sample_dir, "cat", 40), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def feedback_server(tmp_path_factory, photos_by_size):
    """A server with feedback on, small limits (six corrections a minute per client, a store that holds the smallest photo
    and no other, answers kept two seconds) and an admin token."""
    folder = tmp_path_factory.mktemp("feedback") / "store"
    settings = Settings(model_dir=demo_artifact(), backend="onnx", feedback_dir=folder, feedback_per_minute=6,
                        feedback_max_bytes=photos_by_size[0].stat().st_size + 100, feedback_answer_ttl_s=2.0, admin_token="s3cret",
                        review_queue_size=0)
    with run_server(create_app(settings)) as url:
        yield url, folder


def test_every_bad_correction_gets_a_clear_4xx(feedback_server, photos_by_size):
    base, folder = feedback_server
    small, large = photos_by_size[0], photos_by_size[-1]
    answer = post_photo(base, small)
    refusals = {
        "unknown id": (httpx.post(f"{base}/feedback", json={"id": "0" * 32, "label": "cat"}), 404, "unknown, or older than"),
        "bad label": (httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "horse"}), 422, "label: Input should be 'cat', 'dog' or 'neither'"),
        "no id": (httpx.post(f"{base}/feedback", json={"label": "cat"}), 422, "id: Field required"),
        "extra field": (httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "cat", "score": 1}), 422, "score: Extra inputs"),
        "long note": (httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "cat", "note": "x" * 501}), 422, "note: String should have at most 500"),
        "not JSON": (httpx.post(f"{base}/feedback", content=b"id=1", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        "a form": (httpx.post(f"{base}/feedback", data={"id": answer["id"], "label": "cat"}), 415, "send a JSON body"),
        "huge body": (httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "cat", "note": "x" * 20_000}), 413, ""),
    }
    for name, (response, status, words) in refusals.items():
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["detail"], (name, response.json())
    assert check_store_is_whole(folder) == []  # nothing reached the store

    first = httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "dog"})
    assert first.status_code == 201
    full = httpx.post(f"{base}/feedback", json={"id": post_photo(base, large)["id"], "label": "dog"})  # a second photo does not fit
    assert full.status_code == 409 and "the feedback store is full" in full.json()["detail"]
    time.sleep(2.1)
    expired = httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "cat"})
    assert expired.status_code == 404 and "older than 2 s" in expired.json()["detail"]
    # this client has sent four counted corrections (the unknown id among them): two more, then 429 with Retry-After
    statuses = [httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "dog"}) for _ in range(3)]
    assert [r.status_code for r in statuses] == [404, 404, 429]
    assert int(statuses[-1].headers["Retry-After"]) >= 1 and "at most 6 a minute" in statuses[-1].json()["detail"]
    stored = check_store_is_whole(folder)
    assert [(c["id"], c["label"]) for c in stored] == [(answer["id"], "dog")] and stored[0]["path"].read_bytes() == small.read_bytes()


def test_review_and_export_routes_need_the_admin_token(feedback_server):
    base, _ = feedback_server
    for method, path in [("GET", "/review"), ("GET", "/review/items"), ("GET", "/review/photos/" + "a" * 64),
                         ("POST", "/review/" + "a" * 64), ("GET", "/admin/feedback.tar")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic bm9ib2R5Omd1ZXNz"}):
            response = httpx.request(method, base + path, headers=headers, json={"label": "cat"} if method == "POST" else None)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert httpx.get(base + "/review/photos/" + "a" * 64, headers={"Authorization": "Bearer s3cret"}).status_code == 404
    assert httpx.get(base + "/review/items", auth=("anyone", "s3cret")).status_code == 200


def test_feedback_off_keeps_nothing_and_says_so(sample_dir, tmp_path):
    settings = Settings(model_dir=demo_artifact(), backend="onnx", admin_token="s3cret")
    with run_server(create_app(settings)) as base:
        answer = post_photo(base, sample_images(sample_dir, "dog", 1)[0])
        assert len(answer["id"]) == 32 and httpx.get(f"{base}/ready").json()["feedback"] is False
        off = httpx.post(f"{base}/feedback", json={"id": answer["id"], "label": "cat"})
        assert off.status_code == 404 and "feedback is off" in off.json()["detail"]
        assert httpx.get(f"{base}/review/items", headers={"Authorization": "Bearer s3cret"}).status_code == 404


def test_the_review_queue_keeps_the_most_doubtful_and_labels_them(sample_dir, tmp_path):
    folder = tmp_path / "store"
    settings = Settings(model_dir=demo_artifact(), backend="onnx", feedback_dir=folder, review_queue_size=3, review_margin=100.0,
                        admin_token="s3cret")
    admin = {"Authorization": "Bearer s3cret"}
    photos = sample_images(sample_dir, "cat", 4) + sample_images(sample_dir, "dog", 4)
    with run_server(create_app(settings)) as base:
        answers = [post_photo(base, p) for p in photos]
        queue = httpx.get(f"{base}/review/items", headers=admin).json()
        threshold = httpx.get(f"{base}/ready").json()["open_set_threshold"]
        from catsdogs.feedback import answer_margin
        margins = sorted(answer_margin(a, threshold) for a in answers)
        assert queue["waiting"] == 3 and [round(i["margin"], 6) for i in queue["items"]] == [round(m, 6) for m in margins[:3]]
        first = queue["items"][0]
        photo = httpx.get(base + first["photo"], headers=admin)
        assert hashlib.sha256(photo.content).hexdigest() == first["sha256"]
        labelled = httpx.post(f"{base}/review/{first['sha256']}", json={"label": "neither"}, headers=admin)
        assert labelled.status_code == 201 and labelled.json()["source"] == "review"
        assert httpx.get(f"{base}/review/items", headers=admin).json()["waiting"] == 2
        again = httpx.post(f"{base}/review/{first['sha256']}", json={"label": "cat"}, headers=admin)
        assert again.status_code == 404 and "waiting for review" in again.json()["detail"]
        archive = httpx.get(f"{base}/admin/feedback.tar", headers=admin)
        assert archive.status_code == 200 and archive.headers["content-type"] == "application/x-tar"
    export = tmp_path / "export"
    import tarfile, io
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar: tar.extractall(export, filter="data")
    assert [(c["label"], c["source"]) for c in check_store_is_whole(export)] == [("neither", "review")]


def test_prepare_and_a_quick_training_learn_from_the_corrections(small_sample_dir, tmp_path):
    """A store with a corrected near-duplicate of a test photo, a corrected training photo and a photo of neither; then
    `catsdogs_prepare --feedback-dir` and `catsdogs_train --quick` with a real MLflow store (on the small CNN: what
    this checks is where the corrected photos go, whatever the backbone)."""
    from PIL import Image
    from catsdogs.data import prepare
    before = prepare(Settings(data_dir=small_sample_dir), tmp_path / "before", progress=False)
    test_dog = before.split("test").query("label == 'dog'").path.iloc[0]
    twin = tmp_path / "twin.jpg"
    Image.open(small_sample_dir / test_dog).convert("RGB").reduce(2).save(twin, quality=80)
    outliers = sorted((REPO.parent / "shared" / "data" / "not-cats-dogs").rglob("*.jpg"))
    if not outliers: pytest.skip("needs the outlier photos at ../shared/data/not-cats-dogs")
    store = FeedbackStore(Settings(feedback_dir=tmp_path / "store"))
    answered = {"confidence": 0.6, "probabilities": {"cat": 0.6, "dog": 0.4}, "p_dog": 0.4, "p_cat_or_dog": 0.9, "label": "cat"}
    store.correct("twin", Answered(twin.read_bytes(), answered, "3f2c9a1b7d4e"), "dog")
    store.correct("other", Answered(outliers[0].read_bytes(), answered, "3f2c9a1b7d4e"), "neither")
    store.close()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prepared_dir = tmp_path / "prepared"
    done = subprocess.run([sys.executable, "-c", "from catsdogs.data import prepare_cli; prepare_cli()", "--data-dir", str(small_sample_dir),
                           "--feedback-dir", str(tmp_path / "store"), "--out", str(prepared_dir)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "from feedback: 2 photos, 0 cat, 1 dog, 1 neither" in done.stdout
    after = load_prepared(prepared_dir)
    info = json.loads((prepared_dir / "dataset.json").read_text())
    assert after.version != before.version and info["version"] == after.version and info["feedback_photos"] == 2
    feedback = after.manifest[after.manifest.origin == "feedback"].set_index("label")
    twin_group = after.manifest[after.manifest.group == feedback.loc["dog", "group"]]
    assert set(twin_group.split) == {"test"} and len(twin_group) == 2  # beside its twin, not in train
    assert "neither" not in set(after.split("train").label) | set(after.split("test").label)
    kept = after.manifest[after.manifest.origin == "dataset"].set_index("path").split
    assert (kept == before.manifest.set_index("path").split.reindex(kept.index)).all()  # no dataset photo moved

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run([sys.executable, "-c", "from catsdogs.training import train_cli; train_cli()", "--prepared", str(prepared_dir),
                           "--quick", "--model-dir", str(tmp_path / "model"), "--mlflow-tracking-uri", tracking, "--num-workers", "1",
                           "--architecture", "small_cnn", "--no-quantize"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads((tmp_path / "model" / "mlflow_run.json").read_text())["run_id"]
    run = mlflow.MlflowClient(tracking).get_run(run_id)
    assert run.data.tags["dataset_version"] == after.version
    assert (run.data.params["feedback_photos"], run.data.params["feedback_dog"], run.data.params["feedback_neither"]) == ("2", "1", "1")
    assert run.data.metrics["test_n_feedback_neither"] == 1 and 0 <= run.data.metrics["test_feedback_neither_refused"] <= 1
    config = json.loads((tmp_path / "model" / "model_config.json").read_text())
    assert config["dataset_version"] == after.version and set(config["drift_reference"]) == {"confidence", "p_cat_or_dog"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def prometheus(tmp_path):
    "Start a real Prometheus on 127.0.0.1: `start(target)` scrapes `target` every second with the deploy alert rules (and a copy without their `for`)."
    binary = shutil.which("prometheus")
    if binary is None: pytest.skip("needs Prometheus (Debian's prometheus package)")
    procs = []
    def start(target: str) -> str:
        rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())
        for group in rules["groups"]:
            group["name"] += "-at-once"
            for rule in group["rules"]: rule["for"], rule["alert"] = "0s", rule["alert"] + "AtOnce"
        (tmp_path / "at-once.yaml").write_text(yaml.safe_dump(rules))
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(REPO / "deploy" / "prometheus" / "alerts.yaml"), str(tmp_path / "at-once.yaml")],
                  "scrape_configs": [{"job_name": "catsdogs", "static_configs": [{"targets": [target]}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = _free_port()
        log = open(tmp_path / "prometheus.log", "w")
        procs.append(subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200: return base
            except httpx.TransportError: pass
            assert procs[-1].poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.2)
    yield start
    for proc in procs: proc.terminate(); proc.wait(timeout=30)


def _alert_states(prometheus_url: str) -> dict:
    alerts = httpx.get(f"{prometheus_url}/api/v1/alerts").json()["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("signal")): a["state"] for a in alerts}


def _scraped_value(prometheus_url: str, query: str) -> float | None:
    "The latest sample Prometheus holds for `query`, or None before its first scrape of it."
    result = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": query}).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_drift_rises_on_other_photos_and_prometheus_alerts(sample_model, prometheus):
    """Cats and dogs of the model's test split keep the PSI low; photos of other things push it past 0.25, Prometheus
    scrapes it, and the alert rule of deploy/prometheus goes pending (and, in the copy without its 15 minutes, fires)."""
    outliers_root = REPO.parent / "shared" / "data" / "not-cats-dogs"
    folders = sorted({p.parent for p in outliers_root.rglob("*.jpg")})
    if not folders: pytest.skip("needs the outlier photos at ../shared/data/not-cats-dogs")
    window = 100
    prepared = load_prepared(sample_model / "data")
    pets = [prepared.root / p for p in prepared.split("test").path][:window]
    per_folder = [sorted(folder.glob("*.jpg")) for folder in folders]
    others = [per_folder[i % len(folders)][i // len(folders)] for i in range(window)]  # from every folder in turn
    settings = Settings(model_dir=sample_model, backend="onnx", precision="f32", drift_window=window)
    with run_server(create_app(settings)) as base, httpx.Client(timeout=30) as client:
        assert client.get(f"{base}/ready").json()["drift"] is True
        assert "NaN" in [line for line in client.get(f"{base}/metrics").text.splitlines() if line.startswith("catsdogs_drift_psi")][0]
        for photo in pets: post_photo(base, photo, client)
        page = client.get(f"{base}/metrics").text
        calm = {s: metric_value(page, "catsdogs_drift_psi", signal=s) for s in ("confidence", "p_cat_or_dog")}
        print(f"\nPSI after {window} unseen cats and dogs: {calm}")
        assert all(0 <= v < 0.25 for v in calm.values()), calm
        prometheus_url = prometheus(base.removeprefix("http://"))
        time.sleep(3)
        assert not [key for key in _alert_states(prometheus_url) if key[0].startswith("CatsdogsInputDrift")]
        for photo in others: post_photo(base, photo, client)
        page = client.get(f"{base}/metrics").text
        drifted = {s: metric_value(page, "catsdogs_drift_psi", signal=s) for s in ("confidence", "p_cat_or_dog")}
        print(f"PSI after {window} photos of other things: {drifted}; share of 'neither': {metric_value(page, 'catsdogs_window_neither_share')}")
        assert drifted["p_cat_or_dog"] > 0.25
        # Prometheus scrapes every second, so its latest sample may predate the last posts: poll until it holds the
        # value the page shows now, and the alerts have had an evaluation on it.
        deadline, states, scraped = time.monotonic() + 30, {}, None
        while time.monotonic() < deadline:
            states = _alert_states(prometheus_url)
            scraped = _scraped_value(prometheus_url, 'catsdogs_drift_psi{signal="p_cat_or_dog"}')
            if (states.get(("CatsdogsInputDrift", "p_cat_or_dog")) == "pending" and states.get(("CatsdogsInputDriftAtOnce", "p_cat_or_dog")) == "firing"
                    and scraped == pytest.approx(drifted["p_cat_or_dog"], rel=0.05)):
                break
            time.sleep(0.5)
        assert states.get(("CatsdogsInputDrift", "p_cat_or_dog")) == "pending", states  # the deploy rule: true, waiting its 15 minutes
        assert states.get(("CatsdogsInputDriftAtOnce", "p_cat_or_dog")) == "firing", states
        assert scraped == pytest.approx(drifted["p_cat_or_dog"], rel=0.05)
