"""Shared fixtures: the real image sample beside the checkout (or a generated stand-in)."""
import shutil
from pathlib import Path

import pytest

from catsdogs.config import Settings
from catsdogs.data import make_demo_folder
from catsdogs.presets import shared_sample

SAMPLE = shared_sample()  # ../shared/data/PetImages-mini beside the checkout, or None
NOT_PETS = shared_sample("not-cats-dogs")


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    "Downloads and pixel caches of this test run go to a folder of its own (CATSDOGS_CACHE_DIR, which subprocesses inherit)."
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CATSDOGS_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    "The real PetImages-mini sample when present, else a generated folder with the same odd files."
    if SAMPLE is not None:
        return SAMPLE
    return make_demo_folder(tmp_path_factory.mktemp("demo"), n_per_class=40)


@pytest.fixture(scope="session")
def small_sample_dir(sample_dir, tmp_path_factory) -> Path:
    "A copy of the first 60 images of each class plus every odd file, for faster end-to-end runs."
    dest = tmp_path_factory.mktemp("small")
    for cls_dir in sorted(p for p in sample_dir.iterdir() if p.is_dir()):
        files = sorted(cls_dir.iterdir())
        odd = [f for f in files if not f.name.lower().startswith(("cat.", "dog."))]
        (dest / cls_dir.name).mkdir()
        for f in odd + [f for f in files if f not in odd][:60]:
            shutil.copy(f, dest / cls_dir.name / f.name)
    return dest


@pytest.fixture(scope="session")
def sample_model(sample_dir, tmp_path_factory) -> Path:
    """The test run's trained artifact, shared by every test that needs one: a real EfficientNet-Lite0 trained on the
    image sample at 224 px (two epochs of the frozen stage, on cached features), its open-set head fitted and its int8
    model written as `catsdogs_train` does."""
    from catsdogs.training import train
    out = tmp_path_factory.mktemp("sample-model") / "model"
    settings = Settings(data_dir=sample_dir, model_dir=out, image_size=224, epochs=2, freeze_epochs=2, batch_size=32, num_workers=1)
    return train(settings, mlflow=False, progress=False).model_dir


@pytest.fixture(scope="session")
def unseen_pets(sample_model) -> dict[str, list[Path]]:
    "The first three cats and three dogs of the sample model's test split (photos it never trained on)."
    from catsdogs.data import load_prepared
    prepared = load_prepared(sample_model / "data")
    test = prepared.split("test")
    return {label: [prepared.root / p for p in test[test.label == label].path[:3]] for label in ("cat", "dog")}


@pytest.fixture(scope="session")
def not_pets() -> dict[str, Path]:
    "One real photo each of a kangaroo, a face and a bear (not cats, not dogs), from the shared outlier sample."
    if NOT_PETS is None: pytest.skip("needs the outlier photos at ../shared/data/not-cats-dogs")
    return {kind: sorted((NOT_PETS / folder).glob("*.jpg"))[0]
            for kind, folder in (("kangaroo", "experiencor/kangaroo"), ("face", "serengil/face"), ("bear", "poziki/bear"))}
