"""Shared fixtures: the real image sample beside the checkout (or a generated stand-in)."""
import shutil
from pathlib import Path

import pytest

from catsdogs.data import make_demo_folder

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "data" / "PetImages-mini"


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    "The real PetImages-mini sample when present, else a generated folder with the same odd files."
    if SAMPLE.is_dir():
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
