"""The data stage end to end: `catsdogs_prepare` on real JPEGs, odd files, duplicates, stable
splits, and the PetImages download against a local HTTP server."""
import hashlib
import http.server
import io
import shutil
import subprocess
import threading
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from catsdogs.config import Settings
from catsdogs.data import (BatchAugment, DeviceLoader, ImageDataset, ResizedPhotos, batch_normalize, build_manifest,
                           build_pixel_cache, download, load_image, load_prepared, pixel_cache_folder, prepare, split_of)
from catsdogs.presets import Preset, sample_photos


def run_prepare(data_dir, out, *extra):
    result = subprocess.run(["catsdogs_prepare", "--data-dir", str(data_dir), "--out", str(out), *extra],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def prepared(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    run_prepare(sample_dir, out)
    return out, pd.read_csv(out / "manifest.csv"), pd.read_csv(out / "skipped.csv")


def test_manifest_columns_and_skipped_report(prepared):
    out, manifest, skipped = prepared
    assert {"path", "label", "split", "sha256", "group", "width", "height", "format", "mode"} <= set(manifest.columns)
    assert list(skipped.columns) == ["path", "reason"]
    reasons = dict(zip(skipped.path, skipped.reason))
    thumbs = [p for p in reasons if p.lower().endswith("thumbs.db")]
    assert len(thumbs) == 2 and all("system file" in reasons[p] for p in thumbs)
    assert "empty file" in reasons.values()
    assert any(r.startswith("corrupt or truncated") for r in reasons.values())
    assert not set(manifest.path) & set(skipped.path)
    assert set(manifest.label) == {"cat", "dog"} and set(manifest.split) == {"train", "val", "test"}
    assert (out / "dataset.json").exists()


def test_odd_formats_are_kept_and_load_as_rgb(prepared, sample_dir):
    _, manifest, _ = prepared
    odd = manifest[(manifest["mode"] != "RGB") | (manifest["format"] != "JPEG")]
    assert {"CMYK", "L", "RGBA"} <= set(odd["mode"]) and "PNG" in set(odd["format"])
    for path in odd.path:
        img = load_image(sample_dir / path)
        assert img.mode == "RGB" and min(img.size) > 0


def test_duplicates_never_cross_splits(prepared):
    _, manifest, _ = prepared
    assert manifest.groupby("sha256").split.nunique().max() == 1
    assert manifest.groupby("group").split.nunique().max() == 1
    assert (manifest.groupby("group").size() > 1).sum() >= 2, "the sample stores two photos twice"


def test_prepare_twice_is_byte_identical(prepared, sample_dir, tmp_path):
    out, _, _ = prepared
    run_prepare(sample_dir, tmp_path)
    assert (tmp_path / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()


def test_split_is_stratified(prepared):
    _, manifest, _ = prepared
    shares = pd.crosstab(manifest.label, manifest.split, normalize="index")
    assert ((shares["train"] - 0.8).abs() < 0.06).all()
    assert ((shares[["val", "test"]] - 0.1).abs() < 0.05).all().all()


def test_adding_images_never_moves_existing_ones(small_sample_dir, tmp_path):
    subset = tmp_path / "subset"
    for cls in ("Cat", "Dog"):
        (subset / cls).mkdir(parents=True)
        for f in sorted((small_sample_dir / cls).glob("*.jpg"))[::2]:
            shutil.copy(f, subset / cls / f.name)
    before, _ = build_manifest(subset, Settings(num_workers=1), progress=False)
    after, _ = build_manifest(small_sample_dir, Settings(num_workers=1), progress=False)
    merged = before.merge(after, on="path", suffixes=("_before", "_after"))
    assert len(merged) == len(before)
    assert (merged.split_before == merged.split_after).all()


def test_near_duplicates_and_label_conflicts(sample_dir, tmp_path):
    cat = sorted((sample_dir / "Cat").glob("cat.*.jpg"))[:6]
    dog = sorted((sample_dir / "Dog").glob("dog.*.jpg"))[:6]
    for cls, files in (("Cat", cat), ("Dog", dog)):
        (tmp_path / cls).mkdir()
        for f in files: shutil.copy(f, tmp_path / cls / f.name)
    img = load_image(cat[0])
    img.resize((img.width // 2, img.height // 2)).save(tmp_path / "Cat" / "resized_copy.jpg", quality=60)
    shutil.copy(cat[1], tmp_path / "Dog" / "mislabelled_cat.jpg")
    manifest, skipped = build_manifest(tmp_path, Settings(num_workers=1), progress=False)
    group = manifest.set_index("path").group
    assert group["Cat/resized_copy.jpg"] == group[f"Cat/{cat[0].name}"]
    conflicts = skipped[skipped.reason.str.contains("conflicting labels")]
    assert set(conflicts.path) == {f"Cat/{cat[1].name}", "Dog/mislabelled_cat.jpg"}


def test_flat_kaggle_folder(sample_dir, tmp_path):
    for f in sorted((sample_dir / "Cat").glob("cat.*.jpg"))[:5] + sorted((sample_dir / "Dog").glob("dog.*.jpg"))[:5]:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "readme.txt").write_text("no label")
    manifest, skipped = build_manifest(tmp_path, Settings(num_workers=1), progress=False)
    assert manifest.label.value_counts().to_dict() == {"cat": 5, "dog": 5}
    assert skipped.path.tolist() == ["readme.txt"]


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(buf, format="PNG")  # 60 Mpx in a few kB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ValueError, match="too many pixels"):
        load_image(buf.getvalue(), max_pixels=Settings().max_image_pixels)


def test_eval_batches_are_what_the_served_preprocessing_computes(prepared, sample_dir, tmp_path):
    """An evaluation batch from the pixel cache, normalised on the device, equals `Preset.eval_array` (what serving runs)
    to float32 rounding, photo by photo, odd formats included; so training's validation and test figures are the
    served model's."""
    out, manifest, _ = prepared
    data = load_prepared(out)
    preset = Preset(Settings().image_size, Settings().crop_fraction)
    odd = manifest[(manifest["mode"] != "RGB") | (manifest["format"] != "JPEG")]
    rows = pd.concat([odd, manifest[manifest.split == "val"].head(12)]).reset_index(drop=True)
    photos = ResizedPhotos(data.root, preset, build_pixel_cache(data, preset, tmp_path, progress=False))
    loader = DeviceLoader(DataLoader(ImageDataset(rows, photos), batch_size=8), "cpu", batch_normalize(preset))
    batches = list(loader)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert x.is_contiguous(memory_format=torch.channels_last) and y.tolist() == [("cat", "dog").index(l) for l in rows.label]
    for got, path in zip(x, rows.path):
        assert np.abs(got.numpy() - preset.eval_array(preset.load(sample_dir / path))).max() < 1e-5, path


def test_pixel_cache_is_built_once_by_worker_processes_and_holds_what_decoding_gives(prepared, tmp_path):
    out, manifest, _ = prepared
    data = load_prepared(out)
    preset = Preset(128, 0.875)
    killed = tmp_path / "pixels" / f"{pixel_cache_folder(tmp_path, data, preset).name}.building-999999999"  # no such process
    killed.mkdir(parents=True); (killed / "pixels.u8").write_bytes(b"half")
    folder = build_pixel_cache(data, preset, tmp_path, workers=2, progress=False)  # a pool of 2 (forkserver) processes
    assert not killed.exists()
    stamp = (folder / "pixels.u8").stat().st_mtime_ns
    assert build_pixel_cache(data, preset, tmp_path, progress=False) == folder
    assert (folder / "pixels.u8").stat().st_mtime_ns == stamp  # found, not built again
    assert build_pixel_cache(data, Preset(96, 0.875), tmp_path, workers=1, progress=False) != folder  # another size
    assert folder.name.endswith("-146px-v1") and sorted(p.name for p in tmp_path.joinpath("pixels").iterdir()) == sorted(
        p.name for p in tmp_path.joinpath("pixels").iterdir() if ".building" not in p.name)
    cached, decoded = ResizedPhotos(data.root, preset, folder), ResizedPhotos(data.root, preset)
    odd = manifest[(manifest["mode"] != "RGB") | (manifest["format"] != "JPEG")].path.tolist()
    for path in odd + manifest.path.sample(20, random_state=0).tolist():
        assert np.array_equal(cached[path], decoded[path]), path
    assert (folder / "pixels.u8").stat().st_size == sum(h * w * 3 for h, w in (cached[p].shape[:2] for p in manifest.path))


def test_a_photo_gone_since_preparation_stops_the_cache_build_and_leaves_nothing_behind(prepared, sample_dir, tmp_path):
    out, manifest, _ = prepared
    photos = tmp_path / "photos"
    shutil.copytree(sample_dir, photos)
    data = load_prepared(out, root=photos)
    (photos / manifest.path.iloc[70]).unlink()
    with pytest.raises(FileNotFoundError, match=manifest.path.iloc[70].split("/")[-1]):
        build_pixel_cache(data, Preset(64, 0.875), tmp_path / "cache", workers=2, progress=False)
    assert list((tmp_path / "cache" / "pixels").iterdir()) == []


def test_loader_workers_read_the_cache_as_the_main_process_does(prepared, tmp_path):
    "ResizedPhotos travels to forkserver workers, each of which maps the file itself: the same centre crops, and random crops that a seed repeats."
    out, manifest, _ = prepared
    data = load_prepared(out)
    preset = Preset(96, 0.875)
    photos = ResizedPhotos(data.root, preset, build_pixel_cache(data, preset, tmp_path, workers=1, progress=False))
    rows = manifest[manifest.split == "train"].head(16).reset_index(drop=True)
    def batches(train, workers, seed=0):
        loader = DataLoader(ImageDataset(rows, photos, train=train), batch_size=8, num_workers=workers,
                            generator=torch.Generator().manual_seed(seed), multiprocessing_context="forkserver" if workers else None)
        return torch.cat([x for x, _ in loader])
    assert torch.equal(batches(False, 1), batches(False, 0))
    crops = batches(True, 1)
    assert crops.dtype == torch.uint8 and crops.shape == (16, 3, 96, 96)
    assert torch.equal(batches(True, 1), crops) and not torch.equal(batches(True, 1, seed=1), crops)


def _images(n=8, size=64):
    "n real photos, centre-cropped to size, as floats in [0, 1]."
    preset = Preset(size, 0.875)
    photos = sample_photos("cat", n // 2) + sample_photos("dog", n - n // 2)
    return torch.stack([torch.from_numpy(np.array(preset.eval_crop(preset.load(p)))).permute(2, 0, 1) for p in photos]).float() / 255


def test_batch_augment_draws_per_image_and_each_step_is_torchvisions():
    """Each step of `BatchAugment`, alone, against torchvision's transform of that name with the factor it drew:
    flip and rotation pixel for pixel, brightness, contrast and saturation to rounding, hue (turned in YIQ rather than
    HSV) by as much and the same way; random erasing on a quarter of the images, 2-15% of their area."""
    x, preset = _images(), Preset(64, 0.875)
    neutral = dict(degrees=0, brightness=0, contrast=0, saturation=0, hue=0, erase_p=0)

    torch.manual_seed(3); turned = BatchAugment(preset, **{**neutral, "degrees": 10}).flip_and_rotate(x)
    torch.manual_seed(3); angle = torch.empty(8).uniform_(-10, 10); mirror = torch.rand(8) < 0.5
    for i in range(8):
        expected = TF.rotate(TF.horizontal_flip(x[i]) if mirror[i] else x[i], angle[i].item(), InterpolationMode.NEAREST)
        assert torch.equal(turned[i], expected)
    assert 0 < mirror.sum() < 8

    for k, (name, reference) in enumerate([("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                                           ("saturation", TF.adjust_saturation)]):
        torch.manual_seed(k); out = BatchAugment(preset, **{**neutral, name: 0.4}).colour(x)
        torch.manual_seed(k); factors = 1 + (2 * torch.rand(8, 3)[:, k] - 1) * 0.4
        for i in range(8): assert (out[i] - reference(x[i], factors[i].item())).abs().max() < 1e-5, name
    torch.manual_seed(9); out = BatchAugment(preset, **{**neutral, "hue": 0.02}).colour(x)
    torch.manual_seed(9); torch.rand(8, 3); hue = 0.02 * (2 * torch.rand(8) - 1)
    for i in range(8):  # a turn of the same size and sense as torchvision's, about another axis (YIQ's, not HSV's)
        ours, theirs = (out[i] - x[i]).flatten(), (TF.adjust_hue(x[i], hue[i].item()) - x[i]).flatten()
        assert 0.6 < ours.norm() / theirs.norm() < 1.4 and torch.nn.functional.cosine_similarity(ours, theirs, 0) > 0.2

    ones = torch.ones(2000, 3, 32, 32)
    erased = (BatchAugment(Preset(32, 0.875, (0.0,) * 3, (1.0,) * 3), **{**neutral, "erase_p": 0.25}).erase(ones) == 0)[:, 0]
    share = erased.flatten(1).float().mean(1)
    assert 0.2 < (share > 0).float().mean() < 0.3
    assert share[share > 0].min() >= 0.015 and share.max() <= 0.16

    torch.manual_seed(0)
    augmented = BatchAugment(preset)((x[:1] * 255).to(torch.uint8).expand(8, -1, -1, -1))
    assert augmented.dtype == torch.float32 and len({round(float(a.mean()), 4) for a in augmented}) == 8


# --- download, against a local HTTP server with range support ---------------------------

class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    payload = b""
    ranges_seen: list = []

    def do_GET(self):
        data, start = self.payload, 0
        if (rng := self.headers.get("Range")):
            self.ranges_seen.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):  # as real servers answer a range past the end
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}"); self.send_header("Content-Length", "0")
                self.end_headers(); return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args): pass


@pytest.fixture()
def zip_server(sample_dir):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls in ("Cat", "Dog"):
            for f in sorted((sample_dir / cls).glob("*.*.jpg"))[:8]:
                zf.write(f, f"PetImages/{cls}/{f.name}")
        zf.writestr("PetImages/Cat/Thumbs.db", b"\xd0\xcf\x11\xe0" + bytes(40))
    handler = type("H", (_RangeHandler,), {"payload": buf.getvalue(), "ranges_seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/kagglecatsanddogs.zip", handler
    server.shutdown()


def test_download_resumes_and_checks_sha256(zip_server, tmp_path):
    url, handler = zip_server
    payload = handler.payload
    dest = tmp_path / "pets.zip"
    dest.with_name("pets.zip.part").write_bytes(payload[:1000])
    download(url, dest, sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    assert dest.read_bytes() == payload and handler.ranges_seen == ["bytes=1000-"]
    assert hashlib.sha256(payload).hexdigest() in dest.with_name("pets.zip.sha256").read_text()
    with pytest.raises(IOError, match="sha256"):
        download(url, tmp_path / "other.zip", sha256="0" * 64, progress=False)
    assert not (tmp_path / "other.zip.part").exists()


def test_download_finishes_a_complete_or_stale_part_file(zip_server, tmp_path):
    url, handler = zip_server
    payload, digest = handler.payload, hashlib.sha256(handler.payload).hexdigest()
    complete = tmp_path / "complete.zip"
    complete.with_name("complete.zip.part").write_bytes(payload)  # stopped after the last byte, before the rename
    assert download(url, complete, sha256=digest, progress=False).read_bytes() == payload
    assert handler.ranges_seen == [f"bytes={len(payload)}-"] and not complete.with_name("complete.zip.part").exists()
    stale = tmp_path / "stale.zip"
    stale.with_name("stale.zip.part").write_bytes(payload + b"left over from a bigger file")
    assert download(url, stale, sha256=digest, progress=False).read_bytes() == payload  # starts again
    assert handler.ranges_seen[1:] == [f"bytes={len(payload) + 28}-"]


def test_prepare_from_download(zip_server, tmp_path):
    url, _ = zip_server
    settings = Settings(dataset_url=url, cache_dir=tmp_path / "cache", num_workers=1)
    prepared = prepare(settings, tmp_path / "out", progress=False)
    assert len(prepared.manifest) == 16 and prepared.root.name == "PetImages"
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped.path.tolist() == ["Cat/Thumbs.db"]
    prepare(settings, tmp_path / "out2", progress=False)  # cached: no second download needed
    assert (tmp_path / "out2" / "manifest.csv").read_bytes() == (tmp_path / "out" / "manifest.csv").read_bytes()


def test_split_of_is_seeded():
    draws = {split_of(f"g{i}", seed=1) for i in range(50)}
    assert draws == {"train", "val", "test"}
    assert [split_of(f"g{i}", seed=1) for i in range(50)] != [split_of(f"g{i}", seed=2) for i in range(50)]


def test_a_folder_without_labels_is_a_clear_error(tmp_path):
    (tmp_path / "kitten").mkdir()
    (tmp_path / "kitten" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="class folder"):
        build_manifest(tmp_path, Settings(num_workers=1), progress=False)

