"""DeepLabV3 and DeepLabV3+ on a torchvision ResNet encoder, and its ImageNet weights.

See `offroadseg.models` for the surface every model shares and for what `pretrained=` accepts.
"""

from __future__ import annotations

import os

import torch
import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from .base import PretrainedUnavailable, SegmentationModel, check_options, looks_like_hub_id, upsample


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without its pooling and fc, returning the four stage outputs.

    Submodule names equal torchvision's, so a ResNet `state_dict()` (minus
    `fc.*`) loads directly. `output_stride` 32, 16 or 8 replaces the last
    strides with dilation.
    """

    def __init__(self, depth: int, output_stride: int = 32):
        super().__init__()
        dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[output_stride]
        builder = getattr(torchvision.models, f"resnet{depth}")
        if depth >= 50:
            resnet = builder(weights=None, replace_stride_with_dilation=dilate)
        else:
            resnet = builder(weights=None)
            _dilate_basic_blocks(resnet, dilate)
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, part, getattr(resnet, part))
        width = 4 if depth >= 50 else 1  # Bottleneck expansion
        self.channels = [64 * width, 128 * width, 256 * width, 512 * width]
        self.strides = [4, 8, min(16, output_stride), output_stride]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def _dilate_basic_blocks(resnet, dilate):
    """Trade stride for dilation in a BasicBlock ResNet, as torchvision does for Bottleneck.

    torchvision's BasicBlock raises on dilation > 1, so the convs are changed
    after construction: a dilated stage's first block loses its stride and
    keeps the previous dilation, later blocks use the new one.
    """
    dilation = 1
    for layer, flag in zip((resnet.layer2, resnet.layer3, resnet.layer4), dilate):
        if not flag:
            continue
        previous, dilation = dilation, dilation * 2
        for index, block in enumerate(layer):
            d = previous if index == 0 else dilation
            if index == 0:
                block.conv1.stride = (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
            for conv in (block.conv1, block.conv2):
                conv.dilation, conv.padding = (d, d), (d, d)


class DeepLabV3(SegmentationModel):
    """DeepLabV3 as torchvision builds it: dilated ResNet (output stride 8) and `DeepLabHead`."""

    def __init__(self, depth: int, num_classes: int, options: dict):
        super().__init__()
        options = check_options(f"deeplabv3-resnet{depth}", options, {"output_stride": 8})
        self.options = options
        self.encoder = ResNetEncoder(depth, options["output_stride"])
        # DeepLabHead = ASPP, 3x3 conv, BN, ReLU, 1x1 classifier (torchvision, rates 12/24/36).
        self.decoder = DeepLabHead(self.encoder.channels[-1], num_classes)
        self.feature_channels = [*self.encoder.channels, 256]
        self.feature_strides = [*self.encoder.strides, options["output_stride"]]

    def encode(self, x):
        return self.encoder(x)

    def decode(self, stages):
        fused = stages[-1]
        for layer in list(self.decoder)[:-1]:
            fused = layer(fused)
        return fused, self.decoder[-1](fused)


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the deepest map, fused with stride-4 features (Chen et al. 2018, ResNet variant)."""

    def __init__(self, in_channels, low_level_in, num_classes, atrous_rates, aspp_channels, low_level_channels, channels):
        super().__init__()
        self.aspp = ASPP(in_channels, list(atrous_rates), aspp_channels)
        self.low_level = nn.Sequential(
            nn.Conv2d(low_level_in, low_level_channels, 1, bias=False),
            nn.BatchNorm2d(low_level_channels),
            nn.ReLU(inplace=True),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(aspp_channels + low_level_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, low, deep):
        low = self.low_level(low)
        deep = upsample(self.aspp(deep), low.shape[-2:])
        fused = self.fuse(torch.cat([deep, low], dim=1))
        return fused, self.classifier(fused)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+: dilated ResNet (output stride 16), ASPP, low-level decoder at stride 4."""

    def __init__(self, depth: int, num_classes: int, options: dict):
        super().__init__()
        defaults = {
            "output_stride": 16,
            "atrous_rates": None,
            "aspp_channels": 256,
            "decoder_channels": 256,
            "low_level_channels": 48,
        }
        options = check_options(f"deeplabv3plus-resnet{depth}", options, defaults)
        if options["atrous_rates"] is None:
            # Rates scale with resolution: (6, 12, 18) at stride 16 as in the paper.
            scale = 16 // options["output_stride"] if options["output_stride"] <= 16 else 0.5
            options["atrous_rates"] = [int(r * scale) for r in (6, 12, 18)]
        options["atrous_rates"] = list(options["atrous_rates"])
        self.options = options
        self.encoder = ResNetEncoder(depth, options["output_stride"])
        self.decoder = DeepLabV3PlusDecoder(
            in_channels=self.encoder.channels[-1],
            low_level_in=self.encoder.channels[0],
            num_classes=num_classes,
            atrous_rates=options["atrous_rates"],
            aspp_channels=options["aspp_channels"],
            low_level_channels=options["low_level_channels"],
            channels=options["decoder_channels"],
        )
        self.feature_channels = [*self.encoder.channels, options["decoder_channels"]]
        self.feature_strides = [*self.encoder.strides, 4]

    def encode(self, x):
        return self.encoder(x)

    def decode(self, stages):
        return self.decoder(stages[0], stages[-1])


def build_deeplab(cls, depth: int, num_classes: int, pretrained, options: dict) -> SegmentationModel:
    model = cls(depth, num_classes, options)
    if pretrained is not None and pretrained is not False:
        source = "DEFAULT" if pretrained is True else str(pretrained)
        _load_resnet(model.encoder, depth, source)
    return model


def _resnet_help(depth: int) -> str:
    return (
        f"To use ImageNet weights offline, save them on a machine with internet: "
        f"`python -m offroadseg.weights download --model deeplabv3plus-resnet{depth} --pretrained DEFAULT --to weights` "
        f"and pass the weights folder (./run_all.sh: --weights weights), or by hand: "
        f"`import torch, torchvision; torch.save(torchvision.models.resnet{depth}(weights='DEFAULT').state_dict(), "
        f"'weights/resnet{depth}.pth')`, copy the file here and pass pretrained='weights/resnet{depth}.pth'."
    )


def _load_resnet(encoder: ResNetEncoder, depth: int, source: str) -> None:
    """Load ResNet weights into `encoder`: a torchvision weights name or a local state_dict file."""
    enum = torchvision.models.get_model_weights(f"resnet{depth}")
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise PretrainedUnavailable(f"could not read ResNet weights file {path!r}: {error}. " + _resnet_help(depth)) from error
        if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
            state = state.get("state_dict", state.get("model"))
        tried = f"file {path!r}"
    elif source in enum.__members__:
        try:
            state = enum[source].get_state_dict(progress=False)
        except Exception as error:  # offline: URLError and friends
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum[source].url))
            raise PretrainedUnavailable(
                f"could not get torchvision weights resnet{depth} {source} (download to {cached} "
                f"failed: {type(error).__name__}: {error}). " + _resnet_help(depth)
                + f" (Or copy {enum[source].url} to {cached}.)"
            ) from error
        tried = f"torchvision {enum.__name__}.{source}"
    elif looks_like_hub_id(source) and os.sep not in source and "." not in source:
        raise ValueError(f"unknown ResNet weights {source!r}; use one of {list(enum.__members__)} or a .pth file")
    else:
        raise PretrainedUnavailable(f"ResNet weights file {path!r} does not exist. " + _resnet_help(depth))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise PretrainedUnavailable(
            f"ResNet weights from {tried} do not fit resnet{depth} (expected a torchvision resnet{depth} "
            f"state_dict): {error}. " + _resnet_help(depth)
        ) from error
