"""Joint image + mask transforms: training augmentation and plain evaluation resizing.

    transform = train_transform(size=(180, 320))      # (height, width) the model sees
    image, mask = transform(image_uint8_hwc, mask_uint8_hw)
    # image: float32 (3, 180, 320), ImageNet-normalised; mask: int64 (180, 320), 255 = ignore

Training augmentation (the reference report's recipe, each step on its own coin):
random crop of a random fraction of the image (p=0.5, 50-100% of the area,
the output's aspect ratio) resized to `size`; rotation within +-20 degrees
(p=0.7); scale 0.8-1.2 (p=0.7); horizontal flip (p=0.5); colour jitter
(brightness, contrast, saturation 0.3, hue 0.05; p=0.8) on the image only.

Alignment rules: the image is interpolated bilinearly (antialiased when
shrinking), the mask by nearest neighbour, so labels never blend; pixels that
rotation or down-scaling bring in from outside the image are 255 (ignore) in
the mask and the ImageNet mean colour in the image (zero after normalising).
Rotation, scale, flip and jitter are torchvision.transforms.v2 transforms on
`tv_tensors.Image` / `tv_tensors.Mask`. The crop-and-resize step is done here
instead: for masks v2's resize uses torch's "nearest", which samples the
top-left source pixel of each output cell and so shifts labels by up to half an
output pixel against the bilinear image; "nearest-exact" samples the cell's
centre and keeps the two aligned.

Random numbers come from torch's global generator (seed it, or let the
DataLoader seed its workers). Transforms are picklable objects, fit for
DataLoader workers.

The same augmentation on whole batches, on the batch's device (a GPU frees the
DataLoader workers from it): the dataset yields uint8 tensors at the cache size
(`to_tensors`), and `BatchAugment(size)` crops, rotates, scales, flips,
resizes, jitters and normalises the batch:

    images, masks = next(iter(loader))                    # uint8 (B, 3, H, W), (B, H, W)
    x, y = BatchAugment((180, 320))(images.to(device), masks.to(device))
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import RandomResizedCrop as _CropSampler
from torchvision.transforms.v2 import functional as TF

from .classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean as a uint8 colour: what out-of-image pixels are filled with, so they normalise to ~0.
_MEAN_COLOUR = tuple(round(255 * m) for m in IMAGENET_MEAN)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on `device`, made there once: `torch.tensor(..., device=cuda)` is a
    blocking host-to-device copy, a host sync, every time. Read-only (never modify it in place)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting: pinned, then copied with non_blocking.

    A plain `.to(cuda)` from pageable memory blocks until the GPU has done all queued work.
    (The pinned buffer is not reused before the copy is done: torch's pinned-memory allocator
    records the copy.)
    """
    device = torch.device(device)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Float image(s) in [0, 1], shape (..., 3, H, W) -> ImageNet-normalised."""
    mean = _constant(IMAGENET_MEAN, image.dtype, image.device).view(3, 1, 1)
    std = _constant(IMAGENET_STD, image.dtype, image.device).view(3, 1, 1)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`: back to [0, 1] (not clamped), shape (..., 3, H, W)."""
    mean = _constant(IMAGENET_MEAN, image.dtype, image.device).view(3, 1, 1)
    std = _constant(IMAGENET_STD, image.dtype, image.device).view(3, 1, 1)
    return image * std + mean


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
        if box != (0, 0, height, width) or size != [height, width]:
            image = TF.resized_crop(image, *box, size, InterpolationMode.BILINEAR, antialias=True)
            if mask is not None and not self.keep_mask_size:
                # A plain tensor takes the image path, where "nearest-exact" is honoured (see module doc).
                mask = TF.resized_crop(mask, *box, size, InterpolationMode.NEAREST_EXACT)
        if self.augment is not None:
            if mask is None:
                image = self.augment(tv_tensors.Image(image))
            else:
                image, mask = self.augment(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image = normalize(TF.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True))
        if mask is not None:
            mask = mask.as_subclass(torch.Tensor)[0].long()
        return image, mask

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, crop_p={self.crop_p}, crop_scale={self.crop_scale}, "
                f"keep_mask_size={self.keep_mask_size}, augment={self.augment})")


def train_transform(
    size,
    crop_p: float = 0.5,
    crop_scale=(0.5, 1.0),
    rotate_p: float = 0.7,
    degrees=20.0,
    scale_p: float = 0.7,
    scale=(0.8, 1.2),
    flip_p: float = 0.5,
    jitter_p: float = 0.8,
    jitter=(0.3, 0.3, 0.3, 0.05),
) -> SegmentationTransform:
    """Training augmentation at `size` (height, width); every probability can be set to 0.

    `degrees` is a bound (rotation in [-degrees, degrees]) or a (min, max)
    pair; `scale` a (min, max) zoom; `jitter` (brightness, contrast,
    saturation, hue) as in `ColorJitter`.
    """
    steps = []
    if rotate_p:
        steps.append(v2.RandomApply([v2.RandomAffine(degrees=degrees, interpolation=InterpolationMode.BILINEAR, fill=_fill())], p=rotate_p))
    if scale_p:
        steps.append(v2.RandomApply([v2.RandomAffine(degrees=0.0, scale=scale, interpolation=InterpolationMode.BILINEAR, fill=_fill())], p=scale_p))
    if flip_p:
        steps.append(v2.RandomHorizontalFlip(p=flip_p))
    if jitter_p:
        brightness, contrast, saturation, hue = jitter
        steps.append(v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p))  # image only
    return SegmentationTransform(size, crop_p=crop_p, crop_scale=crop_scale, augment=v2.Compose(steps) if steps else None)


def eval_transform(size=None, keep_mask_size: bool = False) -> SegmentationTransform:
    """Deterministic: resize to `size` (height, width; None keeps the native size) and normalise.

    `keep_mask_size=True` leaves the mask at its native resolution, for
    metrics computed at full resolution.
    """
    return SegmentationTransform(size, keep_mask_size=keep_mask_size)


def to_tensors(image, mask=None):
    """(image, mask) -> (uint8 (3, H, W), uint8 (H, W)) unchanged in size: the dataset side of `BatchAugment`.

    Accepts what `SegmentationTransform` accepts; read-only inputs (the decode
    cache's memory-mapped views) are copied, since a batch must own its memory.
    """
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # one copy, writable
    image = _image_tensor(image)
    return image, None if mask is None else _mask_tensor(mask)[0]


# ColorJitter's operations, numbered as `AugmentParams.order` lists them.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class AugmentParams:
    """One batch's random draws, one row per sample (tensors of length B).

    `box`: (B, 4) crop top, left, height, width in input pixels (the whole input
    when not cropped); `angle`: degrees, positive clockwise as in torchvision's
    affine; `scale`: zoom factor; `flip`: horizontal flip; `jitter`: whether colour
    jitter applies; `brightness`, `contrast`, `saturation`: factors (1 = unchanged);
    `hue`: shift in turns; `order`: (B, 4) the jitter operations' order, a
    permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE) as ColorJitter draws it.
    """

    box: torch.Tensor
    angle: torch.Tensor
    scale: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor

    def to(self, device) -> AugmentParams:
        """On `device`, copied from pinned memory without blocking the host (see `_to_device`)."""
        return AugmentParams(**{f.name: _to_device(getattr(self, f.name), device) for f in fields(self)})


class BatchAugment:
    """`train_transform`'s augmentation on whole batches on their device: same steps, probabilities and fills.

    `(images uint8 (B, 3, H, W), masks (B, H, W) uint8 or int64) -> (normalised
    float32 (B, 3, h, w), int64 masks (B, h, w))`, with (h, w) = `size` (None
    keeps the input size). Parameters and defaults are `train_transform`'s.

    Each sample's crop box, resize, rotation, scale and flip compose into one
    affine map, sampled once with `grid_sample`: bilinear for the image,
    nearest for the mask from the same grid, so the two stay aligned. As in
    the CPU path, pixels from outside the (cropped) frame are the mean colour
    in the image and 255 in the mask. Colour jitter follows per sample in
    ColorJitter's random order, with hue shifted through HSV.

    Differences from the CPU path, all within a pixel or a grey level: one
    resampling instead of up to three (slightly sharper, and mask labels at
    class edges can differ where two nearest-neighbour steps rounded
    differently); antialiasing when shrinking approximates the triangle filter
    by averaging four bilinear taps of the same spread (`antialias=True`); the
    jitter works in float rather than rounding to uint8 after each step; a
    crop too large for the input's aspect shrinks to the largest that fits
    (at a random place), where torchvision redraws up to ten times and then
    takes a centred crop.

    Random draws come from torch's global CPU generator whatever the device,
    so `torch.manual_seed` fixes them on CPU and GPU alike. `sample` and
    `apply` are separate so that tests (or a replay) can pass fixed parameters.
    """

    def __init__(self, size=None, crop_p: float = 0.5, crop_scale=(0.5, 1.0), rotate_p: float = 0.7, degrees=20.0,
                 scale_p: float = 0.7, scale=(0.8, 1.2), flip_p: float = 0.5, jitter_p: float = 0.8,
                 jitter=(0.3, 0.3, 0.3, 0.05), antialias: bool = True):
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.crop_p, self.crop_scale = crop_p, tuple(crop_scale)
        self.rotate_p, self.degrees = rotate_p, _span(degrees, 0.0)
        self.scale_p, self.scale = scale_p, tuple(scale)
        self.flip_p = flip_p
        self.jitter_p = jitter_p
        brightness, contrast, saturation, hue = jitter
        self.jitter = (_span(brightness, 1.0, floor=0.0), _span(contrast, 1.0, floor=0.0),
                       _span(saturation, 1.0, floor=0.0), _span(hue, 0.0))
        self.antialias = antialias

    def __call__(self, images: torch.Tensor, masks: torch.Tensor):
        return self.apply(images, masks, self.sample(images.shape[0], *images.shape[-2:]))

    def sample(self, batch: int, height: int, width: int) -> AugmentParams:
        """Random parameters for `batch` inputs of `height` x `width` (CPU tensors)."""
        out_h, out_w = self.size or (height, width)

        def coin(p):
            return torch.rand(batch) < p

        def uniform(span):
            low, high = span
            return low + (high - low) * torch.rand(batch)

        # RandomResizedCrop.get_params with the output's aspect ratio (no stretching).
        area = height * width * uniform(self.crop_scale)
        aspect = out_w / out_h
        crop_w, crop_h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        fits = (crop_w <= width) & (crop_h <= height)
        largest = min(width, height * aspect)
        crop_w = torch.where(fits, crop_w, round(largest))
        crop_h = torch.where(fits, crop_h, round(largest / aspect))
        top = (torch.rand(batch) * (height - crop_h + 1)).floor()
        left = (torch.rand(batch) * (width - crop_w + 1)).floor()
        crop = coin(self.crop_p)
        whole = torch.tensor([0.0, 0.0, height, width])
        box = torch.where(crop[:, None], torch.stack([top, left, crop_h, crop_w], 1), whole)
        rotate, zoom, flip, jitter = coin(self.rotate_p), coin(self.scale_p), coin(self.flip_p), coin(self.jitter_p)
        brightness, contrast, saturation, hue = (uniform(span) for span in self.jitter)
        return AugmentParams(
            box=box,
            angle=torch.where(rotate, uniform(self.degrees), 0.0),
            scale=torch.where(zoom, uniform(self.scale), 1.0),
            flip=flip,
            jitter=jitter,
            brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
            order=torch.rand(batch, 4).argsort(dim=1),
        )

    def apply(self, images: torch.Tensor, masks: torch.Tensor, params: AugmentParams):
        """Augment with the given parameters; see the class doc."""
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (B, 3, H, W); got {tuple(images.shape)} {images.dtype}")
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        batch, _, height, width = images.shape
        out_h, out_w = self.size or (height, width)
        device = images.device
        p = params.to(device)
        top, left, crop_h, crop_w = p.box.float().unbind(1)

        # Output pixel -> the resized crop ("frame"), centred, in its pixels: undo the flip,
        # then the rotation and scale about the centre (torchvision's inverse affine, no shear).
        radians = p.angle.float() * (math.pi / 180)
        cos, sin = radians.cos() / p.scale.float(), radians.sin() / p.scale.float()
        mirror = torch.where(p.flip, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 1] = cos * mirror * out_w / 2, sin * out_h / 2
        theta[:, 1, 0], theta[:, 1, 1] = -sin * mirror * out_w / 2, cos * out_h / 2
        frame = F.affine_grid(theta, [batch, 1, out_h, out_w], align_corners=False)  # (B, h, w, 2)
        # Frame -> input, in grid_sample's [-1, 1] coordinates (align_corners=False).
        stretch = torch.stack([crop_w / out_w, crop_h / out_h], 1)  # input pixels per frame pixel
        per_pixel = _constant((2.0 / width, 2.0 / height), torch.float32, device)
        centre = torch.stack([left + crop_w / 2, top + crop_h / 2], 1) * per_pixel - 1
        grid = frame * (stretch * per_pixel)[:, None, None] + centre[:, None, None]

        # Frame coordinates in pixel indices decide what lies outside the frame, as torchvision's fill does:
        # nearest for the mask, a one-pixel bilinear ramp to the fill colour for the image.
        frame_x = frame[..., 0] + (out_w - 1) / 2
        frame_y = frame[..., 1] + (out_h - 1) / 2
        inside = (frame_x >= -0.5) & (frame_x < out_w - 0.5) & (frame_y >= -0.5) & (frame_y < out_h - 0.5)
        weight = (torch.minimum(frame_x + 1, out_w - frame_x).clamp(0, 1)
                  * torch.minimum(frame_y + 1, out_h - frame_y).clamp(0, 1))

        # Nudged by 1/128 pixel so that exact ties round up, as "nearest-exact" does (grid_sample rounds to even).
        nudge = per_pixel / 128
        labels = F.grid_sample(masks[:, None].float(), grid + nudge, mode="nearest", padding_mode="border",
                               align_corners=False)[:, 0]
        labels = torch.where(inside, labels.round().long(), IGNORE_INDEX)

        fill = _constant(tuple(c / 255 for c in _MEAN_COLOUR), torch.float32, device).view(1, 3, 1, 1)
        image = images.float().div_(255).sub_(fill)
        # Whether any sample shrinks is read from the CPU parameters: no GPU sync.
        shrinks = bool(((params.box[:, 2] > out_h) | (params.box[:, 3] > out_w)).any())
        image = fill + weight[:, None] * self._sample_image(image, grid, stretch, per_pixel, shrinks)
        if params.jitter.any():
            image = _colour_jitter(image, params, p)
        return normalize(image), labels

    def _sample_image(self, image, grid, stretch, per_pixel, shrinks: bool):
        """Bilinear sampling; when shrinking, the mean of four taps spread to match the CPU path's antialiasing.

        An antialiased resize by a factor s > 1 filters with a triangle of half-width
        s input pixels (variance s^2/6); one bilinear tap has variance 1/6, so the
        mean of taps at +-d with d^2 = (s^2 - 1)/6 per axis has the same spread.
        `stretch` (B, 2) is s per axis, `per_pixel` one input pixel in grid units.
        """
        if not (self.antialias and shrinks):
            return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        spread = ((stretch**2 - 1).clamp(min=0) / 6).sqrt() * per_pixel
        offsets = [spread * spread.new_tensor([sx, sy]) for sx in (-1, 1) for sy in (-1, 1)]
        taps = torch.cat([grid + offset[:, None, None] for offset in offsets], dim=1)
        out_h = grid.shape[1]
        sampled = F.grid_sample(image, taps, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.unflatten(2, (4, out_h)).mean(dim=2)

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, crop_p={self.crop_p}, crop_scale={self.crop_scale}, "
                f"rotate_p={self.rotate_p}, degrees={self.degrees}, scale_p={self.scale_p}, scale={self.scale}, "
                f"flip_p={self.flip_p}, jitter_p={self.jitter_p}, jitter={self.jitter}, antialias={self.antialias})")


def _span(value, centre: float, floor: float | None = None) -> tuple[float, float]:
    """A bound b as (centre - b, centre + b), as torchvision reads it, or a (low, high) pair as is."""
    if isinstance(value, (int, float)):
        low, high = centre - value, centre + value
        return (low if floor is None else max(floor, low), high)
    low, high = value
    return float(low), float(high)


def _grey(image: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) with torchvision's weights."""
    r, g, b = image.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def _shift_hue(image: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by `turns` (B,) through HSV; saturation and value are kept."""
    r, g, b = image.unbind(1)
    value, channel = image.max(dim=1)
    chroma = value - image.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, 1.0)
    # Hue in sixths of a turn, from the channel that holds the maximum.
    sixths = torch.where(channel == 0, ((g - b) / safe) % 6,
                         torch.where(channel == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    sixths = (sixths + 6 * turns.view(-1, 1, 1)) % 6
    # HSV -> RGB: channel n (5, 3, 1 for R, G, B) is v - c * clamp(min(k, 4 - k), 0, 1), k = (n + hue) mod 6.
    k = (_constant((5.0, 3.0, 1.0), image.dtype, image.device).view(1, 3, 1, 1) + sixths[:, None]) % 6
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _colour_jitter(image: torch.Tensor, params: AugmentParams, on_device: AugmentParams) -> torch.Tensor:
    """ColorJitter per sample, in each sample's own order; samples without jitter are left untouched.

    At each of the four steps the samples whose step is the same operation go
    through it together. Selection happens on the CPU parameters `params` (no GPU
    sync); the chosen indices travel to the device in one non-blocking copy, and
    the factors are taken from `on_device`, the same parameters already there.
    """
    order, jitter = params.order.cpu(), params.jitter.cpu()
    groups = [(op, (jitter & (order[:, step] == op)).nonzero()[:, 0]) for step in range(4) for op in range(4)]
    groups = [(op, chosen) for op, chosen in groups if chosen.numel()]
    if not groups:
        return image
    indices = _to_device(torch.cat([chosen for _, chosen in groups]), image.device)
    factors = {BRIGHTNESS: on_device.brightness, CONTRAST: on_device.contrast,
               SATURATION: on_device.saturation, HUE: on_device.hue}
    for (op, _), chosen in zip(groups, indices.split([len(chosen) for _, chosen in groups])):
        factor = factors[op][chosen].to(torch.float32).view(-1, 1, 1, 1)
        x = image[chosen]
        if op == BRIGHTNESS:
            x = factor * x
        elif op == CONTRAST:
            x = factor * x + (1 - factor) * _grey(x).mean(dim=(-2, -1), keepdim=True)
        elif op == SATURATION:
            x = factor * x + (1 - factor) * _grey(x)
        else:
            x = _shift_hue(x, factor.view(-1))
        image[chosen] = x.clamp(0, 1)
    return image


def _fill():
    # A fresh dict per transform: torchvision normalises the fill dict in place.
    return {tv_tensors.Image: _MEAN_COLOUR, tv_tensors.Mask: IGNORE_INDEX}


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
