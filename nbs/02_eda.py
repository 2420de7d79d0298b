# %% [markdown]
# # Exploratory data analysis
#
# > What the cat and dog photos look like, and what that means for preprocessing, splitting and augmentation.

# %% [markdown]
# The notebook runs on the sample `PetImages-mini` (about 2,000 files) by default, and on
# the full data when `CATSDOGS_DATA_DIR` points at it. Everything below comes from one call
# of `build_manifest`, the same one `catsdogs_prepare` makes, so what we see here is what
# training gets. Nothing is exported.

# %%
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib_inline.backend_inline import set_matplotlib_formats
import torch

from catsdogs.config import Settings
from catsdogs.data import BatchAugment, build_manifest, demo_data_dir, find_images
from catsdogs.presets import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, Preset

# %%
#| hide
from fastcore.test import test_eq

# %%
set_matplotlib_formats("png")  # 1x images: the committed notebook (and the docs page) stays small
sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80})
pd.set_option("display.max_colwidth", 90)

# %% [markdown]
# ## The manifest
#
# We build the manifest once; every figure reads from it. Each file found ends up either in
# the manifest or in the skipped report, never both and never neither:

# %%
settings = Settings()
data_dir = settings.data_dir or demo_data_dir()
manifest, skipped = build_manifest(data_dir, settings, progress=False)
test_eq(len(manifest) + len(skipped), len(find_images(data_dir, CLASS_NAMES)))
test_eq(set(manifest.path) & set(skipped.path), set())
print(f"{data_dir.name}: {len(manifest):,} usable images, {len(skipped):,} skipped")
manifest.head(3)


# %% [markdown]
# Two small display helpers: a thumbnail on an axis, and a normalised tensor turned back
# into pixels. The figures use the preprocessing of `Settings` with ImageNet's normalisation
# (`IMAGENET_MEAN`/`IMAGENET_STD`).

# %%
def _show(ax, img, title:str=""):
    "Draw `img` (PIL image or HWC array) on `ax` without ticks, with a small title."
    ax.imshow(img); ax.set_title(title, fontsize=8); ax.axis("off")

def _denormalise(x:torch.Tensor) -> np.ndarray:
    "A normalised CHW tensor back to an HWC array in [0, 1] for `imshow`."
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (torch.as_tensor(x) * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

preset = Preset(settings.image_size, settings.crop_fraction, IMAGENET_MEAN, IMAGENET_STD)

# %%
x = preset.eval_array(preset.load(data_dir/manifest.path[0]))
test_eq(_denormalise(x).shape, (settings.image_size, settings.image_size, 3))
test_eq(float(_denormalise(torch.zeros(3, 2, 2))[0, 0, 0]), float(torch.tensor(IMAGENET_MEAN[0])))

# %% [markdown]
# ## What the photos look like

# %%
per_class = 8
picks = manifest.groupby("label").sample(per_class, random_state=settings.seed)
fig, axs = plt.subplots(manifest.label.nunique(), per_class, figsize=(12, 3.3))
for ax, row in zip(axs.flat, picks.itertuples()):
    _show(ax, preset.load(data_dir/row.path), f"{row.label}  {row.width}×{row.height}")
fig.tight_layout(); plt.show()

# %% [markdown]
# Ordinary pet photos, of the kind people upload to adoption sites: the animal usually fills
# a good part of the frame, but backgrounds, poses, lighting and framing vary a lot, and
# some photos show several animals, people, cages or text. Many cats and dogs are
# photographed indoors on similar sofas and floors, so the background carries little class
# signal; the model has to look at the animal. A pretrained ImageNet backbone, which has
# seen many cat and dog breeds, is the natural starting point.

# %% [markdown]
# ## Class balance per split

# %%
splits = ["train", "val", "test"]
fig, ax = plt.subplots(figsize=(6, 3.2))
sns.countplot(data=manifest, x="split", hue="label", order=splits, hue_order=sorted(manifest.label.unique()), ax=ax)
for bars in ax.containers: ax.bar_label(bars, fontsize=8)
ax.set_title("images per split and class"); plt.show()

# %%
balance = pd.crosstab(manifest.split, manifest.label, margins=True).loc[splits + ["All"]]
balance["share of split"] = (balance["All"] / len(manifest)).round(3)
balance

# %% [markdown]
# The classes are balanced (close to 50/50 overall and within each split), and the splits
# come out near 80/10/10: the split is a seeded hash of each duplicate group, so the shares
# are right up to sampling noise rather than exactly. With balance like this, plain accuracy
# is a fair headline metric and the loss needs no class weights. On the sample the val and
# test splits hold only about 200 images each, so a single misclassification moves accuracy
# by half a point: compare models on the full set, or with confidence intervals.

# %% [markdown]
# ## Image sizes and aspect ratios

# %%
sizes = manifest.assign(shorter=np.minimum(manifest.width, manifest.height), aspect=manifest.width / manifest.height)
fig, axs = plt.subplots(1, 3, figsize=(13, 3.6))
sns.scatterplot(data=sizes, x="width", y="height", hue="label", s=10, alpha=0.4, linewidth=0, ax=axs[0])
axs[0].set_title("width × height (pixels, after EXIF rotation)")
sns.histplot(data=sizes, x="shorter", bins=40, ax=axs[1])
for side, name, ls in ((preset.resize_size, "eval resize", "--"), (settings.image_size, "model input", ":")):
    axs[1].axvline(side, color="k", ls=ls, lw=1, label=f"{name} {side}")
axs[1].legend(fontsize=8); axs[1].set_title("shorter side (pixels)")
sns.histplot(data=sizes, x="aspect", bins=40, ax=axs[2])
for r in (3/4, 1, 4/3): axs[2].axvline(r, color="k", ls=":", lw=1)
axs[2].set_title("aspect ratio width/height (lines: 3:4, 1:1, 4:3)")
fig.tight_layout(); plt.show()

# %%
small = sizes.shorter < preset.resize_size
pd.DataFrame({"median": sizes[["width", "height", "shorter", "aspect"]].median(),
              "min": sizes[["width", "height", "shorter", "aspect"]].min(),
              "max": sizes[["width", "height", "shorter", "aspect"]].max()}).round(2).assign(
    note=["", "", f"{small.mean():.0%} below the eval resize", f"{(sizes.aspect > 1).mean():.0%} landscape"])

# %% [markdown]
# Sizes vary, but most photos are small web images, at most 500 pixels on the longer side
# (the sharp edges of the scatter), with rare larger outliers; the median is around 440×375.
# The default preprocessing resizes the shorter side to 329 and crops 288 (EfficientNet-Lite0
# transfers better above its 224-pixel training size), so the typical image is barely
# shrunk. Over a third of the images are *smaller* than 329 on the shorter side and get upsampled, a few of
# them heavily (the smallest are thumbnails well under 100 pixels), so the model must cope
# with blurry inputs too; the random resized crop in training helps with that.
#
# Aspect ratios cluster at 4:3 landscape (about 70%) and 3:4 portrait, with a long tail on
# both sides. A centre crop of a 4:3 photo drops an eighth of the width on each side, which
# rarely cuts the animal; for the few very wide or very tall images (ratio beyond 2:1) the
# crop can miss part of the animal. That is a known, small source of error, not a reason to
# pad instead of crop.

# %% [markdown]
# ## File sizes, formats and colour modes

# %%
kinds = (manifest["format"] + " / " + manifest["mode"]).value_counts()
fig, axs = plt.subplots(1, 2, figsize=(12, 3.4), gridspec_kw={"width_ratios": [2, 1]})
sns.histplot(data=manifest.assign(kilobytes=manifest.bytes / 1e3), x="kilobytes", hue="label",
             bins=40, log_scale=True, element="step", ax=axs[0])
axs[0].set_title("file size (kB, log scale)")
axs[1].bar(kinds.index, kinds.values); axs[1].set_yscale("log")
for i, n in enumerate(kinds.values): axs[1].text(i, n, f"{n:,}", ha="center", va="bottom", fontsize=8)
axs[1].set_title("format / mode (log scale)"); axs[1].tick_params(axis="x", rotation=30)
fig.tight_layout(); plt.show()

# %%
pd.crosstab(manifest["format"], manifest["mode"], margins=True)

# %%
manifest[(manifest["format"] != "JPEG") | (manifest["mode"] != "RGB")][["path", "label", "format", "mode", "width", "height", "bytes"]].head(20)

# %% [markdown]
# Files are small (median around 40 kB, almost all under 150 kB), as expected of
# re-compressed web JPEGs. The two classes overlap almost completely (dog files run slightly
# larger), so file size, and the JPEG quality behind it, is at most a weak shortcut to the
# label. Nearly everything is an RGB JPEG, but not everything: a handful of files are
# grayscale (`L`) or CMYK JPEGs, or PNGs (one with an alpha channel) that only *pretend* to be
# JPEGs by their `.jpg` name. None of that is an error, but any code that assumes "JPEG,
# three channels" would break or skew colours on them. This is why `load_image` decodes by
# content rather than by extension and converts every mode to RGB (alpha onto white), and
# why training and serving must share it.

# %% [markdown]
# ## The skipped-file report

# %%
skipped.assign(kind=skipped.reason.str.replace(r"[:(].*", "", regex=True).str.strip()).kind.value_counts()

# %%
skipped

# %% [markdown]
# Only a few files are unusable: Windows `Thumbs.db` thumbnails, an empty file, and a JPEG
# that is cut off part-way (the full PetImages download has a few more like these).
# A truncated JPEG is the dangerous case: many decoders show it without complaint, grey
# bottom and all, so it is only caught because preparation decodes every file in full once.
# Groups of duplicates whose copies disagree on the label would also be listed here; the
# report says why each file was dropped, so nothing disappears silently.

# %% [markdown]
# ## Duplicates
#
# Files sharing a `group` are exact copies (same sha256) or near copies (perceptual hashes
# within `near_duplicate_distance` bits: the same photo resized, re-encoded or converted).

# %%
group_sizes = manifest.group.value_counts()
dup_groups = sorted(group_sizes.index[group_sizes > 1], key=lambda g: (-group_sizes[g], g))
dups = manifest[manifest.group.isin(dup_groups)]
test_eq(dups.groupby("group").split.nunique().max() if len(dups) else 1, 1)
print(f"{len(dup_groups)} groups with more than one member, {len(dups)} images in them, "
      f"{dups.sha256.duplicated().sum()} byte-identical copies")

# %%
shown, most = dup_groups[:6], 4  # the largest groups first, at most `most` members each
ncols = min(max([group_sizes[g] for g in shown] + [2]), most)
fig, axs = plt.subplots(max(len(shown), 1), ncols, figsize=(2.4 * ncols, 2.0 * max(len(shown), 1)), squeeze=False)
for ax in axs.flat: ax.axis("off")
for r, g in enumerate(shown):
    for c, row in enumerate(manifest[manifest.group == g].head(most).itertuples()):
        _show(axs[r, c], preset.load(data_dir/row.path),
              f"{row.path}\n{row.width}×{row.height} {row.format}/{row.mode} {row.bytes/1e3:.0f} kB · {row.split}")
fig.tight_layout(); plt.show()

# %% [markdown]
# Each row is one group (the largest first), and its members are the same photo:
# re-encoded at a different quality (file sizes differ a lot), or converted to another
# format or colour mode. None of the sample's copies is byte-identical, so hashing bytes
# alone would have missed every one of them. The
# copies always sit in the same split (the title ends with it), which is the point of
# grouping: otherwise a model could be "tested" on a photo it was trained on, and test
# accuracy would be optimistic. The share of duplicates is small, so it barely changes how
# much data we have.

# %% [markdown]
# ## Augmentation
#
# One image through the preset's `eval_array` (what validation, testing and the API see) and
# through training's augmentation several times (what training sees: a random crop of the
# resized photo by `Preset.train_crop`, then the batch on the device through `BatchAugment`),
# seeded so the figure is reproducible.

# %%
row = picks.iloc[0]
img = preset.load(data_dir/row.path)
torch.manual_seed(settings.seed)
resized = torch.from_numpy(np.array(preset.resize(img))).permute(2, 0, 1)
augmented = BatchAugment(preset)(torch.stack([preset.train_crop()(resized) for _ in range(6)]))
views = [("original", np.asarray(img)), ("eval_array", _denormalise(preset.eval_array(img)))]
views += [(f"training #{i}", _denormalise(x)) for i, x in enumerate(augmented, 1)]
test_eq(views[1][1].shape, (settings.image_size, settings.image_size, 3))
fig, axs = plt.subplots(2, 4, figsize=(9, 4.9))
for ax, (title, pixels) in zip(axs.flat, views): _show(ax, pixels, title)
fig.suptitle(f"{row.path} ({row.label})", fontsize=9); fig.tight_layout(); plt.show()

# %% [markdown]
# The eval view is the centre of the photo, resized and cropped with no randomness. The
# training views stay recognisable (crops keep 70-100% of the area, rotations are at most
# 10°, colour changes are mild) while never repeating exactly: flips, small rotations with
# black corners, shifts in brightness and colour, and now and then a flat rectangle of the
# mean colour from random erasing. That matches the variation seen above (framing, lighting, partial
# occlusion) without inventing things the data never shows, such as upside-down pets, so the
# augmentation is sized about right for this data. Colours match the original once
# denormalised, which confirms both transforms use the same normalisation.
