"""The data stage end to end: `catsdogs_prepare` on real JPEGs, odd files, duplicates, stable
splits, and the PetImages download against a local HTTP server."""
import hashlib
import http.server
import io
import shutil
import subprocess
import threading
import zipfile

import pandas as pd
import pytest
from PIL import Image

from catsdogs.config import Settings
from catsdogs.data import ImageDataset, build_manifest, download, load_image, prepare, split_of
from catsdogs.presets import Preset


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


def test_dataset_uses_the_shared_eval_transform(prepared, sample_dir):
    out, manifest, _ = prepared
    rows = manifest[manifest.split == "val"].head(4)
    preset = Preset(Settings().image_size, Settings().crop_fraction)
    ds = ImageDataset(rows, sample_dir, preset.eval_transform(), draft_size=preset.resize_size)
    x, y = ds[0]
    size = Settings().image_size
    assert tuple(x.shape) == (3, size, size) and y in (0, 1)
    direct = preset.eval_array(preset.load(sample_dir / rows.path.iloc[0]))
    assert (x.numpy() == direct).all()
    assert tuple(Preset(128, 0.875).train_transform()(load_image(sample_dir / rows.path.iloc[0])).shape) == (3, 128, 128)


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

