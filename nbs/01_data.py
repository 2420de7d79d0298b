# %%
#| default_exp data

# %% [markdown]
# # Data
#
# > From photos on disk to a cleaned, versioned split manifest and a PyTorch `Dataset`.

# %% [markdown]
# The stage runs as `catsdogs_prepare` and does four things:
#
# 1. **finds** the images: the Microsoft PetImages zip (downloaded once, resumable), a folder
#    with one subfolder per class, or a flat folder of Kaggle names (`cat.12.jpg`);
# 2. **validates** every file by decoding it fully once, in parallel; unreadable files are
#    skipped *with a reason*;
# 3. **groups duplicates**, exact (sha256) and near (perceptual hash), so a photo never sits
#    in two splits, and drops groups whose copies disagree on the label;
# 4. **splits** 80/10/10 per class by a seeded hash of each duplicate group, so the split is
#    deterministic and adding images never moves an existing one.
#
# With `--feedback-dir DIR` it also merges the corrections of a feedback store (see the
# feedback notebook) into the same manifest, as photos of their own origin: duplicate-aware
# like every other photo, "neither" photos included.
#
# The manifest's sha256 is the dataset version that training logs to MLflow.

# %%
#| export
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import torch
from PIL import ImageOps
from tqdm import tqdm

from catsdogs.config import DataSettings, Settings, parse_settings, settings_parser
from catsdogs.feedback import FeedbackStore
from catsdogs.presets import (CLASS_NAMES, NEITHER, ImageError, Preset, _open_image, demo_data_dir, list_images, load_image,  # noqa: F401 (re-exported)
                              make_demo_folder, to_rgb)

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import io, tempfile
from PIL import Image
from catsdogs.config import FeedbackSettings
from catsdogs.feedback import Answered
from catsdogs.presets import shared_sample
from torchvision.transforms.v2 import functional as TF
import time
from torch.utils.data import DataLoader


# %% [markdown]
# ## Finding the images
#
# `find_images` is `list_images` (from `catsdogs.presets`) as a table. Images come from the
# sample beside the checkout when there is one (`demo_data_dir`), else from a generated
# stand-in with the same layout and the same kinds of odd files.

# %%
#| export
def find_images(root:Path, # Folder to scan recursively
                class_names:tuple[str, ...]=CLASS_NAMES) -> pd.DataFrame:
    "Every file under `root` with its label (None when neither folder nor name gives one), sorted by path."
    return pd.DataFrame(list_images(root, class_names), columns=["path", "label"])


# %%
data_dir = demo_data_dir()
files = find_images(data_dir)
test_eq(set(files.label.dropna()), {"cat", "dog"})
files.label.value_counts(dropna=False)

# %% [markdown]
# ## Validating every file
#
# `inspect_image` reads a file once: its sha256, a full decode (so truncation is caught), the
# size after EXIF rotation, format, mode, and a 64-bit perceptual hash for near duplicates.
# It never raises; a bad file comes back with a `reason`.

# %%
#| export
_SYSTEM_FILES = {"thumbs.db", ".ds_store", "desktop.ini"}

def inspect_image(path:Path, max_pixels:int|None=None) -> dict:
    "Facts about one file: sha256, size, format, mode, perceptual hash; or the reason it is unusable."
    path = Path(path)
    if path.name.lower() in _SYSTEM_FILES: return {"reason": f"system file ({path.name})"}
    data = path.read_bytes()
    facts = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    try:
        img = _open_image(data, max_pixels)
        fmt, mode = img.format, img.mode
        img.load()
        upright = ImageOps.exif_transpose(img)
    except ImageError as e: return {**facts, "reason": str(e)}
    except Exception as e: return {**facts, "reason": f"corrupt or truncated image: {e}"}
    gray = to_rgb(upright).convert("L")  # transparency on white, as `load_image` does
    return {**facts, "width": upright.width, "height": upright.height, "format": fmt, "mode": mode,
            "phash": str(imagehash.phash(gray)), "reason": None}


# %%
facts = inspect_image(data_dir/"Cat"/"cat.1.jpg")
test_eq((facts["format"], facts["mode"], facts["reason"]), ("JPEG", "RGB", None))
test_eq(len(facts["phash"]), 16)
test_eq(inspect_image(data_dir/"Cat"/"Thumbs.db")["reason"], "system file (Thumbs.db)")
facts


# %% [markdown]
# `inspect_images` runs that over every file in worker processes, with a progress bar.

# %%
#| export
def _inspect_star(args): return inspect_image(*args)

def inspect_images(root:Path, # Folder the paths are relative to
                   paths:list[str], # Relative paths
                   workers:int=0, # Processes; 0: one per core
                   max_pixels:int|None=None, progress:bool=True) -> pd.DataFrame:
    "`inspect_image` over many files in parallel, one row per path, in the order given."
    workers = workers or os.cpu_count() or 1
    jobs = [(Path(root)/p, max_pixels) for p in paths]
    if workers == 1 or len(jobs) < 64:
        results = [inspect_image(*j) for j in tqdm(jobs, desc="validating", disable=not progress)]
    else:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(tqdm(pool.map(_inspect_star, jobs, chunksize=32), total=len(jobs),
                                desc="validating", disable=not progress))
    return pd.DataFrame(results, index=pd.Index(paths, name="path")).reset_index()


# %%
facts = inspect_images(data_dir, files.path.tolist(), progress=False)
facts[facts.reason.notna()][["path", "reason"]]


# %% [markdown]
# ## Duplicates
#
# Two files belong to one group when their bytes are equal (sha256) or their perceptual hashes
# differ in at most `near_duplicate_distance` bits (the same photo resized or re-encoded). Near
# pairs are found without comparing every pair: split the 64-bit hash into `d+1` blocks, and any
# two hashes within distance `d` agree on at least one whole block, so only files sharing a block
# are compared. A group is named by the smallest sha256 in it, which does not change when
# unrelated images are added.

# %%
#| export
def _find(parent:list[int], i:int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i

def _near_pairs(hashes:list[int], max_distance:int):
    "Index pairs whose 64-bit hashes differ in at most `max_distance` bits (pigeonhole blocks)."
    n_blocks = max_distance + 1
    bounds = [round(64 * k / n_blocks) for k in range(n_blocks + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        buckets: dict[int, list[int]] = {}
        mask = (1 << (hi - lo)) - 1
        for i, h in enumerate(hashes): buckets.setdefault((h >> lo) & mask, []).append(i)
        for members in buckets.values():
            for a_pos, a in enumerate(members):
                for b in members[a_pos + 1:]:
                    if bin(hashes[a] ^ hashes[b]).count("1") <= max_distance: yield a, b

def duplicate_groups(sha256s:list[str], # One per image
                     phashes:list[str], # Hex perceptual hashes, aligned with `sha256s`
                     max_distance:int=4) -> list[str]:
    "A group id per image: the first 16 hex digits of the smallest sha256 among its duplicates."
    parent = list(range(len(sha256s)))
    def union(a, b): parent[_find(parent, a)] = _find(parent, b)
    first_of: dict[str, int] = {}
    for i, s in enumerate(sha256s): union(i, first_of.setdefault(s, i))
    for a, b in _near_pairs([int(h, 16) for h in phashes], max_distance): union(a, b)
    smallest: dict[int, str] = {}
    for i, s in enumerate(sha256s):
        r = _find(parent, i)
        smallest[r] = min(smallest.get(r, s), s)
    return [smallest[_find(parent, i)][:16] for i in range(len(sha256s))]


# %%
groups = duplicate_groups(["aa", "bb", "aa", "cc"], ["0000000000000000", "00000000000000ff", "ffffffffffffffff", "0000000000000003"], max_distance=2)
test_eq(groups, ["aa", "bb", "aa", "aa"])


# %% [markdown]
# ## Splitting
#
# Each duplicate group draws a number in [0, 1) from `sha256(seed, group)`: below
# `test_fraction` it goes to test, below `test_fraction + val_fraction` to val, else train.
# Since the draw is per group and independent of the label, each class splits 80/10/10 up to
# sampling noise, every copy of a photo shares a split, and an image keeps its split however
# many others are added. (Only an image that *joins* an existing group can move it, by
# giving it a smaller sha256: the price of never leaking a photo across splits.)

# %%
#| export
def split_of(group:str, seed:int=42, val_fraction:float=0.1, test_fraction:float=0.1) -> str:
    "The split of a duplicate group: a seeded hash draw, stable whatever else is in the dataset."
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
    if draw < test_fraction: return "test"
    if draw < test_fraction + val_fraction: return "val"
    return "train"


# %%
splits = pd.Series([split_of(f"{i:016x}") for i in range(20_000)]).value_counts(normalize=True)
test_close(splits["train"], 0.8, eps=0.01); test_close(splits["test"], 0.1, eps=0.01)
test_eq(split_of("abc", seed=1), split_of("abc", seed=1))

# %% [markdown]
# ## The manifest
#
# `build_manifest` joins the three steps. It returns the manifest (one row per usable image,
# sorted by path) and the skipped report (one row per unused file, with its reason).

# %%
#| export
MANIFEST_COLUMNS = ["path", "label", "split", "origin", "sha256", "group", "width", "height", "format", "mode", "bytes", "phash"]

def feedback_files(feedback_dir:Path) -> pd.DataFrame:
    "The corrected photos of a feedback store: absolute path, label (cat, dog or neither) and origin, one row per photo (its last correction)."
    if not (Path(feedback_dir)/"feedback.db").exists(): raise ValueError(f"no feedback store at {feedback_dir} (it has no feedback.db)")
    store = FeedbackStore(Settings(feedback_dir=feedback_dir))
    try: corrections = {c["sha256"]: c for c in store.corrections()}  # oldest first: the last correction of a photo wins
    finally: store.close()
    return pd.DataFrame({"path": [str(c["path"].resolve()) for c in corrections.values()],
                         "label": [c["label"] for c in corrections.values()], "origin": "feedback"}, columns=["path", "label", "origin"])

def build_manifest(root:Path, settings:Settings|None=None, progress:bool=True) -> tuple[pd.DataFrame, pd.DataFrame]:
    "Validate, group and split every image under `root`, and the corrections of `feedback_dir` when set: `(manifest, skipped)`."
    settings = settings or Settings()
    files = find_images(root, CLASS_NAMES).assign(origin="dataset")
    skipped = [(p, "no class folder or class name in the file name") for p in files.path[files.label.isna()]]
    files = files[files.label.notna()]
    if files.empty: raise ValueError(f"no file under {root} is in a class folder ({', '.join(CLASS_NAMES)}) "
                                     f"or has a Kaggle-style name such as {CLASS_NAMES[0]}.1.jpg")
    if settings.feedback_dir is not None: files = pd.concat([files, feedback_files(settings.feedback_dir)], ignore_index=True)
    facts = inspect_images(root, files.path.tolist(), settings.num_workers, settings.max_image_pixels, progress)  # absolute paths stay
    facts["label"], facts["origin"] = files.label.values, files.origin.values
    bad = facts.reason.notna()
    skipped += list(zip(facts.path[bad], facts.reason[bad]))
    good = facts[~bad].copy()
    good["group"] = duplicate_groups(good.sha256.tolist(), good.phash.tolist(), settings.near_duplicate_distance)
    labels_per_group = good.groupby("group").label.nunique()
    conflicted = good.group.isin(labels_per_group.index[labels_per_group > 1])
    for path, group in zip(good.path[conflicted], good.group[conflicted]):
        skipped.append((path, f"duplicate group {group} has conflicting labels"))
    good = good[~conflicted].copy()
    # a group draws its split by its dataset photos when it has any, so feedback never moves a dataset photo to another split
    anchors = good[good.origin == "dataset"].groupby("group").sha256.min().str[:16]
    good["split"] = [split_of(anchors.get(g, g), settings.seed, settings.val_fraction, settings.test_fraction) for g in good.group]
    good[["width", "height", "bytes"]] = good[["width", "height", "bytes"]].astype(int)
    manifest = good[MANIFEST_COLUMNS].sort_values("path").reset_index(drop=True)
    skipped = pd.DataFrame(sorted(skipped), columns=["path", "reason"])
    return manifest, skipped


# %%
manifest, skipped = build_manifest(data_dir, progress=False)
test_eq(manifest.groupby("sha256").split.nunique().max(), 1)
test_eq(manifest.groupby("group").split.nunique().max(), 1)
test_eq(set(manifest.path) & set(skipped.path), set())
skipped

# %%
pd.crosstab(manifest.label, manifest.split, margins=True)


# %% [markdown]
# `write_prepared` saves both tables as CSV with fixed formatting, so the same input gives a
# byte-identical manifest, and `dataset.json` beside them with the version (the manifest's
# sha256), the data root and the counts.

# %%
#| export
@dataclass
class PreparedData:
    "A prepared dataset: the manifest, the folder its paths are relative to, and its version."
    manifest: pd.DataFrame
    root: Path
    version: str

    def split(self, name:str, # `train`, `val` or `test`
              labels:tuple[str, ...]=CLASS_NAMES) -> pd.DataFrame: # (NEITHER,): the photos of neither that feedback brought
        "The manifest rows of one split with one of `labels` (by default the cats and dogs)."
        return self.manifest[(self.manifest.split == name) & self.manifest.label.isin(labels)].reset_index(drop=True)

    def feedback_counts(self) -> dict[str, int]:
        "How many photos came from feedback, in all and by label (`feedback_photos`, `feedback_cat`, ...)."
        feedback = self.manifest[self.manifest.origin == "feedback"]
        return {"feedback_photos": len(feedback), **{f"feedback_{label}": int((feedback.label == label).sum()) for label in (*CLASS_NAMES, NEITHER)}}

def write_prepared(out:Path, manifest:pd.DataFrame, skipped:pd.DataFrame, root:Path) -> PreparedData:
    "Write `manifest.csv`, `skipped.csv` and `dataset.json` to `out`; returns the `PreparedData`."
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    manifest_bytes = manifest.to_csv(index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL).encode()
    (out/"manifest.csv").write_bytes(manifest_bytes)
    (out/"skipped.csv").write_bytes(skipped.to_csv(index=False, lineterminator="\n").encode())
    version = hashlib.sha256(manifest_bytes).hexdigest()
    counts = {s: {c: int(n) for c, n in g.label.value_counts().sort_index().items()} for s, g in manifest.groupby("split")}
    prepared = PreparedData(manifest, Path(root).resolve(), version)
    info = {"version": version, "root": str(Path(root).resolve()), "n_images": len(manifest),
            "n_skipped": len(skipped), "counts": counts, **prepared.feedback_counts()}
    (out/"dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return prepared

def load_prepared(out:Path, root:Path|None=None) -> PreparedData:
    "Read what `write_prepared` wrote; `root` overrides the recorded data folder."
    out = Path(out)
    info = json.loads((out/"dataset.json").read_text())
    manifest = pd.read_csv(out/"manifest.csv", dtype={"phash": str, "group": str, "sha256": str})
    if "origin" not in manifest: manifest.insert(3, "origin", "dataset")  # written before feedback existed
    return PreparedData(manifest, Path(root or info["root"]), info["version"])


# %%
with tempfile.TemporaryDirectory() as tmp:
    prepared = write_prepared(tmp, manifest, skipped, data_dir)
    first = (Path(tmp)/"manifest.csv").read_bytes()
    write_prepared(tmp, *build_manifest(data_dir, progress=False), data_dir)
    test_eq((Path(tmp)/"manifest.csv").read_bytes(), first)
    test_eq(load_prepared(tmp).version, prepared.version)
test_eq(isinstance(prepared, PreparedData), True)
prepared.version, len(prepared.split("train")), len(prepared.split("val")), len(prepared.split("test"))


# %% [markdown]
# ## Downloading PetImages
#
# With no `data_dir`, preparation downloads the Microsoft PetImages zip (the source of the
# Kaggle and TFDS `cats_vs_dogs` sets) into the cache once. An interrupted download resumes
# from its `.part` file with an HTTP range request; the size is checked against the server's
# and the sha256 against `dataset_sha256` when set, and recorded beside the zip either way.
# A `.part` file that is already complete (the process stopped before the rename) gets HTTP 416
# for its range; the full size in the answer's `Content-Range` tells complete from stale:

# %%
#| export
def _sha256_file(path:Path, chunk:int=1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk): digest.update(block)
    return digest.hexdigest()

def _range_total(content_range:str|None) -> int|None:
    "The full size in a `Content-Range` header (`bytes */1234` or `bytes 0-9/1234`), if given."
    m = re.fullmatch(r"bytes [^/]+/(\d+)", (content_range or "").strip())
    return int(m[1]) if m else None

def download(url:str, # http(s) URL
             dest:Path, # Final file path
             sha256:str|None=None, # Expected digest, if known
             timeout:float=60, progress:bool=True) -> Path:
    "Download `url` to `dest` once, resuming a partial download, checking size and sha256."
    dest = Path(dest)
    if dest.exists() and (sha256 is None or _sha256_file(dest) == sha256): return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if have and response.status != 206: have = 0  # server ignored the range: start again
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                desc=f"downloading {dest.name}", disable=not progress) as bar:
                while block := response.read(1 << 20):
                    f.write(block); bar.update(len(block))
    except urllib.error.HTTPError as e:
        if not (have and e.code == 416): raise
        # nothing after byte `have`: the partial file is complete (checked below), or longer than the file: start again
        total = _range_total(e.headers.get("Content-Range")); e.close()
        if total != have:
            part.unlink()
            return download(url, dest, sha256, timeout, progress)
    size = part.stat().st_size
    if total is not None and size != total:
        raise IOError(f"download of {url} stopped at {size:,} of {total:,} bytes; run again to resume")
    digest = _sha256_file(part)
    if sha256 and digest != sha256:
        part.unlink()
        raise IOError(f"sha256 of {url} is {digest}, expected {sha256}; the partial file was removed")
    part.rename(dest)
    dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")
    return dest

def extract_zip(archive:Path, dest:Path) -> Path:
    "Extract `archive` into `dest` once (a marker file records completion); returns `dest`."
    dest = Path(dest); marker = dest/".extracted"
    if marker.exists(): return dest
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            target = (dest/member.filename).resolve()
            if not target.is_relative_to(dest.resolve()): raise IOError(f"unsafe path in archive: {member.filename}")
        zf.extractall(dest)
    marker.write_text(archive.name + "\n")
    return dest

def resolve_data_dir(settings:Settings, progress:bool=True) -> Path:
    "`settings.data_dir` if set, else the PetImages folder from the (cached) download."
    if settings.data_dir is not None:
        if not Path(settings.data_dir).is_dir(): raise FileNotFoundError(f"--data-dir {settings.data_dir} is not a folder")
        return Path(settings.data_dir)
    name = settings.dataset_url.rstrip("/").rsplit("/", 1)[-1] or "dataset.zip"
    archive = download(settings.dataset_url, settings.cache_dir/name, settings.dataset_sha256, progress=progress)
    extracted = extract_zip(archive, settings.cache_dir/Path(name).stem)
    return extracted/"PetImages" if (extracted/"PetImages").is_dir() else extracted


# %% [markdown]
# The download is exercised against a local HTTP server in `tests/test_data.py` (this
# notebook runs offline). The sizes it reads from a range answer:

# %%
test_eq(_range_total("bytes */1234"), 1234)
test_eq(_range_total("bytes 1000-1233/1234"), 1234)
test_eq(_range_total("bytes 0-9/*"), None)

# %% [markdown]
# With a `data_dir`, nothing is downloaded:

# %%
test_eq(resolve_data_dir(Settings(data_dir=data_dir)), data_dir)

# %% [markdown]
# `extract_zip` extracts once and refuses archives whose names would land outside the folder:

# %%
with tempfile.TemporaryDirectory() as tmp:
    with zipfile.ZipFile(Path(tmp)/"pets.zip", "w") as zf: zf.writestr("PetImages/Cat/0.jpg", (data_dir/"Cat"/"cat.1.jpg").read_bytes())
    extracted = sorted(p.relative_to(tmp).as_posix() for p in extract_zip(Path(tmp)/"pets.zip", Path(tmp)/"out").rglob("*"))
    with zipfile.ZipFile(Path(tmp)/"evil.zip", "w") as zf: zf.writestr("../evil.txt", "x")
    test_fail(lambda: extract_zip(Path(tmp)/"evil.zip", Path(tmp)/"evil"), contains="unsafe path")
extracted


# %% [markdown]
# ## `catsdogs_prepare`

# %%
#| export
def prepare(settings:Settings|None=None, out:Path|None=None, progress:bool=True) -> PreparedData:
    "Find or download the data, validate, deduplicate and split it, and write it to `out`."
    settings = settings or Settings()
    root = resolve_data_dir(settings, progress)
    manifest, skipped = build_manifest(root, settings, progress)
    if manifest.empty: raise ValueError(f"no usable images under {root}")
    return write_prepared(out or settings.prepared_dir, manifest, skipped, root)

def prepare_cli(argv:list[str]|None=None):
    "Console script `catsdogs_prepare`: write manifest.csv, skipped.csv and dataset.json."
    parser = settings_parser("Validate, deduplicate and split the cats-vs-dogs images (and the corrections of a feedback store) "
                             "into a versioned manifest.", [DataSettings, "feedback_dir"], aliases={"--out": "prepared_dir"})
    settings, _ = parse_settings(parser, argv)
    out = settings.prepared_dir
    try: prepared = prepare(settings, out, progress=sys.stderr.isatty())  # progress bars on a terminal, not in logs
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:  # no network, refused, or an HTTP error status
        reason = getattr(e, "reason", None) or e
        parser.exit(2, f"catsdogs_prepare: cannot download {settings.dataset_url}: {reason}. Without a network, "
                       "pass --data-dir DIR: a folder of photos with one subfolder per class (Cat/, Dog/)\n")
    except ValueError as e: parser.exit(2, f"catsdogs_prepare: {e}\n")  # no usable image, no feedback store
    skipped = pd.read_csv(Path(out)/"skipped.csv")
    print(f"{len(prepared.manifest)} images, {len(skipped)} skipped -> {out}/manifest.csv (version {prepared.version[:12]})")
    print(pd.crosstab(prepared.manifest.label, prepared.manifest.split, margins=True).to_string())
    if settings.feedback_dir is not None:
        print("from feedback: " + ", ".join(f"{n} {k.removeprefix('feedback_')}" for k, n in prepared.feedback_counts().items()))
    if len(skipped): print("skipped:\n" + skipped.reason.str.replace(r"[:(].*", "", regex=True).value_counts().to_string())


# %%
with tempfile.TemporaryDirectory() as tmp:
    prepared = prepare(Settings(data_dir=data_dir), Path(tmp), progress=False)
    test_eq(sorted(p.name for p in Path(tmp).iterdir()), ["dataset.json", "manifest.csv", "skipped.csv"])
prepared.version

# %%
with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
    prepare_cli(["--data-dir", str(data_dir), "--out", "prepared"])

# %% [markdown]
# Without a network (here: a port on this machine where nothing listens), the first run that
# needs the download stops with one line that names the URL, the reason and the way out:

# %%
with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()) as stderr:
    try: prepare_cli(["--dataset-url", "http://127.0.0.1:9/kagglecatsanddogs.zip", "--cache-dir", tmp, "--out", tmp])
    except SystemExit as e: test_eq(e.code, 2)
    else: raise AssertionError("prepare_cli should stop without the download")
message = stderr.getvalue()
assert "cannot download http://127.0.0.1:9/kagglecatsanddogs.zip: [Errno 111] Connection refused" in message and "--data-dir" in message
print(message)

# %% [markdown]
# ### Corrections as a new dataset version
#
# The service's feedback store (or its export, `GET /admin/feedback.tar`, unpacked) is the
# `--feedback-dir` of `catsdogs_prepare`. Each corrected photo joins the manifest with
# `origin` `feedback`, its path absolute (inside the store) and its label the one a person
# gave, the last one where a photo was corrected twice. It is then validated, grouped and split
# like any other photo, so a corrected near-duplicate of a test photo lands in test beside its
# twin, never in train, and one whose label contradicts its twin's drops the group (in
# `skipped.csv`). A group draws its split by its dataset photos when it has any, so feedback
# never moves a dataset photo to another split. "neither" photos stay in the manifest with that label: `PreparedData.split`
# leaves them out of the cats and dogs unless asked (`labels=("neither",)`), and training
# measures the open-set head on them. The dataset version (the manifest's sha256) changes
# with every correction, and `dataset.json` counts what feedback brought.
#
# Here the loop on real photos of the sample: a user sends a smaller copy of a test-split dog
# photo that the service called a cat, one of a cat it called a dog, and a photo of neither
# (a noise image stands in where the outlier photos are absent):

# %%
test_dog = manifest[(manifest.split == "test") & (manifest.label == "dog")].path.iloc[0]
smaller = io.BytesIO(); Image.open(data_dir/test_dog).convert("RGB").reduce(2).save(smaller, format="JPEG", quality=80)
train_cat = manifest[(manifest.split == "train") & (manifest.label == "cat")].path.iloc[0]
outliers = shared_sample("not-cats-dogs")
noise = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(noise, format="JPEG")
other = sorted(outliers.rglob("*.jpg"))[0].read_bytes() if outliers else noise.getvalue()
feedback_dir = Path(tempfile.mkdtemp())/"feedback"
store = FeedbackStore(FeedbackSettings(feedback_dir=feedback_dir))
said = {"confidence": 0.6, "probabilities": {"cat": 0.6, "dog": 0.4}, "p_dog": 0.4, "p_cat_or_dog": 0.9}
store.correct("a1", Answered(smaller.getvalue(), {**said, "label": "cat"}, "3f2c9a1b7d4e"), "dog")
store.correct("a2", Answered((data_dir/train_cat).read_bytes(), {**said, "label": "dog"}, "3f2c9a1b7d4e"), "cat")
store.correct("a3", Answered(other, {**said, "label": "cat"}, "3f2c9a1b7d4e"), "neither")
store.close()
with tempfile.TemporaryDirectory() as tmp:
    merged = prepare(Settings(data_dir=data_dir, feedback_dir=feedback_dir), Path(tmp), progress=False)
    counts = json.loads((Path(tmp)/"dataset.json").read_text())
from_feedback = merged.manifest[merged.manifest.origin == "feedback"]
test_eq(sorted(feedback_files(feedback_dir).label), ["cat", "dog", "neither"])
twin_split = lambda path: merged.manifest[merged.manifest.group == from_feedback[from_feedback.path == path].group.iloc[0]].split.unique().tolist()
test_eq(twin_split(from_feedback[from_feedback.label == "dog"].path.iloc[0]), ["test"])  # beside its twin, not in train
test_eq(len(merged.split("test", labels=("neither",))) + len(merged.split("val", labels=("neither",))) + len(merged.split("train", labels=("neither",))), 1)
test_eq(merged.version != prepared.version, True)
before = manifest.set_index("path").split
test_eq((merged.manifest[merged.manifest.origin == "dataset"].set_index("path").split == before.reindex(merged.manifest[merged.manifest.origin == "dataset"].path)).all(), True)
from_feedback[["label", "split", "origin", "width", "height"]], {k: v for k, v in counts.items() if k.startswith("feedback")}


# %% [markdown]
# ## Training input: resized photos, a pixel cache, and augmentation on the device
#
# Training reads every photo once per epoch, and its input pipeline must keep up with the
# model step: on one large GPU that is thousands of photos a second. The work per photo is
# split where it is cheapest:
#
# 1. **Once per set of photos**: `build_pixel_cache` decodes every photo of the manifest
#    (JPEGs in draft mode) and resizes it with the model's `Preset.resize`, in parallel, into
#    one uncompressed file of uint8 pixels. Epochs then read pixels instead of decoding JPEGs.
#    The cache lives under `cache_dir`, keyed by the dataset's photos (their paths and
#    contents) and the resize size, so every run on the same photos shares it, whatever their
#    split; it takes about 415 KB a photo at 288 px.
# 2. **Per photo, in the loader**: `ImageDataset` reads the resized photo (from the cache, or
#    by decoding it when there is none) and crops it: at random with torchvision's
#    `RandomResizedCrop` for training (`Preset.train_crop`), in the centre for evaluation. The
#    loader collates uint8 batches, a quarter of the bytes of float32 ones.
# 3. **Per batch, on the training device**: `BatchAugment` applies the rest of the
#    augmentation (flip, rotation, colour jitter, normalisation, random erasing) to the whole
#    batch at once, each image with its own random draws; for evaluation `batch_normalize`
#    only normalises. `DeviceLoader` moves each batch to the device and applies them there.
#
# For evaluation, the crop of a resized photo is the very crop `Preset.eval_array` makes, so
# the validation and test figures of training are those of the served model.

# %% [markdown]
# The worker processes that build the pixel cache and load training batches start from a
# forkserver, never by forking this process: after inference or an earlier training run in the
# same Python, it holds OpenMP/TBB thread pools that a forked child would inherit in an undefined
# state. The forkserver imports this module (and so PyTorch) once, before any thread pool
# exists; each worker is a fork of it, ready in a fraction of a second instead of the seconds a
# fresh import of PyTorch takes.

# %%
#| export
def worker_context() -> multiprocessing.context.BaseContext:
    "The start method for worker processes: a forkserver that has imported `catsdogs.data` (spawn where there is no forkserver)."
    if "forkserver" not in multiprocessing.get_all_start_methods(): return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["catsdogs.data"])  # takes effect when the forkserver starts, on the first worker
    return context


# %%
context, starts = worker_context(), []
for _ in range(2):
    started = time.perf_counter()
    test_eq(len(list(DataLoader(range(4), batch_size=2, num_workers=1, multiprocessing_context=context))), 2)
    starts.append(time.perf_counter() - started)
context.get_start_method(), [f"{s:.2f} s" for s in starts]  # the first start includes the forkserver's own

# %%
#| export
PIXEL_CACHE_FORMAT = 1  # part of the cache's key: a change to how photos are resized or stored starts a new cache

def _resized_pixels(job:tuple[Path, Preset]) -> np.ndarray:
    "One photo decoded and resized by `preset.resize`, as `(H, W, 3)` uint8 (a worker's job)."
    path, preset = job
    return np.asarray(preset.resize(preset.load(path)))

def pixel_cache_folder(cache_dir:Path, prepared:PreparedData, preset:Preset) -> Path:
    "Where the pixel cache of `prepared`'s photos for `preset` lives under `cache_dir`: keyed by the photos' paths and contents, so another split of the same photos shares it."
    photos = hashlib.sha256("".join(f"{p}\t{h}\n" for p, h in zip(prepared.manifest.path, prepared.manifest.sha256)).encode())
    return Path(cache_dir)/"pixels"/f"{photos.hexdigest()[:16]}-{preset.resize_size}px-v{PIXEL_CACHE_FORMAT}"

def _process_alive(pid:int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except PermissionError: pass  # someone else's process
    return True

def build_pixel_cache(prepared:PreparedData, preset:Preset, cache_dir:Path, workers:int=0, # Processes; 0: one per core
                      progress:bool=True) -> Path:
    "Decode and resize every photo of `prepared` once, into `pixels.u8` and `index.json` in its cache folder; returns the folder (built only if missing)."
    folder = pixel_cache_folder(cache_dir, prepared, preset)
    if (folder/"index.json").exists(): return folder
    for unfinished in folder.parent.glob(f"{folder.name}.building-*"):  # left by a build that was killed
        if not _process_alive(int(unfinished.name.rsplit("-", 1)[1])): shutil.rmtree(unfinished, ignore_errors=True)
    building = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True); building.mkdir(parents=True)
    paths = prepared.manifest.path.tolist()
    jobs = [(prepared.root/p, preset) for p in paths]
    workers = workers or os.cpu_count() or 1
    offsets, shapes, offset = [], [], 0
    context = worker_context()
    try:
        with open(building/"pixels.u8", "wb") as out, contextlib.ExitStack() as stack:
            if workers > 1 and len(jobs) >= 64:
                results = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context)).map(_resized_pixels, jobs, chunksize=16)
            else: results = map(_resized_pixels, jobs)
            for pixels in tqdm(results, total=len(jobs), desc="pixel cache", disable=not progress):
                out.write(pixels.tobytes())
                offsets.append(offset); shapes.append(pixels.shape[:2]); offset += pixels.nbytes
    except BaseException:  # a photo gone since preparation, or an interrupt: no half-built cache stays behind
        shutil.rmtree(building, ignore_errors=True)
        raise
    index = {"version": prepared.version, "resize_size": preset.resize_size, "paths": paths, "offsets": offsets, "shapes": shapes}
    (building/"index.json").write_text(json.dumps(index))
    try: building.rename(folder)
    except OSError: shutil.rmtree(building)  # another process finished the same cache first
    return folder


# %%
#| export
class ResizedPhotos:
    "The photos of a prepared dataset resized by `preset.resize`, as `(H, W, 3)` uint8 arrays by relative path: from a pixel cache folder when given, else decoded from `root`."
    def __init__(self, root:Path, preset:Preset, cache:Path|None=None):
        self.root, self.preset, self.cache = Path(root), preset, cache
        self._index, self._pixels = None, None

    def __getstate__(self): return {**self.__dict__, "_index": None, "_pixels": None}  # each worker maps the file itself

    def __getitem__(self, rel_path:str) -> np.ndarray:
        if self.cache is None: return np.array(self.preset.resize(self.preset.load(self.root/rel_path)))
        if self._index is None:
            index = json.loads((self.cache/"index.json").read_text())
            self._index = {p: (o, h, w) for p, o, (h, w) in zip(index["paths"], index["offsets"], index["shapes"])}
            self._pixels = np.memmap(self.cache/"pixels.u8", np.uint8, "c")  # copy-on-write: writable, never written back
        offset, h, w = self._index[rel_path]
        return self._pixels[offset:offset + h * w * 3].reshape(h, w, 3)


# %% [markdown]
# The cache of the prepared sample at a small input size (96 px, so 110 px on the shorter
# side), and one photo read back from it, the same pixels decoding gives. (Here in one
# process: worker processes import the function they run from the `catsdogs` package, and
# this notebook's own definitions live in its kernel.)

# %%
small_preset = Preset(image_size=96, crop_fraction=0.875)
cache_dir = Path(tempfile.mkdtemp())
folder = build_pixel_cache(prepared, small_preset, cache_dir, workers=1, progress=False)
test_eq(build_pixel_cache(prepared, small_preset, cache_dir, progress=False), folder)  # built once
test_eq(folder, pixel_cache_folder(cache_dir, prepared, small_preset))
cached, decoded = ResizedPhotos(prepared.root, small_preset, folder), ResizedPhotos(prepared.root, small_preset)
first = prepared.manifest.path[0]
test_eq(cached[first], decoded[first])
test_eq(min(cached[first].shape[:2]), small_preset.resize_size)
folder.relative_to(cache_dir), f"{(folder/'pixels.u8').stat().st_size / 2**20:.0f} MB for {len(prepared.manifest)} photos"


# %%
#| export
class ImageDataset(torch.utils.data.Dataset):
    "Rows of a manifest as `(uint8 tensor (3, image_size, image_size), class index)` (-1 for neither): each photo resized, then cropped at random (`train`) or in the centre."
    def __init__(self, rows:pd.DataFrame, photos:ResizedPhotos, train:bool=False):
        self.rel_paths, self.photos, self.train = rows.path.tolist(), photos, train
        self.paths = [photos.root/p for p in self.rel_paths]
        self.targets = [CLASS_NAMES.index(label) if label in CLASS_NAMES else -1 for label in rows.label]  # -1: neither
        self.crop = photos.preset.train_crop() if train else None

    def __len__(self): return len(self.paths)

    def __getitem__(self, i):
        pixels = self.photos[self.rel_paths[i]]
        if self.train: x = self.crop(torch.from_numpy(pixels).permute(2, 0, 1))
        else: x = torch.from_numpy(np.ascontiguousarray(self.photos.preset.centre_crop(pixels))).permute(2, 0, 1)
        return x.contiguous(), self.targets[i]


# %% [markdown]
# An evaluation item is the centre crop that the eval path makes, still in uint8; a training
# item is a random crop of the same size:

# %%
rows = prepared.split("train").head(4)
x, y = ImageDataset(rows, cached)[0]
eval_crop = small_preset.eval_crop(small_preset.load(prepared.root/rows.path[0]))
test_eq(x.permute(1, 2, 0).numpy(), np.asarray(eval_crop))
test_eq(y, CLASS_NAMES.index(rows.label[0]))
x_train, _ = ImageDataset(rows, cached, train=True)[0]
test_eq((x.dtype, tuple(x.shape), tuple(x_train.shape)), (torch.uint8, (3, 96, 96), (3, 96, 96)))
len(ImageDataset(prepared.split("train"), cached))

# %% [markdown]
# ### Augmenting a batch on its device
#
# torchvision's `transforms.v2` draw one set of random parameters per call, so on a batch
# every image would get the same flip, angle and colours. `BatchAugment` draws them per image
# and applies each step to the whole batch in a few tensor operations, on whatever device the
# batch is on:
#
# - **flip and rotation** (up to 10° either way, nearest pixel, black corners, as torchvision's
#   `RandomRotation`) are one affine sampling grid per image and one `grid_sample` call;
# - **colour jitter** (brightness, contrast and saturation by up to 20%, hue by up to 0.02 of
#   a turn, in a random order per image, as torchvision's `ColorJitter`) is one 3x3 colour
#   matrix and offset per image, applied with one `einsum` and clamped to [0, 1] once, as NVIDIA
#   DALI's colour twist does. Brightness, contrast and saturation are torchvision's to rounding.
#   Hue turns the colours about the grey axis in YIQ space, where torchvision shifts the hue in
#   HSV: a linear change of the same size and sense, though not the same pixel for pixel;
# - **normalisation** is torchvision's `Normalize`;
# - **random erasing** (a quarter of the images get a rectangle of 2-15% of their area, of
#   aspect 0.3 to 3.3, set to 0, the mean colour, as torchvision's `RandomErasing`) is one mask.

# %%
#| export
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights, also the Y row of YIQ
_RGB_TO_YIQ = ((0.2989, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))

class BatchAugment(torch.nn.Module):
    "Training augmentation of a batch of cropped uint8 images `(N, 3, S, S)` on their device, each image with its own draws; returns normalised float32."
    def __init__(self, preset:Preset, degrees:float=10.0, brightness:float=0.2, contrast:float=0.2, saturation:float=0.2,
                 hue:float=0.02, erase_p:float=0.25, erase_scale:tuple=(0.02, 0.15), erase_ratio:tuple=(0.3, 3.3)):
        super().__init__()
        from torchvision.transforms import v2 as T
        self.degrees, self.jitter, self.hue = degrees, (brightness, contrast, saturation), hue
        self.erase_p, self.erase_scale, self.erase_ratio = erase_p, erase_scale, erase_ratio
        self.to_float, self.normalize = T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std)

    def forward(self, x:torch.Tensor) -> torch.Tensor:
        return self.erase(self.normalize(self.colour(self.flip_and_rotate(self.to_float(x)))))

    def flip_and_rotate(self, x:torch.Tensor) -> torch.Tensor:
        "Mirror each image with probability 1/2 and turn it by up to `degrees` either way, in one `grid_sample`."
        n, device = len(x), x.device
        angle = torch.deg2rad(torch.empty(n, device=device).uniform_(-self.degrees, self.degrees))
        mirror = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(n, device=device)
        theta = torch.stack([torch.stack([mirror * cos, -mirror * sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def colour(self, x:torch.Tensor) -> torch.Tensor:
        "Brightness, contrast, saturation and hue, in a random order per image, as one colour matrix and offset per image."
        n, device = len(x), x.device
        eye, grey = torch.eye(3, device=device), torch.tensor(_GREY, device=device)
        b, c, s = (1 + (2 * torch.rand(n, 3, device=device) - 1) * torch.tensor(self.jitter, device=device)).unbind(1)
        turn = 2 * torch.pi * self.hue * (2 * torch.rand(n, device=device) - 1)
        yiq = torch.tensor(_RGB_TO_YIQ, device=device)
        rotation = eye.repeat(n, 1, 1)
        rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = turn.cos(), turn.sin(), -turn.sin(), turn.cos()
        hue = torch.linalg.inv(yiq) @ rotation @ yiq
        saturation = s[:, None, None] * eye + (1 - s)[:, None, None] * grey.expand(3, 3)  # blend with the grey image
        matrix, offset, channel_mean = eye.repeat(n, 1, 1), torch.zeros(n, 3, device=device), x.mean((2, 3))
        for step in torch.rand(n, 4, device=device).argsort(1).T:  # each image's k-th operation
            mean_grey = ((matrix @ channel_mean[:, :, None])[:, :, 0] + offset) @ grey  # of the image so far, for contrast
            candidates = [(b[:, None, None] * matrix, b[:, None] * offset),
                          (c[:, None, None] * matrix, c[:, None] * offset + ((1 - c) * mean_grey)[:, None]),
                          (saturation @ matrix, (saturation @ offset[:, :, None])[:, :, 0]),
                          (hue @ matrix, (hue @ offset[:, :, None])[:, :, 0])]
            matrix = sum(torch.where((step == k)[:, None, None], m, 0) for k, (m, _) in enumerate(candidates))
            offset = sum(torch.where((step == k)[:, None], o, 0) for k, (_, o) in enumerate(candidates))
        return (torch.einsum("nij,njhw->nihw", matrix, x) + offset[:, :, None, None]).clamp_(0, 1)

    def erase(self, x:torch.Tensor) -> torch.Tensor:
        "Set a random rectangle to 0 in each image chosen with probability `erase_p`."
        n, _, h, w = x.shape
        device = x.device
        area = torch.empty(n, device=device).uniform_(*self.erase_scale) * h * w
        ratio = torch.empty(n, device=device).uniform_(math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1])).exp()
        eh, ew = (area * ratio).sqrt().round().clamp(1, h - 1), (area / ratio).sqrt().round().clamp(1, w - 1)
        top, left = (torch.rand(n, device=device) * (h - eh + 1)).floor(), (torch.rand(n, device=device) * (w - ew + 1)).floor()
        rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
        inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
        inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
        chosen = torch.rand(n, device=device) < self.erase_p
        mask = (inside_rows[:, :, None] & inside_cols[:, None, :] & chosen[:, None, None])[:, None]
        return x.masked_fill(mask, 0.0)

def batch_normalize(preset:Preset) -> torch.nn.Module:
    "The evaluation counterpart of `BatchAugment`: uint8 batches to float32 normalised by `preset`, with torchvision `transforms.v2`."
    from torchvision.transforms import v2 as T
    return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std)])


# %% [markdown]
# Normalising a batch of eval crops gives `eval_array` to float32 rounding, and every image of an
# augmented batch gets its own draws:

# %%
x_eval = batch_normalize(small_preset)(x[None])
test_close(x_eval[0].numpy(), small_preset.eval_array(small_preset.load(prepared.root/rows.path[0])), eps=1e-5)
torch.manual_seed(0)
same_photo = x.expand(8, -1, -1, -1)
augmented = BatchAugment(small_preset)(same_photo)
test_eq((augmented.dtype, tuple(augmented.shape)), (torch.float32, (8, 3, 96, 96)))
assert len({round(float(a.mean()), 4) for a in augmented}) == 8, "eight copies, eight different results"
augmented.mean((1, 2, 3))

# %% [markdown]
# With every random range at zero, `BatchAugment` only normalises. With one step's range
# opened, that step does what torchvision's transform of that name does for the factor it drew
# (`tests/test_data.py` checks each); here saturation alone, against torchvision's
# `adjust_saturation` with the same draw:

# %%
neutral = BatchAugment(small_preset, degrees=0, brightness=0, contrast=0, saturation=0, hue=0, erase_p=0)
test_close(neutral(x[None]), x_eval, eps=1e-6)
only_saturation = BatchAugment(small_preset, degrees=0, brightness=0, contrast=0, saturation=0.5, hue=0, erase_p=0)
torch.manual_seed(1)
out = only_saturation.colour(x[None].float() / 255)
torch.manual_seed(1)
factor = 1 + (2 * torch.rand(1, 3) - 1)[0, 2].item() * 0.5  # the same draw
test_close(out, TF.adjust_saturation(x[None].float() / 255, factor), eps=1e-5)
round(factor, 3)


# %% [markdown]
# `DeviceLoader` wraps a `DataLoader` of such items: each batch goes to the device
# (asynchronously from pinned memory on CUDA), through the batch transform there, and into
# channels-last memory order, which convolutions on GPUs and on CPUs with oneDNN prefer.

# %%
#| export
class DeviceLoader:
    "The batches of a `DataLoader` of uint8 images on `device`, put through `transform` there (`BatchAugment` or `batch_normalize`), channels-last."
    def __init__(self, loader:torch.utils.data.DataLoader, device:torch.device, transform:torch.nn.Module):
        self.loader, self.device, self.transform = loader, torch.device(device), transform.to(device)

    @property
    def dataset(self): return self.loader.dataset

    def __len__(self): return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            with torch.no_grad(): x = self.transform(x.to(self.device, non_blocking=True))
            yield x.contiguous(memory_format=torch.channels_last), y.to(self.device, non_blocking=True)


# %%
loader = DeviceLoader(torch.utils.data.DataLoader(ImageDataset(rows, cached, train=True), batch_size=4), "cpu",
                      BatchAugment(small_preset))
x_batch, y_batch = next(iter(loader))
test_eq((tuple(x_batch.shape), x_batch.dtype, x_batch.is_contiguous(memory_format=torch.channels_last)),
        ((4, 3, 96, 96), torch.float32, True))
y_batch
