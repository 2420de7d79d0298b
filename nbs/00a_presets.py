# %%
#| default_exp presets

# %% [markdown]
# # Presets
#
# > Bytes in, model input out: image decoding, the eval and training preprocessing of a model, and sample images; serving needs nothing here but Pillow and NumPy.

# %% [markdown]
# This is the one place that turns a file into what the model sees (as torchvision's
# reference scripts keep theirs in `presets.py`). Everything downstream builds its
# preprocessing from a model's `ModelConfig` with one constructor, `Preset.from_config`:
# training for its data loaders, `catsdogs_eval`, the predictor that serves, the benchmarks and
# the tests. Nothing here reads the environment.
#
# The eval path is written with Pillow and NumPy only, so a serving process does not load
# PyTorch; the training augmentation uses torchvision `transforms.v2`, imported only when it
# is asked for.

# %%
#| export
from __future__ import annotations

import io
import json
import re
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import subprocess, sys
import torch  # the examples compare with torchvision; importing the module loads neither
from torchvision.transforms import v2 as T


# %% [markdown]
# ## Demo data
#
# Examples and tests run on the real sample `../shared/data/PetImages-mini` beside the
# checkout. Where it is absent, `make_demo_folder` writes a small stand-in with the same
# layout and the same kinds of odd files, so every cell still runs.

# %%
#| export
def make_demo_folder(dest:Path, # Folder to create (class subfolders go inside)
                     n_per_class:int=12, # Good JPEGs per class
                     seed:int=0) -> Path:
    "Write a small PetImages-like folder of real JPEGs plus the odd files the real download has."
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    for label, channel in (("Cat", 0), ("Dog", 2)):
        folder = dest/label; folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 120, (96 + 8*i, 128, 3), dtype=np.uint8)
            pixels[..., channel] += 120  # cats lean red, dogs blue
            Image.fromarray(pixels).save(folder/f"{label.lower()}.{i}.jpg", quality=90)
        (folder/"Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(60))
    cat = dest/"Cat"
    (cat/"empty.jpg").write_bytes(b"")
    (cat/"truncated.jpg").write_bytes((cat/"cat.0.jpg").read_bytes()[:400])
    (cat/"notes.jpg").write_text("not an image")
    Image.open(cat/"cat.1.jpg").convert("CMYK").save(cat/"cmyk.jpg")
    Image.open(cat/"cat.2.jpg").convert("L").save(cat/"gray.jpg")
    Image.open(cat/"cat.3.jpg").save(cat/"png_inside.jpg", format="PNG")
    Image.open(cat/"cat.4.jpg").convert("RGBA").save(cat/"rgba.jpg", format="PNG")
    shutil.copy(cat/"cat.5.jpg", cat/"copy_of_cat5.jpg")  # exact duplicate
    Image.open(cat/"cat.6.jpg").resize((100, 86)).save(cat/"small_cat6.jpg", quality=70)  # near duplicate
    shutil.copy(cat/"cat.7.jpg", dest/"Dog"/"mislabelled.jpg")  # same photo, other label
    return dest

def shared_sample(name:str="PetImages-mini") -> Path|None:
    "This project's shared image sample `name` (`../shared/data/<name>` beside the checkout, found from the working directory), or None."
    for base in (Path.cwd(), *Path.cwd().parents):
        sample = base/"shared"/"data"/name
        if sample.is_dir() and base.name != "shared": return sample
        if (base/"settings.ini").exists():
            sample = base.parent/"shared"/"data"/name
            return sample if sample.is_dir() else None
    return None

def demo_data_dir() -> Path:
    "The real sample beside the checkout when present, else a generated stand-in."
    return shared_sample() or make_demo_folder(Path(tempfile.mkdtemp(prefix="catsdogs-demo-")))

def sample_photos(label:str, # "cat" or "dog"
                  n:int, # How many, from the first
                  data_dir:Path|None=None) -> list[Path]: # Default: `demo_data_dir()`
    "The first `n` well-formed photos of `label` (`Cat/cat.N.jpg`, by N): what tests, examples and benchmarks pick."
    folder = Path(data_dir or demo_data_dir())/label.capitalize()
    return sorted(folder.glob(f"{label}.*.jpg"), key=lambda p: int(p.stem.split(".")[1]))[:n]


# %%
test_eq(shared_sample("no-such-sample"), None)
data_dir = demo_data_dir()
picked = sample_photos("dog", 3, data_dir)
test_eq((len(picked), all(p.name.startswith("dog.") for p in picked)), (3, True))
test_eq([int(p.stem.split(".")[1]) for p in picked], sorted(int(p.stem.split(".")[1]) for p in picked))
data_dir.name, sorted(p.name for p in data_dir.iterdir())

# %% [markdown]
# The stand-in, small, with every kind of odd file the real download has:

# %%
with tempfile.TemporaryDirectory() as tmp:
    stand_in = sorted(p.name for p in (make_demo_folder(Path(tmp), n_per_class=8)/"Cat").iterdir())
stand_in

# %% [markdown]
# ## Finding labelled images
#
# A file's label comes from the nearest folder named after a class (`Cat/`, `cats/`, any
# case), else from a Kaggle-style name (`dog.7.jpg`). Every file is listed, `Thumbs.db`
# included, so whoever lists them can account for all of them.

# %%
#| export
CLASS_NAMES = ("cat", "dog")  # the model's outputs, in order: the last one is the positive class (`p_dog`)
NEITHER = "neither"  # the answer, and the feedback label, for a photo of neither a cat nor a dog

def label_of(rel_path:Path, class_names:tuple[str, ...]) -> str|None:
    "The class a relative path names by folder (nearest first) or by Kaggle-style file name."
    for part in reversed(Path(rel_path).parts[:-1]):
        name = part.lower()
        for c in class_names:
            if name in (c, c + "s"): return c
    m = re.match(r"^([a-z]+)[._-]\d+", Path(rel_path).name.lower())
    if m and m.group(1) in class_names: return m.group(1)
    return None

def list_images(root:Path, # Folder to scan recursively
                class_names:tuple[str, ...]=CLASS_NAMES) -> list[tuple[str, str|None]]:
    "Every file under `root` as `(relative POSIX path, label or None)`, sorted by path."
    root = Path(root)
    if not root.is_dir(): raise FileNotFoundError(f"data folder not found: {root}")
    return sorted((p.relative_to(root).as_posix(), label_of(p.relative_to(root), class_names))
                  for p in root.rglob("*") if p.is_file() and "__MACOSX" not in p.parts)


# %%
files = list_images(data_dir)
test_eq({label for _, label in files} - {None}, {"cat", "dog"})
test_eq(label_of(Path("PetImages/Cat/1.jpg"), ("cat", "dog")), "cat")
test_eq(label_of(Path("train/dog.7.jpg"), ("cat", "dog")), "dog")
test_eq(label_of(Path("DOGS/x.jpg"), ("cat", "dog")), "dog")
test_eq(label_of(Path("misc/x.jpg"), ("cat", "dog")), None)
len(files), files[:3]


# %% [markdown]
# ## Loading one image
#
# `load_image` is the only way the project turns bytes into pixels: preparation, training,
# evaluation and the API all call it. It refuses decompression bombs before decoding,
# decodes JPEGs in draft mode at the smallest scale that still covers the model input (a
# large photo decodes several times faster), applies the EXIF orientation, takes the first
# frame of animations, and converts every mode (CMYK, grayscale, palette, RGBA on white) to RGB.

# %%
#| export
class ImageError(ValueError):
    "A file that cannot be used as an image; `reason` is a short machine-readable cause."
    def __init__(self, reason:str, detail:str=""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)

def _open_image(source:Path|str|bytes, max_pixels:int|None) -> Image.Image:
    "Open `source` lazily, raising `ImageError` for empty, unidentifiable or oversized input."
    if isinstance(source, (bytes, bytearray)):
        if not source: raise ImageError("empty file")
        fp = io.BytesIO(source)
    else:
        if Path(source).stat().st_size == 0: raise ImageError("empty file")
        fp = source
    try: img = Image.open(fp)
    except UnidentifiedImageError as e: raise ImageError("not an image", "unknown format") from e
    except Image.DecompressionBombError as e: raise ImageError("too many pixels", str(e)) from e
    if max_pixels and img.width * img.height > max_pixels:
        raise ImageError("too many pixels", f"{img.width}x{img.height} is over the limit of {max_pixels:,} pixels")
    return img

def to_rgb(img:Image.Image) -> Image.Image:
    "Convert any PIL mode to RGB; transparent pixels become white rather than black."
    if img.mode == "RGB": return img
    if img.mode == "P" and "transparency" in img.info: img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) / 256, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")

def load_image(source:Path|str|bytes, # A path or the file's bytes
               draft_size:int|None=None, # JPEG: decode at the smallest scale with both sides >= this
               max_pixels:int|None=None, # Refuse larger images before decoding
              ) -> Image.Image:
    "Decode an image file into an upright RGB PIL image, or raise `ImageError`; `info[\"original_size\"]` is its upright size before any draft scaling."
    try:
        img = _open_image(source, max_pixels)
        original = img.size
        if draft_size and img.format == "JPEG": img.draft("RGB", (draft_size, draft_size))
        img.load()
        upright = ImageOps.exif_transpose(img)
        if upright.size != img.size: original = original[::-1]  # turned a quarter by its EXIF orientation
        rgb = to_rgb(upright)
        rgb.info["original_size"] = original
        return rgb
    except (ImageError, FileNotFoundError): raise
    except Image.DecompressionBombError as e: raise ImageError("too many pixels", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # what PIL's many decoders raise
        raise ImageError("corrupt or truncated image", str(e)) from e


# %%
error = ImageError("not an image", "unknown format")
test_eq((error.reason, str(error), isinstance(error, ValueError)), ("not an image", "not an image: unknown format", True))
test_eq(to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)), (255, 255, 255))  # transparent: white, not black
test_eq(to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)), (255, 255, 255))

# %%
img = load_image(data_dir/"Cat"/"cat.1.jpg")
test_eq(img.mode, "RGB")
buf = io.BytesIO(); Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, format="PNG")
test_eq(load_image(buf.getvalue()).getpixel((0, 0)), (255, 255, 255))
test_fail(lambda: load_image(b""), contains="empty file")
test_fail(lambda: load_image(b"hello"), contains="not an image")
test_fail(lambda: load_image(buf.getvalue(), max_pixels=10), contains="too many pixels")
test_fail(lambda: load_image(buf.getvalue()[:20]), contains="corrupt or truncated")  # cut inside the PNG header
img.reduce(2)  # shown at half size

# %% [markdown]
# EXIF orientation is applied: a photo stored sideways with the "rotate 90°" tag comes out upright.

# %%
exif = Image.Exif(); exif[0x0112] = 6  # Orientation: rotate 90 CW on display
buf = io.BytesIO(); Image.new("RGB", (40, 20)).save(buf, format="JPEG", exif=exif)
test_eq(load_image(buf.getvalue()).size, (20, 40))
test_eq(load_image(buf.getvalue()).info["original_size"], (20, 40))

# %% [markdown]
# With `draft_size`, a large JPEG decodes at a reduced scale (here a quarter), and
# `info["original_size"]` still says how large the photo is, for anything drawn back onto it:

# %%
buf = io.BytesIO(); Image.new("RGB", (2000, 1200)).save(buf, format="JPEG")
drafted = load_image(buf.getvalue(), draft_size=300)
test_eq((drafted.size, drafted.info["original_size"]), ((500, 300), (2000, 1200)))
drafted.size, drafted.info["original_size"]


# %% [markdown]
# ## `ModelConfig`: what a model artifact says about itself
#
# A trained model's directory holds `model_config.json`: its architecture, its preprocessing
# (required, never guessed), class names, softmax temperature, the fitted open-set
# ("neither") head's numbers, the dataset version, the test metrics and the validation
# answers that drift is measured against. `ModelConfig` is that file's schema and
# `OpenSetConfig` its open-set part; both are plain dataclasses, so a serving process reads
# them without PyTorch.

# %%
#| export
@dataclass
class OpenSetConfig:
    "The fitted open-set head's numbers, as `model_config.json` records them."
    threshold: float # Answer "neither" when p_cat_or_dog is below this
    k: int # Similarity to the k-th nearest training feature
    bank_size: int # Training features kept
    slope: float # Platt scaling from score to p_cat_or_dog
    offset: float
    keep_rate: float # The share of validation cats and dogs the threshold was placed to keep
    val_kept: float # Share of validation cats and dogs at or above the threshold

    def probability(self, score:np.ndarray) -> np.ndarray:
        "`p_cat_or_dog` for open-set scores."
        z = self.slope * np.asarray(score, dtype=np.float64) + self.offset
        return np.exp(-np.logaddexp(0.0, -z))  # sigmoid(z), without overflow for any z

@dataclass
class ModelConfig:
    "What `model_config.json` records about a trained model."
    architecture: str # A name in the backbone registry (`catsdogs.model`)
    image_size: int # Side of the square model input
    crop_fraction: float # Eval: centre crop's share of the resized shorter side
    mean: tuple # Normalisation of the backbone
    std: tuple
    class_names: tuple = CLASS_NAMES
    temperature: float = 1.0
    dropout: float = 0.2
    open_set: OpenSetConfig|None = None # The fitted open-set head; None: cat or dog only
    dataset_version: str = ""
    metrics: dict = field(default_factory=dict)
    int8: dict|None = None # What `quantize_artifact` measured of `model.int8.onnx` (see the engines notebook); None: no int8 model
    heat_maps: bool = False # The exported graphs' last output is `maps`: the class activation maps (see the model notebook)
    drift_reference: dict|None = None # The validation split's answers, binned for the drift statistic (see the metrics notebook); None: not recorded
    code_version: str = ""
    created: str = ""

    def save(self, path:Path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path:Path) -> ModelConfig:
        "Read `model_config.json`; the preprocessing fields must be there, never guessed."
        raw = json.loads(Path(path).read_text())
        missing = [k for k in ("architecture", "image_size", "crop_fraction", "mean", "std", "class_names") if k not in raw]
        if missing: raise ValueError(f"{path} lacks {', '.join(missing)}")
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in cls.__dataclass_fields__}
        if known.get("open_set") is not None: known["open_set"] = OpenSetConfig(**known["open_set"])
        return cls(**known)


# %%
with tempfile.TemporaryDirectory() as tmp:
    config = ModelConfig("efficientnet_lite0", 288, 0.875, (0.498,) * 3, (0.502,) * 3, open_set=OpenSetConfig(0.32, k=5, bank_size=100, slope=3.0, offset=6.0, keep_rate=0.99, val_kept=0.99))
    config.save(Path(tmp)/"model_config.json")
    test_eq(ModelConfig.load(Path(tmp)/"model_config.json"), config)
    (Path(tmp)/"old.json").write_text('{"architecture": "small_cnn", "image_size": 64}')
    test_fail(lambda: ModelConfig.load(Path(tmp)/"old.json"), contains="lacks crop_fraction, mean, std, class_names")
test_close(config.open_set.probability(np.array([-1e6, -2.0, 1e6])), [0.0, 0.5, 1.0])
config

# %% [markdown]
# ## `Preset`: a model's preprocessing
#
# At inference time (validation, test, `catsdogs_eval`, the API) an image is resized so its
# shorter side is `image_size / crop_fraction` (Pillow's antialiased bilinear filter),
# centre-cropped to `image_size`, scaled to [0, 1] and normalised by the backbone's mean and
# standard deviation. `load` decodes JPEGs in draft mode at the resize size. The four numbers
# come from the model's `ModelConfig` (`from_config`), which the artifact stores, so a model
# is always served with the preprocessing it was trained with.
#
# `eval_array` is the only implementation of that path, and a test checks it pixel for pixel
# against torchvision's `Resize`/`CenterCrop`/`Normalize`. It is two steps, `resize` and
# `centre_crop`, so training can keep the first one's output in its pixel cache (the data
# notebook) and crop from there. `train_crop` is where training's augmentation starts: a
# random resized crop of that same resized photo; the rest of it runs on whole batches on the
# training device (`BatchAugment`, in the data notebook).

# %%
#| export
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

@dataclass(frozen=True)
class Preset:
    "The preprocessing of one model: input side, eval crop, normalisation."
    image_size: int # Side of the square model input
    crop_fraction: float # Eval: the centre crop's share of the resized shorter side
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_config(cls, config) -> Preset:
        "The preset of a `ModelConfig` (or anything with `image_size`, `crop_fraction`, `mean` and `std`)."
        return cls(int(config.image_size), float(config.crop_fraction), tuple(config.mean), tuple(config.std))

    @property
    def resize_size(self) -> int:
        "The shorter side images are resized to before the centre crop; also the JPEG draft size."
        return int(round(self.image_size / self.crop_fraction))

    def load(self, source:Path|str|bytes, max_pixels:int|None=None) -> Image.Image:
        "Decode `source` with `load_image`, JPEGs at the smallest draft scale that covers `resize_size`."
        return load_image(source, draft_size=self.resize_size, max_pixels=max_pixels)

    def _resized(self, size:tuple[int, int]) -> tuple[tuple[int, int], int, int]:
        "The size an image of `size` is resized to, and the centre crop's left and top in it."
        w, h = size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize_size * long / short)
        resized = (self.resize_size, new_long) if w <= h else (new_long, self.resize_size)
        return resized, int(round((resized[0] - self.image_size) / 2.0)), int(round((resized[1] - self.image_size) / 2.0))

    def resize(self, img:Image.Image) -> Image.Image:
        "Resize the shorter side to `resize_size` (Pillow's antialiased bilinear): the first step of `eval_crop`."
        size, _, _ = self._resized(img.size)
        return img if size == img.size else img.resize(size, Image.Resampling.BILINEAR)

    def centre_crop(self, pixels:np.ndarray) -> np.ndarray:
        "The centre `image_size` square of `(H, W, C)` pixels that `resize` gave: the second step of `eval_crop`, as a view."
        _, left, top = self._resized((pixels.shape[1], pixels.shape[0]))
        return pixels[top:top + self.image_size, left:left + self.image_size]

    def eval_crop(self, img:Image.Image) -> Image.Image:
        "Resize the shorter side to `resize_size` (antialiased bilinear), then centre-crop `image_size`."
        img = self.resize(img)
        _, left, top = self._resized(img.size)
        return img.crop((left, top, left + self.image_size, top + self.image_size))

    def eval_box(self, size:tuple[int, int]) -> tuple[float, float, float, float]:
        "The region of an image of `size` (width, height) that `eval_crop` keeps: `(left, top, right, bottom)` as fractions of its sides."
        (w, h), left, top = self._resized(size)
        return left / w, top / h, (left + self.image_size) / w, (top + self.image_size) / h

    def normalize(self, pixels:np.ndarray) -> np.ndarray:
        "`(H, W, 3)` uint8 pixels to a normalised `(3, H, W)` float32 array."
        x = pixels.astype(np.float32) / np.float32(255)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def eval_array(self, img:Image.Image) -> np.ndarray:
        "The model input for an RGB image: `(3, image_size, image_size)` float32."
        return self.normalize(np.asarray(self.eval_crop(img)))

    def stack(self, sources:list[Path|str|bytes|Image.Image]) -> np.ndarray:
        "The model inputs of several images (files, bytes or decoded images), stacked `(N, 3, image_size, image_size)`; `ImageError` on a bad one."
        return np.stack([self.eval_array(s if isinstance(s, Image.Image) else self.load(s)) for s in sources])

    def train_crop(self):
        "The first step of training's augmentation, per image: torchvision's random resized crop (70-100% of the area) to `image_size`, on a `(3, H, W)` uint8 tensor."
        from torchvision.transforms import v2 as T
        return T.RandomResizedCrop(self.image_size, scale=(0.7, 1.0), antialias=True)


# %%
preset = Preset.from_config(config)
img = preset.load(data_dir/"Dog"/"dog.1.jpg")
x = preset.eval_array(img)
test_eq((preset.resize_size, x.shape, x.dtype), (329, (3, 288, 288), np.float32))
test_eq(preset.mean, (0.498,) * 3)
test_eq(min(preset.eval_crop(img).size), 288)
test_eq(preset.centre_crop(np.asarray(preset.resize(img))), np.asarray(preset.eval_crop(img)))  # the two steps
preset, img.size, x.shape, float(x.mean())

# %% [markdown]
# `eval_box` says which part of a photo the model sees: the whole of the shorter side's
# `crop_fraction`, centred. Heat maps are drawn back onto the photo in that box.

# %%
test_close(preset.eval_box((400, 400)), (0.0625, 0.0625, 0.9375, 0.9375), eps=5e-3)
left, top, right, bottom = preset.eval_box((800, 400))  # a wide photo: most of its width is cut
test_close((right - left, bottom - top), (0.4375, 0.875), eps=1e-3)
preset.eval_box(img.size)

# %% [markdown]
# `stack` is the same path for a batch: files, bytes or decoded images in, one float32 array out.

# %%
batch = preset.stack([data_dir/"Dog"/"dog.1.jpg", (data_dir/"Cat"/"cat.1.jpg").read_bytes(), img])
test_eq(batch.shape, (3, 3, 288, 288))
test_eq(batch[0], x)
test_fail(lambda: preset.stack([b"not an image"]), contains="not an image")
batch.shape

# %% [markdown]
# The eval path computes what torchvision's `Resize`, `CenterCrop` and `Normalize` compute, to
# within float32 rounding:

# %%
reference = T.Compose([T.Resize(preset.resize_size, antialias=True), T.CenterCrop(preset.image_size),
                       T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std)])
difference = float(np.abs(reference(img).numpy() - x).max())
assert difference < 1e-5, difference
difference

# %% [markdown]
# Training crops from the same resized photo that the eval path centre-crops, at random:

# %%
resized = torch.from_numpy(np.array(preset.resize(img))).permute(2, 0, 1)  # (3, H, W) uint8, shorter side 329
torch.manual_seed(0)
crops = [preset.train_crop()(resized) for _ in range(2)]
test_eq([tuple(c.shape) for c in crops], [(3, 288, 288)] * 2)
assert not torch.equal(*crops), "two draws, two crops"
tuple(resized.shape), crops[0].dtype

# %% [markdown]
# Serving imports this module without PyTorch: nothing above loads it at import time.

# %%
code = "import sys, catsdogs.presets; print('torch' in sys.modules)"
test_eq(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip(), "False")
