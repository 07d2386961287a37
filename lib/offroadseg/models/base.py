"""What every segmentation model of the project shares: the forward, the safe upsample, option checks.

`SegmentationModel` is the encoder + decoder surface described in `offroadseg.models`; the families
(`models.segformer`, `models.deeplab`) subclass it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights were asked for but could not be loaded (offline, missing, wrong shapes)."""


# CUDA's channels-last bilinear kernel (upsample_bilinear2d_nhwc) indexes with 32-bit ints and
# refuses an input or output of INT_MAX elements or more; SegFormer's decoder maps are
# channels-last (a transposed linear projection), so B2 at 960x540 fails from ~87 images.
UPSAMPLE_MAX_ELEMENTS = 2**31 - 1


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of an (N, C, H, W) batch to `size`, safe at any batch size.

    When the input or the output would reach `UPSAMPLE_MAX_ELEMENTS`, the batch is resized in
    chunks that each stay below it, then concatenated: the same values (each sample is resized
    on its own anyway) in the same memory format, so the fast channels-last kernel is kept.
    Only when a single sample is that large is the input made contiguous first (the NCHW kernel
    indexes with 64 bits). While tracing or compiling (ONNX export, torch.compile) the plain
    call is made: those emit their own kernels, and a test on the batch size would pin the
    exported graph's dynamic batch.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or x.dim() != 4:
        # `size` as given: int() of a traced shape would freeze the exported graph's dynamic size.
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    size = tuple(int(side) for side in size)
    per_sample = x.shape[1] * max(x.shape[2] * x.shape[3], size[0] * size[1])
    if x.shape[0] * per_sample < UPSAMPLE_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if per_sample >= UPSAMPLE_MAX_ELEMENTS:
        return F.interpolate(x.contiguous(), size=size, mode="bilinear", align_corners=False)
    chunk = (UPSAMPLE_MAX_ELEMENTS - 1) // per_sample
    return torch.cat([F.interpolate(part, size=size, mode="bilinear", align_corners=False)
                      for part in x.split(chunk)])


def looks_like_hub_id(source: str) -> bool:
    """"owner/name" or "name" of letters, digits, '.', '_', '-' (a hub repository or a torchvision weights
    name), not a relative path like "./weights"."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not source.startswith(".")


def check_options(name: str, given: dict, defaults: dict) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{name} has no option(s) {unknown}; its options are {sorted(defaults)}")
    return {**defaults, **given}


class SegmentationModel(nn.Module):
    """Encoder + decoder with the shared forward; subclasses define `encode` and `decode`.

    `encode(x)` returns the encoder's four stage maps; `decode(stages)` returns
    `(fused, logits)` at the decoder's own stride.
    """

    feature_channels: list[int]
    feature_strides: list[int]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        stages = self.encode(x)
        fused, logits = self.decode(stages)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = upsample(logits, x.shape[-2:])
        if return_features:
            return logits, [*stages, fused]
        return logits
