"""Joint image + mask transforms: the training augmentation's recipe, its per-sample path, and evaluation resizing.

    transform = train_transform(size=(180, 320))      # (height, width) the model sees
    image, mask = transform(image_uint8_hwc, mask_uint8_hw)
    # image: float32 (3, 180, 320), ImageNet-normalised; mask: int64 (180, 320), 255 = ignore

The training augmentation is written once, as an `AugmentRecipe` (defaults: the
reference report's recipe, each step on its own coin): random crop, rotation,
zoom, horizontal flip, colour jitter. Two paths apply it: `train_transform`
here, per sample in the DataLoader workers, and `batch_augment.BatchAugment`,
on whole batches on their device (a GPU frees the workers from it; the dataset
then yields uint8 tensors at the cache size, `to_tensors`). Both take the same
recipe and give the same geometry and fills; tests/test_batch_augment.py holds
them to it.

Alignment rules: the crop-and-resize step (and evaluation's plain resize) is
`preprocess.resize_image` / `resize_mask`, the rule every path to a model input
follows: bilinear antialiased image, nearest-exact mask, so labels never blend
and stay aligned with the image (v2's own resize would take torch's "nearest"
for masks, half an output pixel off). Pixels that rotation or down-scaling
bring in from outside the image are 255 (ignore) in the mask and the ImageNet
mean colour in the image (zero after normalising). Rotation, scale, flip and
jitter are torchvision.transforms.v2 transforms on `tv_tensors.Image` /
`tv_tensors.Mask`.

Random numbers come from torch's global generator (seed it, or let the
DataLoader seed its workers). Transforms are picklable objects, fit for
DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import RandomResizedCrop as _CropSampler

from .classes import IGNORE_INDEX
from .preprocess import IMAGENET_MEAN, resize_image, resize_mask, to_model_input

# The mean as a uint8 colour: what out-of-image pixels are filled with, so they normalise to ~0.
MEAN_COLOUR = tuple(round(255 * m) for m in IMAGENET_MEAN)


@dataclass(frozen=True)
class AugmentRecipe:
    """The training augmentation's knobs, taken by both `train_transform` and `batch_augment.BatchAugment`.

    The steps, in order, each on its own coin (a probability 0 turns a step off):
    crop a random fraction of the area (`crop_p`; `crop_scale`: (min, max) of the
    area, at the output's aspect ratio) and resize it to the output size; rotate
    (`rotate_p`; `degrees`: a bound b for [-b, b], or a (min, max) pair); zoom
    about the centre (`scale_p`; `scale`: (min, max) factor, below 1 zooms out);
    flip horizontally (`flip_p`); jitter the image's colours (`jitter_p`; `jitter`:
    (brightness, contrast, saturation, hue) as `ColorJitter` reads them). Pixels
    that a step brings in from outside its input are the mean colour in the image
    and 255 (ignore) in the mask. The defaults are the reference report's recipe.
    """

    crop_p: float = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)
    rotate_p: float = 0.7
    degrees: float | tuple[float, float] = 20.0
    scale_p: float = 0.7
    scale: tuple[float, float] = (0.8, 1.2)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.05)

    def __post_init__(self):
        for name in ("crop_p", "rotate_p", "scale_p", "flip_p", "jitter_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AugmentRecipe.{name}={getattr(self, name)}: a probability, between 0 and 1")
        # Lists (from JSON, a notebook's settings) become tuples: the recipe stays hashable and compares equal.
        for name in ("crop_scale", "degrees", "scale", "jitter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)):
                object.__setattr__(self, name, tuple(value))


class SegmentationTransform:
    """(image, mask) -> (normalised float image (3, H, W), int64 mask (H, W)).

    `image`: uint8 RGB as a numpy (H, W, 3) array, a PIL image, or a tensor
    (3, H, W) or (H, W, 3). `mask`: uint8 class indices (H, W) (255 = ignore),
    numpy or tensor, or None (then None is returned in its place).

    Steps: (1) optionally crop a random fraction (`crop_p`, `crop_scale`), and
    resize to `size` (height, width) unless `size` is None; (2) `augment`, a v2
    transform on (tv_tensors.Image, tv_tensors.Mask) or None; (3) to float and
    normalise. With `keep_mask_size` the mask skips step 1 (evaluation at the
    mask's native resolution: upsample the logits to the mask instead).
    Build one with `train_transform` or `eval_transform`.
    """

    def __init__(self, size=None, crop_p=0.0, crop_scale=(0.5, 1.0), augment=None, keep_mask_size=False):
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.crop_p = crop_p
        self.crop_scale = tuple(crop_scale)
        self.augment = augment
        self.keep_mask_size = keep_mask_size
        if keep_mask_size and (crop_p or augment is not None):
            raise ValueError("keep_mask_size is for evaluation: no crop or augmentation")

    def __call__(self, image, mask=None):
        image = _image_tensor(image)
        mask = None if mask is None else _mask_tensor(mask)
        if mask is not None and mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask {tuple(mask.shape[-2:])} and image {tuple(image.shape[-2:])} differ in size")
        height, width = image.shape[-2:]
        box = (0, 0, height, width)
        if self.crop_p and torch.rand(()) < self.crop_p:
            out_h, out_w = self.size or (height, width)
            aspect = out_w / out_h  # crops keep the output's aspect ratio: no stretching
            box = _CropSampler.get_params(image, list(self.crop_scale), [aspect, aspect])
        size = list(self.size or (box[2], box[3]))
        image = resize_image(image, size, box)
        if mask is not None and not self.keep_mask_size:
            mask = resize_mask(mask, size, box)
        if self.augment is not None:
            if mask is None:
                image = self.augment(tv_tensors.Image(image))
            else:
                image, mask = self.augment(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image = to_model_input(image.as_subclass(torch.Tensor))
        if mask is not None:
            mask = mask.as_subclass(torch.Tensor)[0].long()
        return image, mask

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, crop_p={self.crop_p}, crop_scale={self.crop_scale}, "
                f"keep_mask_size={self.keep_mask_size}, augment={self.augment})")


def train_transform(size, recipe: AugmentRecipe | None = None) -> SegmentationTransform:
    """Training augmentation at `size` (height, width), per sample: `recipe` (default `AugmentRecipe()`).

    Rotation and zoom are two torchvision affine steps, each filling what it brings in from outside.
    """
    r = recipe or AugmentRecipe()
    steps = []
    if r.rotate_p:
        steps.append(v2.RandomApply([v2.RandomAffine(degrees=r.degrees, interpolation=InterpolationMode.BILINEAR, fill=_fill())], p=r.rotate_p))
    if r.scale_p:
        steps.append(v2.RandomApply([v2.RandomAffine(degrees=0.0, scale=r.scale, interpolation=InterpolationMode.BILINEAR, fill=_fill())], p=r.scale_p))
    if r.flip_p:
        steps.append(v2.RandomHorizontalFlip(p=r.flip_p))
    if r.jitter_p:
        brightness, contrast, saturation, hue = r.jitter
        steps.append(v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=r.jitter_p))  # image only
    return SegmentationTransform(size, crop_p=r.crop_p, crop_scale=r.crop_scale, augment=v2.Compose(steps) if steps else None)


def eval_transform(size=None, keep_mask_size: bool = False) -> SegmentationTransform:
    """Deterministic: resize to `size` (height, width; None keeps the native size) and normalise.

    `keep_mask_size=True` leaves the mask at its native resolution, for
    metrics computed at full resolution.
    """
    return SegmentationTransform(size, keep_mask_size=keep_mask_size)


def to_tensors(image, mask=None):
    """(image, mask) -> (uint8 (3, H, W), uint8 (H, W)) unchanged in size: the dataset side of `batch_augment.BatchAugment`.

    Accepts what `SegmentationTransform` accepts; read-only inputs (the decode
    cache's memory-mapped views) are copied, since a batch must own its memory.
    """
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # one copy, writable
    image = _image_tensor(image)
    return image, None if mask is None else _mask_tensor(mask)[0]


def _fill():
    # A fresh dict per transform: torchvision normalises the fill dict in place.
    return {tv_tensors.Image: MEAN_COLOUR, tv_tensors.Mask: IGNORE_INDEX}


def _image_tensor(image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        array = np.ascontiguousarray(np.asarray(image))
        # PIL-backed arrays are read-only, which torch warns about; a copy is cheap next to the rest.
        image = torch.from_numpy(array if array.flags.writeable else array.copy())
        if image.ndim == 3:
            image = image.permute(2, 0, 1)
    elif image.ndim == 3 and image.shape[0] != 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3) or (3, H, W); got {tuple(image.shape)} {image.dtype}")
    return image.contiguous()


def _mask_tensor(mask) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        array = np.asarray(mask)
        mask = torch.from_numpy(array if array.flags.writeable else array.copy())
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"expected a mask (H, W); got shape {tuple(mask.shape)}")
    if mask.dtype != torch.uint8:
        if mask.numel() and (mask.min() < 0 or mask.max() > 255):
            raise ValueError("mask values outside 0..255: pass class indices (data.read_mask), not raw IDs")
        mask = mask.to(torch.uint8)
    return mask.unsqueeze(0).contiguous()
