# %%
#| default_exp config

# %% [markdown]
# # Configuration
#
# > One typed settings object for every stage, overridable by `CATSDOGS_*` environment variables and CLI flags.

# %% [markdown]
# Every number the project depends on (paths, image size, split ratios, seed, MLflow URI,
# upload limits) lives in `Settings`, and nowhere else. Values resolve in this order,
# last wins:
#
# 1. the defaults below, in sections by stage (data, model, training, inference, evaluation,
#    serving, feedback),
# 2. environment variables named `CATSDOGS_<FIELD>` (and the standard `MLFLOW_TRACKING_URI`),
# 3. command-line flags of the console scripts (`--field-name`).

# %%
#| export
from __future__ import annotations

import argparse
import os
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

# %%
#| hide
from fastcore.test import test_eq, test_fail
import contextlib, io

# %% [markdown]
# ## Settings

# %%
#| export
PETIMAGES_URL = ("https://download.microsoft.com/download/3/E/1/"
                 "3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip")

def _default_tracking_uri() -> str:
    "The standard `MLFLOW_TRACKING_URI`, else a SQLite store in the working directory."
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"

class _Section(BaseSettings):
    "Base of the settings sections: every field reads `CATSDOGS_<FIELD>` from the environment."
    model_config = SettingsConfigDict(env_prefix="CATSDOGS_", extra="ignore", validate_assignment=True, populate_by_name=True)

class DataSettings(_Section):
    "Where the photos come from, how they are checked, and how they are split (`catsdogs_prepare`)."
    data_dir: Path | None = Field(None, description="Local image folder (class subfolders or Kaggle-style names); unset: download PetImages")
    dataset_url: str = Field(PETIMAGES_URL, description="URL of the PetImages zip")
    dataset_sha256: str | None = Field(None, description="Expected sha256 of the zip; unset: record it, check only the size")
    cache_dir: Path = Field(Path.home()/".cache"/"catsdogs", description="Where downloads (the dataset, registry models), their extraction and training's pixel cache live")
    prepared_dir: Path = Field(Path("artifacts/data"), description="Where `catsdogs_prepare` writes manifest.csv and skipped.csv")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of each class for validation")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Share of each class for the test split")
    seed: int = Field(42, description="Seed for splits, initialisation and augmentation")
    near_duplicate_distance: int = Field(4, ge=0, le=16, description="Max perceptual-hash Hamming distance for near duplicates")
    num_workers: int = Field(0, ge=0, description="Worker processes; 0: automatic (preparation and the pixel cache: one per core; loading: up to 8 on CUDA, none on CPU)")
    max_image_pixels: int = Field(50_000_000, gt=0, description="Larger images are refused as decompression bombs")

class ModelSettings(_Section):
    "What the model is, and where its artifact and its runs are kept (training writes them, every later stage reads them)."
    architecture: str = Field("efficientnet_lite0", description="Backbone name from the model registry")
    image_size: int = Field(288, ge=32, description="Side of the square model input (EfficientNet-Lite0 transfers best above its 224 training size)")
    crop_fraction: float = Field(0.875, gt=0, le=1, description="Eval: resize shorter side to image_size/crop_fraction, then centre-crop")
    model_dir: Path = Field(Path("artifacts/model"), validation_alias=AliasChoices("CATSDOGS_MODEL_DIR", "CATSDOGS_OUTPUT"),
                            description="The model artifact: the directory training writes, and what predict, eval and serve read "
                                        "(there also a registry URI such as models:/catsdogs@champion)")
    mlflow_tracking_uri: str = Field(default_factory=_default_tracking_uri, description="MLflow tracking URI (also read from MLFLOW_TRACKING_URI)")
    experiment_name: str = Field("catsdogs", description="MLflow experiment name")
    registered_model_name: str = Field("catsdogs", description="Name in the MLflow Model Registry")

class TrainingSettings(_Section):
    "How the model is trained (`catsdogs_train`), the open-set head's fit included."
    epochs: int = Field(7, ge=1, description="Total epochs, frozen stage included")
    freeze_epochs: int = Field(5, ge=0, description="Epochs that train the head only, backbone frozen")
    batch_size: int = Field(32, ge=1, description="Images per training step (per process under torchrun)")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate of the head")
    backbone_lr: float = Field(3e-5, gt=0, description="Peak learning rate of the backbone once unfrozen (the head then gets 10x)")
    weight_decay: float = Field(0.02, ge=0, description="AdamW weight decay")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the training loss")
    warmup_epochs: float = Field(0.3, ge=0, description="Linear warm-up of each stage, in epochs")
    patience: int = Field(3, ge=1, description="Early stopping: epochs without a better validation loss")
    pixel_cache: bool = Field(True, description="Decode and resize every photo once into an uncompressed cache under cache_dir (about 415 KB a photo at 288 px) that every epoch reads; --no-pixel-cache: decode each epoch")
    freeze_bn: bool = Field(True, description="Keep BatchNorm statistics fixed while fine-tuning (stable with small batches)")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`")
    open_set_keep_rate: float = Field(0.99, gt=0, le=1, description="Share of validation cats and dogs the 'neither' threshold keeps")
    open_set_k: int = Field(5, ge=1, description="Open-set head: similarity to the k-th nearest training photo")
    open_set_bank_size: int = Field(4096, ge=1, description="Open-set head: most training features kept for the nearest-neighbour search")
    open_set_slope: float = Field(3.0, gt=0, description="Open-set head: Platt slope from score to p_cat_or_dog (fitted in development)")
    open_set_offset: float = Field(6.0, description="Open-set head: Platt offset from score to p_cat_or_dog (fitted in development)")
    quantize: bool = Field(True, description="Also write model.int8.onnx (static int8) and what it measured against f32 on the validation split")
    int8_calibration_images: int = Field(256, ge=1, description="Training photos that calibrate the int8 model's activation ranges")

class InferenceSettings(_Section):
    "How a model artifact is run (`catsdogs_predict`, `catsdogs_eval`, `catsdogs_serve`)."
    backend: Literal["auto", "onnx", "openvino", "eager", "torchscript"] = Field("auto", description="Inference engine; auto: the fastest of onnx and openvino that agrees with onnx f32 on the model's check photos")
    precision: Literal["auto", "f32", "bf16", "int8"] = Field("auto", description="Compute precision; bf16 needs the openvino backend and a CPU with bf16 units, int8 the artifact's model.int8.onnx; auto: measured")
    int8_max_accuracy_drop: float = Field(0.001, ge=0, le=1, description="auto serves int8 only if its validation accuracy (stored in the artifact) is at most this far below f32")
    int8_max_open_set_drop: float = Field(0.01, ge=0, le=1, description="... and only if the share of validation cats and dogs it keeps at the 'neither' threshold is at most this far below f32's")
    tta: bool = Field(False, description="Average the prediction of the image and its mirror")
    open_set: bool = Field(True, description="Answer 'neither' for photos that show no cat or dog; --no-open-set: always cat or dog")
    open_set_threshold: float | None = Field(None, ge=0, le=1, description="Answer 'neither' below this p_cat_or_dog; unset: the model artifact's threshold")
    threads: int = Field(0, ge=0, description="Inference threads; 0: one per core")
    heat_map_max_side: int = Field(1024, ge=16, description="Heat-map overlays have the photo's size, scaled down to at most this many pixels on the longer side")
    heat_map_opacity: float = Field(0.6, gt=0, le=1, description="Opacity of the strongest heat in heat-map pictures (catsdogs_predict --explain, catsdogs_eval --figures)")

class EvaluationSettings(_Section):
    "What `catsdogs_eval` measures on besides the labelled folder (`data_dir`)."
    ood_dir: Path | None = Field(None, description="Optional folder of photos that show neither a cat nor a dog (any layout): open-set metrics on them")

class ServingSettings(_Section):
    "The HTTP service (`catsdogs_serve`): where it listens, and the limits that keep it up under bad input and overload."
    host: str = Field("127.0.0.1", description="Address the server binds")
    port: int = Field(8000, ge=0, le=65535, description="Port the server binds")
    workers: int = Field(1, ge=1, description="uvicorn worker processes")
    max_upload_bytes: int = Field(10_000_000, gt=0, description="Largest accepted upload or URL download, in bytes")
    max_batch_files: int = Field(32, ge=1, description="Most files in one /predict/batch request (see max_batch_size for the model's batches)")
    max_batch_size: int = Field(8, ge=1, description="Most images in one micro-batched forward pass (see the batching notebook for why 8)")
    batch_wait_ms: float = Field(10.0, ge=0, description="Most a micro-batch waits for more requests, and only while smaller than the batch before it")
    url_timeout_s: float = Field(5.0, gt=0, description="Connect and read timeout of URL fetches")
    allow_private_urls: bool = Field(False, description="Allow URL fetches from loopback/private/link-local addresses")
    max_queue: int = Field(64, ge=1, description="Most images waiting for inference; past it a request gets 503 with Retry-After at once")
    request_timeout_s: float = Field(10.0, gt=0, description="A queued image not answered within this gets 503, and its work is skipped")
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) of the 503 answers to overload")
    body_timeout_s: float = Field(30.0, gt=0, description="Most time to receive a request body; slower uploads get 408 and the connection is closed")
    max_connections: int = Field(1000, ge=1, description="Most concurrent connections and requests (uvicorn limit_concurrency); past it uvicorn answers 503")
    keep_alive_s: float = Field(5.0, gt=0, description="Idle keep-alive connections are closed after this (uvicorn timeout_keep_alive)")
    admin_token: str | None = Field(None, description="Token of the admin routes: POST /admin/reload (reload the model, e.g. a new registry version), "
                                                      "the review queue and the feedback export; unset: those routes are off")
    drift_window: int = Field(500, ge=10, description="Recent answers the drift statistic (PSI) compares with the model's validation split")

class FeedbackSettings(_Section):
    "Corrections and the review queue: the service keeps them (only when `feedback_dir` is set), `catsdogs_prepare` trains on them."
    feedback_dir: Path | None = Field(None, description="Folder of the feedback store (feedback.db and the photos); unset: nothing is kept, POST /feedback and /review are off")
    feedback_max_bytes: int = Field(1_000_000_000, gt=0, description="Most bytes of photos the store keeps; past it corrections get 409 and the review queue stops taking photos")
    feedback_answer_ttl_s: float = Field(3600.0, gt=0, description="How long an answer can be corrected (its photo waits in memory until then)")
    feedback_pending_bytes: int = Field(200_000_000, gt=0, description="Most bytes of recent photos kept in memory for corrections; the oldest go first")
    feedback_per_minute: int = Field(30, ge=1, description="Most corrections and review labels one client address may send a minute (429 past it)")
    review_queue_size: int = Field(500, ge=0, description="Most photos waiting in the review queue; a more doubtful photo takes the place of the least doubtful")
    review_margin: float = Field(1.5, gt=0, description="An answer whose margin is below this many log-odds (about 82% sure) joins the review queue; "
                                                        "the margin is the smaller of the cat/dog and the 'neither' threshold's, 0 when the mirror image disagrees")

SECTIONS = (DataSettings, ModelSettings, TrainingSettings, InferenceSettings, EvaluationSettings, ServingSettings, FeedbackSettings)

class Settings(DataSettings, ModelSettings, TrainingSettings, InferenceSettings, EvaluationSettings, ServingSettings, FeedbackSettings):
    "Every tunable of catsdogs: the sections together, one flat namespace (`settings.seed`, `CATSDOGS_SEED`, `--seed`)."

def section_of(field:str) -> type[BaseSettings]:
    "The section a `Settings` field belongs to."
    return next(section for section in SECTIONS if field in section.model_fields)


# %% [markdown]
# Each section is a class of its own, so a reader finds every knob of a stage in one place, and
# each console script takes its flags from the sections it uses. `Settings` joins them; the
# names stay flat (no `settings.training.epochs`), so each environment variable and flag has one
# short name, and no two sections may share a field:

# %%
test_eq(sum(len(section.model_fields) for section in SECTIONS), len(Settings.model_fields))
{section.__name__: len(section.model_fields) for section in SECTIONS}

# %%
test_eq(section_of("epochs"), TrainingSettings)
test_eq(section_of("model_dir"), ModelSettings)
section_of("max_queue").__name__

# %% [markdown]
# A section can be built alone, from the same environment, when a function needs only its part:

# %%
ServingSettings(port=9000).port, InferenceSettings().backend, EvaluationSettings().ood_dir, FeedbackSettings().feedback_dir

# %% [markdown]
# `model_dir` is the one artifact directory: `catsdogs_train` writes it and the later stages read
# it. Training also reads it as `CATSDOGS_OUTPUT` (and `catsdogs_train --output`):

# %%
os.environ["CATSDOGS_OUTPUT"] = "runs/first"
test_eq(Settings().model_dir, Path("runs/first"))
del os.environ["CATSDOGS_OUTPUT"]
test_eq(Settings(model_dir="runs/second").model_dir, Path("runs/second"))
DataSettings().prepared_dir, ModelSettings().model_dir

# %% [markdown]
# Defaults need no environment; an environment variable overrides a default:

# %%
settings = Settings()
test_eq(settings.image_size, 288)
os.environ["CATSDOGS_IMAGE_SIZE"] = "192"
test_eq(Settings().image_size, 192)
del os.environ["CATSDOGS_IMAGE_SIZE"]

# %% [markdown]
# Values are validated, so a typo fails at start-up and not in the middle of a run:

# %%
test_fail(lambda: Settings(val_fraction=1.5), contains="less than 1")

# %% [markdown]
# The MLflow store follows the standard variable when it is set:

# %%
os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000"
test_eq(Settings().mlflow_tracking_uri, "http://127.0.0.1:5000")
del os.environ["MLFLOW_TRACKING_URI"]
test_eq(Settings().mlflow_tracking_uri, "sqlite:///mlflow.db")


# %%
#| export
@lru_cache
def get_settings() -> Settings:
    "The process-wide settings, read from the environment once (tests may `get_settings.cache_clear()`)."
    return Settings()


# %% [markdown]
# The service reads its settings through `get_settings` (a FastAPI dependency, which tests
# override): one `Settings` per process, read once.

# %%
get_settings.cache_clear()
test_eq(get_settings() is get_settings(), True)
get_settings().model_dir, get_settings().backend


# %% [markdown]
# ## Command-line flags
#
# Each console script takes the sections it uses, plus the few single fields it shares with
# other stages (`catsdogs_predict` needs `model_dir` but not the rest of `ModelSettings`);
# `settings_parser` turns them into `--kebab-case` flags whose help text is the field's
# description, grouped by section in `--help`, and `parse_settings` builds a `Settings` where
# only the flags actually given override the environment.

# %%
#| export
def _flag_type(annotation):
    "The argparse type for a field annotation such as `Path | None` or `int`."
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _flag_type(args[0])
    if typing.get_origin(annotation) is Literal: return str
    if typing.get_origin(annotation) is tuple: return lambda s: tuple(x.strip() for x in s.split(","))
    return annotation

MODEL_SOURCE = ("model_dir", "mlflow_tracking_uri", "cache_dir")  # where a model artifact comes from: a folder or a registry URI

def field_names(fields:list[str|type[BaseSettings]]) -> list[str]:
    "Field names from a list of sections and single field names, in order, each once."
    names = [n for f in fields for n in (f.model_fields if isinstance(f, type) else [f])]
    return list(dict.fromkeys(names))

def settings_parser(description:str, # What the command does
                    fields:list[str|type[BaseSettings]], # Sections (all their fields) and single `Settings` fields to expose as flags
                    aliases:dict[str, str]|None=None, # Extra flag -> field, e.g. `{"--output": "model_dir"}`
                    **kwargs) -> argparse.ArgumentParser:
    "An argument parser with one `--flag` per field, grouped by section in `--help`, defaults left to the environment."
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
    try: defaults = Settings()
    except ValidationError: defaults = None  # a bad CATSDOGS_* value: `parse_settings` reports it as a usage error
    names, groups = field_names(fields), {}
    extra_flags = {field: [flag] for flag, field in (aliases or {}).items()}
    for name in names:
        section = section_of(name)
        if section not in groups: groups[section] = parser.add_argument_group(section.__name__.removesuffix("Settings").lower() + " settings", section.__doc__)
        info = Settings.model_fields[name]
        flags = ["--" + name.replace("_", "-")] + extra_flags.get(name, [])
        now = getattr(defaults, name) if defaults is not None else "see the error"
        help_text = f"{info.description} (env CATSDOGS_{name.upper()}; now: {now})"
        if info.annotation is bool:
            groups[section].add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is Literal else None
            groups[section].add_argument(*flags, dest=name, type=_flag_type(info.annotation), choices=choices, default=None, help=help_text)
    return parser

def parse_settings(parser:argparse.ArgumentParser, argv:list[str]|None=None) -> tuple[Settings, argparse.Namespace]:
    "Parse `argv`; returns `Settings` with the given flags applied, and the namespace for non-setting flags."
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try: return Settings(**overrides), args
    except ValidationError as e:  # a value out of range, from a flag or the environment: a usage error, not a traceback
        parser.error("; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')} (or CATSDOGS_{'.'.join(map(str, err['loc'])).upper()}): "
                               f"{err['msg']}, got {err['input']!r}" for err in e.errors()))


# %% [markdown]
# Flags override the environment, and unset flags leave it alone:

# %%
test_eq(field_names([EvaluationSettings, "data_dir", "ood_dir"]), ["ood_dir", "data_dir"])  # sections and single fields, each once
parser = settings_parser("demo", [InferenceSettings, "image_size", "data_dir"], aliases={"--size": "image_size"})
os.environ["CATSDOGS_IMAGE_SIZE"] = "160"
cfg, _ = parse_settings(parser, ["--data-dir", "photos", "--tta"])
test_eq((cfg.image_size, cfg.data_dir, cfg.tta), (160, Path("photos"), True))
cfg, _ = parse_settings(parser, ["--size", "128", "--backend", "onnx"])
test_eq((cfg.image_size, cfg.backend), (128, "onnx"))
del os.environ["CATSDOGS_IMAGE_SIZE"]

# %% [markdown]
# A value out of range is a usage error (exit status 2) that names the flag, not a traceback:

# %%
with contextlib.redirect_stderr(io.StringIO()) as stderr:
    try: parse_settings(parser, ["--image-size", "8"])
    except SystemExit as e: test_eq(e.code, 2)
    else: raise AssertionError("an image size of 8 should be refused")
test_eq("--image-size (or CATSDOGS_IMAGE_SIZE): Input should be greater than or equal to 32, got 8" in stderr.getvalue(), True)
os.environ["CATSDOGS_OPEN_SET_THRESHOLD"] = "abc"  # so is a malformed environment variable
with contextlib.redirect_stderr(io.StringIO()) as env_stderr:
    try: parse_settings(settings_parser("demo", ["open_set_threshold"]), [])
    except SystemExit as e: test_eq(e.code, 2)
del os.environ["CATSDOGS_OPEN_SET_THRESHOLD"]
test_eq("CATSDOGS_OPEN_SET_THRESHOLD" in env_stderr.getvalue(), True)
stderr.getvalue().splitlines()[-1], env_stderr.getvalue().splitlines()[-1]
