"""The training augmentation on whole batches, on the batch's device: `augment.AugmentRecipe`'s batch path.

    images, masks = next(iter(loader))                    # uint8 (B, 3, H, W), (B, H, W): `augment.to_tensors`
    x, y = BatchAugment((180, 320), recipe)(images.to(device), masks.to(device))

Per-sample augmentation in the DataLoader workers is what starves a GPU; here the
workers only hand over uint8 crops of the decode cache and the device crops,
rotates, zooms, flips, resizes, jitters and normalises the batch. `train_transform`
(per sample) is the reference: same recipe, same geometry and fills, within a
pixel or a grey level (tests/test_batch_augment.py compares the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .augment import MEAN_COLOUR, AugmentRecipe
from .classes import IGNORE_INDEX
from .preprocess import device_constant, normalize


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
    """`train_transform`'s augmentation on whole batches on their device: same recipe, steps and fills.

    `(images uint8 (B, 3, H, W), masks (B, H, W) uint8 or int64) -> (normalised
    float32 (B, 3, h, w), int64 masks (B, h, w))`, with (h, w) = `size` (None
    keeps the input size); `recipe` as `train_transform` takes it (default
    `AugmentRecipe()`).

    Each sample's crop box, resize, rotation, scale and flip compose into one
    affine map, sampled once with `grid_sample`: bilinear for the image,
    nearest for the mask from the same grid, so the two stay aligned. As in
    the CPU path, what a step brings in from outside its input is the mean
    colour in the image and 255 in the mask: pixels from outside the (cropped)
    frame, and, where a zoom-out follows a rotation, pixels from outside the
    rotated frame too. (The CPU path rotates, filling the corners, then zooms
    out and fills around that: one map alone would reach past the rotated
    frame's edge into input the CPU path has already filled.) Colour jitter
    follows per sample in ColorJitter's random order, with hue shifted
    through HSV.

    Differences from the CPU path (whose crop and resize is `preprocess`'s rule, the one every
    model input follows), all within a pixel or a grey level: one
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

    def __init__(self, size=None, recipe: AugmentRecipe | None = None, antialias: bool = True):
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.recipe = recipe or AugmentRecipe()
        self.antialias = antialias
        # The recipe's bounds as (low, high) spans, read as torchvision reads them.
        self.degrees = _span(self.recipe.degrees, 0.0)
        brightness, contrast, saturation, hue = self.recipe.jitter
        self.jitter = (_span(brightness, 1.0, floor=0.0), _span(contrast, 1.0, floor=0.0),
                       _span(saturation, 1.0, floor=0.0), _span(hue, 0.0))

    def __call__(self, images: torch.Tensor, masks: torch.Tensor):
        return self.apply(images, masks, self.sample(images.shape[0], *images.shape[-2:]))

    def sample(self, batch: int, height: int, width: int) -> AugmentParams:
        """Random parameters for `batch` inputs of `height` x `width` (CPU tensors)."""
        out_h, out_w = self.size or (height, width)
        r = self.recipe

        def coin(p):
            return torch.rand(batch) < p

        def uniform(span):
            low, high = span
            return low + (high - low) * torch.rand(batch)

        # RandomResizedCrop.get_params with the output's aspect ratio (no stretching).
        area = height * width * uniform(r.crop_scale)
        aspect = out_w / out_h
        crop_w, crop_h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        fits = (crop_w <= width) & (crop_h <= height)
        largest = min(width, height * aspect)
        crop_w = torch.where(fits, crop_w, round(largest))
        crop_h = torch.where(fits, crop_h, round(largest / aspect))
        top = (torch.rand(batch) * (height - crop_h + 1)).floor()
        left = (torch.rand(batch) * (width - crop_w + 1)).floor()
        crop = coin(r.crop_p)
        whole = torch.tensor([0.0, 0.0, height, width])
        box = torch.where(crop[:, None], torch.stack([top, left, crop_h, crop_w], 1), whole)
        rotate, zoom, flip, jitter = coin(r.rotate_p), coin(r.scale_p), coin(r.flip_p), coin(r.jitter_p)
        brightness, contrast, saturation, hue = (uniform(span) for span in self.jitter)
        return AugmentParams(
            box=box,
            angle=torch.where(rotate, uniform(self.degrees), 0.0),
            scale=torch.where(zoom, uniform(r.scale), 1.0),
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

        # Output pixel -> the rotated frame before the zoom ("rotated"), centred, in its pixels: undo the
        # flip, then the zoom about the centre. -> the resized crop ("frame"): undo the rotation about the
        # centre too (torchvision's inverse affine, no shear).
        mirror = torch.where(p.flip, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 1, 1] = mirror * out_w / 2 / p.scale.float(), out_h / 2 / p.scale.float()
        rotated = F.affine_grid(theta, [batch, 1, out_h, out_w], align_corners=False)  # (B, h, w, 2)
        radians = p.angle.float() * (math.pi / 180)
        cos, sin = radians.cos()[:, None, None], radians.sin()[:, None, None]
        rotated_x, rotated_y = rotated.unbind(-1)
        frame = torch.stack([cos * rotated_x + sin * rotated_y, cos * rotated_y - sin * rotated_x], -1)
        # Frame -> input, in grid_sample's [-1, 1] coordinates (align_corners=False).
        stretch = torch.stack([crop_w / out_w, crop_h / out_h], 1)  # input pixels per frame pixel
        per_pixel = device_constant((2.0 / width, 2.0 / height), torch.float32, device)
        centre = torch.stack([left + crop_w / 2, top + crop_h / 2], 1) * per_pixel - 1
        grid = frame * (stretch * per_pixel)[:, None, None] + centre[:, None, None]

        # Outside the frame (what the rotation brings in), or outside the rotated frame (what a zoom-out
        # brings in around it): filled, as the CPU path's two affine steps each fill their own.
        inside, weight = _within(frame, out_h, out_w)
        inside_rotated, weight_rotated = _within(rotated, out_h, out_w)
        inside &= inside_rotated
        weight *= weight_rotated

        # Nudged by 1/128 pixel so that exact ties round up, as "nearest-exact" does (grid_sample rounds to even).
        nudge = per_pixel / 128
        labels = F.grid_sample(masks[:, None].float(), grid + nudge, mode="nearest", padding_mode="border",
                               align_corners=False)[:, 0]
        labels = torch.where(inside, labels.round().long(), IGNORE_INDEX)

        fill = device_constant(tuple(c / 255 for c in MEAN_COLOUR), torch.float32, device).view(1, 3, 1, 1)
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
        return f"{type(self).__name__}(size={self.size}, recipe={self.recipe}, antialias={self.antialias})"


def _within(points: torch.Tensor, height: int, width: int):
    """(inside, weight) of centred pixel coordinates `points` (B, h, w, 2) in a `height` x `width` frame.

    As torchvision's fill decides it: `inside` where the nearest pixel is in the frame (the mask's
    test), `weight` a one-pixel bilinear ramp from 1 inside to 0 outside (the image's blend to the fill).
    """
    x = points[..., 0] + (width - 1) / 2
    y = points[..., 1] + (height - 1) / 2
    inside = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    weight = torch.minimum(x + 1, width - x).clamp(0, 1) * torch.minimum(y + 1, height - y).clamp(0, 1)
    return inside, weight


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
    k = (device_constant((5.0, 3.0, 1.0), image.dtype, image.device).view(1, 3, 1, 1) + sixths[:, None]) % 6
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


