"""Segmentation models behind one factory: SegFormer, DeepLabV3 and DeepLabV3+.

    model = build_model("segformer-b2", num_classes=10, pretrained="weights/mit-b2", drop_path=0.2)
    logits = model(x)                                  # (N, 10, H, W) at the input's resolution
    logits, features = model(x, return_features=True)  # features: 5 maps, see below

Every model has the same surface, whatever its family:

- `forward(x)` takes a normalised float batch (N, 3, H, W) (ImageNet mean/std,
  see `offroadseg.augment`) and returns logits upsampled (bilinear,
  align_corners=False) to (H, W).
- `forward(x, return_features=True)` returns `(logits, features)`, `features`
  being five maps for knowledge distillation: the encoder's four stage outputs
  (shallow to deep) and then the decoder's fused map, the last map before the
  1x1 classifier. The stages carry what the encoder sees at each scale; the
  fused map is what the classifier reads, i.e. the teacher's final
  representation. Matching the deepest stage and the fused map is the usual
  choice (`features[-2:]`); the rest are there for students that want more.
  `feature_channels` and `feature_strides` (relative to the input) describe the
  five maps, so a student can build 1x1 projections onto a teacher's channels
  and resize to its spatial size.
- `.encoder` and `.decoder` hold the two halves' weights (decoder pruning works
  on `.decoder`); `.spec` = {"name", "num_classes", "options"} rebuilds the
  architecture: `build_model(**model.spec)` (weights then come from a checkpoint).

Families and why they look the way they do:

- `segformer-b0` ... `segformer-b5`: Hugging Face `SegformerModel` (Mix
  Transformer) with the published MiT sizes, and its all-MLP decode head.
  Options: `drop_path` (stochastic depth, default 0.1 as in the paper; the
  reference used 0.2), `decoder_hidden_size` (256 for b0/b1, 768 for b2-b5),
  `dropout` (before the classifier, default 0.1).
- `deeplabv3-resnet50/101`: torchvision's DeepLabV3 exactly (ResNet at output
  stride 8, `DeepLabHead`, no auxiliary head), rebuilt from its parts so the
  encoder can return all four stages. Option: `output_stride` (8 or 16).
- `deeplabv3plus-resnet18/34/50/101`: ASPP on the ResNet's last stage at output
  stride 16, plus the DeepLabV3+ decoder (stride-4 features reduced to 48
  channels, concatenated with the upsampled ASPP output, two 3x3 convs, 1x1
  classifier). torchvision's BasicBlock (ResNet-18/34) refuses dilation, so
  for those the strides of the last stage(s) are removed and the 3x3 convs
  dilated after construction, following torchvision's own rule for Bottleneck
  nets; the weights are untouched, so ImageNet weights still fit. Options:
  `output_stride` (8, 16 or 32), `atrous_rates` (default (6, 12, 18) at stride
  16, doubled at 8, halved at 32), `aspp_channels` (256), `decoder_channels`
  (256), `low_level_channels` (48).

Pretrained weights (`pretrained=`) never fall back to random initialisation:
when they cannot be had, `PretrainedUnavailable` says what was tried and how
to supply a local copy.

- SegFormer: a hub id ("nvidia/mit-b2" encoder-only, or a full
  "nvidia/segformer-b2-finetuned-ade-512-512") or a local folder written by
  `save_pretrained`; `True` means "nvidia/mit-<variant>". The whole encoder
  must load (a checkpoint of another size is an error); decoder weights are
  taken where they fit (the classifier never does with 10 classes) and are
  fresh otherwise. `HF_HUB_OFFLINE=1` is honoured at call time.
- DeepLab: ImageNet weights for the ResNet encoder only: a torchvision weights
  name ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"; `True` means "DEFAULT"),
  downloaded into torch's hub cache, or a local .pth/.pt file holding a
  torchvision ResNet `state_dict()` (the `fc.*` entries are ignored).

Layout: `models.base` (the shared forward, `upsample`, `PretrainedUnavailable`), `models.segformer`
and `models.deeplab` (one family each, with its pretrained-weight loading); this module is the
factory and re-exports the names callers use.
"""

from __future__ import annotations

import re

from torch import nn

from ..classes import NUM_CLASSES
from .base import UPSAMPLE_MAX_ELEMENTS, PretrainedUnavailable, SegmentationModel, looks_like_hub_id, upsample
from .deeplab import DeepLabV3, DeepLabV3Plus, DeepLabV3PlusDecoder, ResNetEncoder, build_deeplab
from .segformer import SEGFORMER_SIZES, SegFormer, build_segformer, segformer_hub_class

__all__ = ["MODEL_NAMES", "SEGFORMER_SIZES", "UPSAMPLE_MAX_ELEMENTS", "DeepLabV3", "DeepLabV3Plus",
           "DeepLabV3PlusDecoder", "PretrainedUnavailable", "ResNetEncoder", "SegFormer", "SegmentationModel",
           "build_model", "count_parameters", "looks_like_hub_id", "model_depth", "segformer_hub_class", "upsample"]

DEEPLABV3_DEPTHS = (50, 101)
DEEPLABV3PLUS_DEPTHS = (18, 34, 50, 101)

MODEL_NAMES: tuple[str, ...] = (
    *(f"segformer-{v}" for v in SEGFORMER_SIZES),
    *(f"deeplabv3-resnet{d}" for d in DEEPLABV3_DEPTHS),
    *(f"deeplabv3plus-resnet{d}" for d in DEEPLABV3PLUS_DEPTHS),
)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(name: str, num_classes: int = NUM_CLASSES, pretrained=None, **options) -> nn.Module:
    """Build a segmentation model by name (see `MODEL_NAMES` and the module docstring).

    `options` are the family's small knobs (e.g. `drop_path=0.2`); they may also
    come as one dict under `options=`, the form `model.spec` stores, so that
    `build_model(**model.spec)` rebuilds a model. The model is returned in
    training mode.
    """
    options = {**(options.pop("options", None) or {}), **options}
    if name.startswith("segformer-") and name[len("segformer-") :] in SEGFORMER_SIZES:
        model = build_segformer(name[len("segformer-") :], num_classes, pretrained, options)
    elif name.startswith("deeplabv3-resnet") and model_depth(name) in DEEPLABV3_DEPTHS:
        model = build_deeplab(DeepLabV3, model_depth(name), num_classes, pretrained, options)
    elif name.startswith("deeplabv3plus-resnet") and model_depth(name) in DEEPLABV3PLUS_DEPTHS:
        model = build_deeplab(DeepLabV3Plus, model_depth(name), num_classes, pretrained, options)
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    model.spec = {"name": name, "num_classes": num_classes, "options": dict(model.options)}
    return model.train()


def model_depth(name: str) -> int | None:
    match = re.fullmatch(r"deeplabv3(?:plus)?-resnet(\d+)", name)
    return int(match.group(1)) if match else None
