"""The Dockerfile built and run for real (`scripts/container.py`): a model trained by this test run baked into the
image, the container answering a real photo on 127.0.0.1 as the model answers it in-process, as a non-root user.
Marked `container`; skipped where no container engine is installed (CI installs podman)."""
import importlib.util
from pathlib import Path

import pytest

from catsdogs.config import InferenceSettings
from catsdogs.inference import Predictor

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("container", ROOT / "scripts" / "container.py")
container = importlib.util.module_from_spec(spec); spec.loader.exec_module(container)

pytestmark = [pytest.mark.container,
              pytest.mark.skipif(container.engine() is None, reason="no container engine (podman or docker) installed")]


def test_image_serves_the_model_as_a_non_root_user(sample_model, unseen_pets, capsys):
    name, tag, photo = container.engine(), "localhost/catsdogs:test", unseen_pets["cat"][0]
    try: container.ensure_base(name)
    except container.BaseImageUnavailable as e: pytest.skip(str(e))
    try:
        container.build(name, sample_model, tag)
        result = container.check(name, tag, photo)
    finally:
        container.run(name, "rmi", "-f", tag, check=False)
    with capsys.disabled(): print(f"\ncontainer image {tag}: {result['image_bytes'] / 1e6:.0f} MB", end=" ")  # in the CI log

    assert result["health"] == (200, {"status": "ok"})
    status, ready = result["ready"]
    predictor = Predictor(sample_model, InferenceSettings())
    expected = predictor.predict(photo)
    assert status == 200 and ready["model_version"] == predictor.model_version and ready["open_set"] is True
    status, answer = result["predict"]
    assert status == 200 and answer["label"] == expected.label == "cat"
    assert answer["p_dog"] == pytest.approx(expected.p_dog, abs=1e-3)
    assert result["user"] not in ("", "0")
    assert 0 < result["image_bytes"] < 2e9
