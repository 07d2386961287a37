"""From a frame to a model batch: the one home of the model input's resize and normalisation.

    x = frames_to_batch(frames, input_size=(160, 288), device=device)   # float32 (N, 3, 160, 288), normalised
    image, mask = resize_pair(image_hwc, mask_hw, (160, 288))          # uint8, as the decode cache stores them

Every path from a frame to what a model sees resizes and normalises here, so the val score
that chooses the best epoch is measured on the pixels predict computes from the same frame
(tests/test_preprocess.py holds the three paths to it):
- the decode cache (`dataset.decode_pair` calls `resize_pair`): val images at the model input,
  read by training's validation as they are; train images at 1.5x it;
- `augment.SegmentationTransform` (`resize_image`, `resize_mask`, `to_model_input`):
  evaluation from native images, and the per-sample augmentation's random resized crop;
- `frames_to_batch`, under `evaluate.predict_labels`: predict, notebook 06's test
  predictions, video, the uncertainty ranking, bench/inference.py.

The rule:
- Image: bilinear, antialiased when shrinking (a triangle filter as wide as the scale factor,
  so fine texture does not alias), rounded to uint8, as torchvision's `resize` does it: on a
  CPU torch's native uint8 kernel, on a GPU float32 interpolation rounded to uint8. The two
  agree within one grey level (on about one pixel in ten, the native kernel's fixed-point
  weights round the other way): a cache built on the CPU and predict on a GPU see the same
  frame within 1/255. Computing in float32 on the CPU too would make them agree but costs
  10-25x the time there (100 ms instead of 4-8 ms per 960x540 frame on 2 cores).
- Mask: nearest-exact: each output pixel takes the label under its centre. Torch's "nearest"
  takes the top-left source pixel of the cell instead, which shifts labels by up to half an
  output pixel against the image. Labels never blend.
- Normalisation: uint8 / 255, then the ImageNet mean and std (a model file may carry its own:
  `modelinfo`), in float32.

Resampling that is augmentation, not this rule: `batch_augment.BatchAugment` composes crop,
resize, rotation and zoom into one `grid_sample` on the device (bilinear, antialiasing
approximated by four taps, labels nearest with ties rounded up as nearest-exact does), and
the per-sample path's rotation and zoom are torchvision affine steps (bilinear, no
antialiasing). Neither is used to validate or predict.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The rule above, for whoever resamples images or masks: images antialiased when shrinking.
IMAGE_INTERPOLATION = InterpolationMode.BILINEAR
MASK_INTERPOLATION = InterpolationMode.NEAREST_EXACT


@functools.lru_cache(maxsize=256)
def device_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on `device`, made there once: `torch.tensor(..., device=cuda)` is a
    blocking host-to-device copy, a host sync, every time. Read-only (never modify it in place)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _stats(values) -> tuple[float, ...]:
    # Hashable for `device_constant` (a model record's mean comes back from JSON as a list).
    return tuple(float(v) for v in values)


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Float image(s) in [0, 1], shape (..., 3, H, W) -> normalised with `mean` and `std` (default ImageNet's)."""
    mean = device_constant(_stats(mean), image.dtype, image.device).view(3, 1, 1)
    std = device_constant(_stats(std), image.dtype, image.device).view(3, 1, 1)
    return (image - mean) / std


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Inverse of `normalize`: back to [0, 1] (not clamped), shape (..., 3, H, W)."""
    mean = device_constant(_stats(mean), image.dtype, image.device).view(3, 1, 1)
    std = device_constant(_stats(std), image.dtype, image.device).view(3, 1, 1)
    return image * std + mean


def to_model_input(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 image(s) (..., 3, H, W) -> float32 in [0, 1], normalised (`normalize`): what a model takes."""
    return normalize(TF.to_dtype(images, torch.float32, scale=True), mean, std)


def resize_image(image: torch.Tensor, size, box=None) -> torch.Tensor:
    """uint8 image(s) (..., 3, H, W) resized to `size` (height, width) by the rule above; uint8 back.

    `box` (top, left, height, width): crop it first (the random resized crop of augmentation).
    Unchanged when there is nothing to do. Any device: the batch is resized where it is.
    """
    size = [int(size[0]), int(size[1])]
    if box is not None and tuple(box) != (0, 0, *image.shape[-2:]):
        return TF.resized_crop(image, *box, size, IMAGE_INTERPOLATION, antialias=True)
    if list(image.shape[-2:]) == size:
        return image
    return TF.resize(image, size, IMAGE_INTERPOLATION, antialias=True)


def resize_mask(mask: torch.Tensor, size, box=None) -> torch.Tensor:
    """Label mask(s) (..., H, W) resized to `size` (height, width) by nearest-exact; same dtype back.

    `box` (top, left, height, width): crop it first, as `resize_image` does, so the two stay aligned.
    """
    size = [int(size[0]), int(size[1])]
    planes = mask[None] if mask.ndim == 2 else mask  # torchvision reads the last three dims as (C, H, W)
    if box is not None and tuple(box) != (0, 0, *mask.shape[-2:]):
        planes = TF.resized_crop(planes, *box, size, MASK_INTERPOLATION)
    elif list(mask.shape[-2:]) != size:
        planes = TF.resize(planes, size, MASK_INTERPOLATION)
    return planes[0] if mask.ndim == 2 else planes


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size):
    """A decoded pair (image uint8 (H, W, 3), mask uint8 (H, W) or None) at `size` (height, width;
    None keeps it), numpy in and out: what the decode cache stores, pixel for pixel what
    `frames_to_batch` computes from the same frame on a CPU."""
    if size is None or image.shape[:2] == tuple(size):
        return image, mask
    # np.require: a read-only array (PIL's) would make torch warn; the resize makes a new array anyway.
    pixels = torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1)
    image = np.ascontiguousarray(resize_image(pixels, size).permute(1, 2, 0).numpy())
    if mask is not None:
        mask = resize_mask(torch.from_numpy(np.require(mask, requirements=("C", "W"))), size).numpy()
    return image, mask


def frames_to_batch(frames: Sequence, input_size, device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 RGB frames (H x W x 3 numpy arrays or tensors, any sizes) -> the model's input batch.

    Each frame goes to `device` as uint8 (a quarter of float's bytes over PCIe), then is resized
    there to `input_size` (height, width; `resize_image`) and normalised (`to_model_input`) with
    `mean`/`std`. Frames of one size are resized as one batch.
    """
    height, width = (int(s) for s in input_size)
    out = torch.empty(len(frames), 3, height, width, device=device)
    by_size: dict[tuple, list[int]] = {}
    for index, frame in enumerate(frames):
        by_size.setdefault(tuple(frame.shape[:2]), []).append(index)
    for indices in by_size.values():
        # np.require: PIL's arrays are read-only, which torch warns about (the stack copies anyway).
        group = torch.stack([torch.as_tensor(np.require(frames[i], requirements=("C", "W"))) if isinstance(frames[i], np.ndarray)
                             else torch.as_tensor(frames[i]) for i in indices])
        if group.dtype != torch.uint8 or group.ndim != 4 or group.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 RGB (H, W, 3), got {tuple(group.shape[1:])} {group.dtype}")
        group = group.to(device, non_blocking=True).permute(0, 3, 1, 2)
        out[indices] = to_model_input(resize_image(group, (height, width)), mean, std)
    return out
