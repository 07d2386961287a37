"""Training losses for semantic segmentation with an ignore index.

    criterion = SegmentationLoss(class_weights=scan_weights, ce_weight=1.0, dice_weight=0.5,
                                 focal_weight=1.0, boundary_weight=1.0)
    loss = criterion(logits, target)          # scalar
    parts = criterion.parts(logits, target)   # {"ce", "dice", "focal", "total"} for logging

Shared conventions:
- `logits` (N, C, H, W) and `target` (N, H, W) int64 at the same resolution;
  target pixels equal to `ignore_index` (255) contribute nothing, not even a
  gradient.
- Pixel-wise terms (cross-entropy, focal) are weighted means, normalised like
  `F.cross_entropy(weight=...)`: sum(w * loss) / sum(w) over valid pixels, where
  w = class weight of the pixel's true class x boundary pixel weight. So focal
  at gamma 0 is exactly cross-entropy, and a boundary weight moves emphasis
  towards edges without changing the loss's overall scale.
- Losses compute in float32 whatever the logits' dtype (bf16/fp16 training).

Knowledge-distillation losses belong here too, as further small classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .classes import IGNORE_INDEX


def boundary_mask(target: torch.Tensor, width: int = 3, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Boolean (N, H, W): valid pixels with a pixel of another class within `width` pixels.

    "Within" is the (2 * width + 1)-square window around the pixel. Ignored
    pixels neither are boundary pixels nor create boundaries: a class meeting an
    ignore region is not an edge we know anything about. Computed with two
    max-pools (the window's largest and smallest valid class index differ).
    """
    valid = target != ignore_index
    labels = target.unsqueeze(1).float()
    outside = float(ignore_index) + 1.0  # any value beyond the class range
    kernel = 2 * width + 1
    largest = F.max_pool2d(torch.where(valid.unsqueeze(1), labels, -1.0), kernel, stride=1, padding=width)
    smallest = -F.max_pool2d(torch.where(valid.unsqueeze(1), -labels, -outside), kernel, stride=1, padding=width)
    return (largest != smallest).squeeze(1) & valid


def boundary_weights(target: torch.Tensor, boundary_weight: float, width: int = 3, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Float (N, H, W) pixel weights: 1 + `boundary_weight` near class boundaries, 1 elsewhere."""
    return 1.0 + boundary_weight * boundary_mask(target, width, ignore_index).float()


def _pixel_weights(target, ignore_index, class_weights=None, pixel_weight=None) -> torch.Tensor:
    """Per-pixel weights: 0 at ignored pixels, class weight x pixel weight elsewhere."""
    valid = target != ignore_index
    weights = valid.float()
    if class_weights is not None:
        weights = weights * class_weights[target.where(valid, 0)]
    if pixel_weight is not None:
        weights = weights * pixel_weight
    return weights


def _class_weights_on(module: nn.Module, device: torch.device) -> torch.Tensor | None:
    """`module.class_weights` (a float32 buffer) on `device`, moved there on the first call only.

    Not `.to(device)` per call: from the host that is a blocking copy, a host sync, every loss
    call on a GPU. The buffer also moves with `module.to(device)`.
    """
    if module.class_weights is not None and module.class_weights.device != device:
        module.class_weights = module.class_weights.to(device)
    return module.class_weights


def _weighted_mean(loss_map, weights) -> torch.Tensor:
    # An all-ignored batch gives 0 (with a graph), not NaN.
    return (loss_map * weights).sum() / weights.sum().clamp_min(1e-12)


def _check_shapes(logits, target):
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits (N, C, H, W) and target (N, H, W) must agree; got {tuple(logits.shape)} and {tuple(target.shape)}")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain pixel-wise cross-entropy in float32, ignore pixels skipped: `engine.fit`'s default `loss_fn`.

    F.cross_entropy's own mean, not `CrossEntropyLoss()`: its sum runs in another order (last-bit
    differences), and a batch of only ignore pixels gives NaN here, which the training step skips
    and `engine.evaluate` leaves out of the val loss, where CrossEntropyLoss gives 0.
    """
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with class weights, ignore index and optional per-pixel weights.

    Without pixel weights this equals `F.cross_entropy(logits, target,
    weight=class_weights, ignore_index=ignore_index)`.
    """

    def __init__(self, class_weights=None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", _as_weights(class_weights), persistent=False)

    def forward(self, logits, target, pixel_weight=None):
        _check_shapes(logits, target)
        ce = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=self.ignore_index)
        class_weights = _class_weights_on(self, logits.device)
        return _weighted_mean(ce, _pixel_weights(target, self.ignore_index, class_weights, pixel_weight))


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_t) ** gamma.

    Confident, correct pixels (p_t near 1) fade out, so hard pixels and rare
    classes carry the gradient. gamma = 0 gives cross-entropy exactly (same
    class weighting and normalisation).
    """

    def __init__(self, gamma: float = 2.0, class_weights=None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", _as_weights(class_weights), persistent=False)

    def forward(self, logits, target, pixel_weight=None):
        _check_shapes(logits, target)
        ce = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=self.ignore_index)
        focal = ce
        if self.gamma:
            p_true = torch.exp(-ce)
            focal = (1.0 - p_true).clamp_min(0.0).pow(self.gamma) * ce
        class_weights = _class_weights_on(self, logits.device)
        return _weighted_mean(focal, _pixel_weights(target, self.ignore_index, class_weights, pixel_weight))


class DiceLoss(nn.Module):
    """Soft multi-class Dice loss: 1 - mean over classes of 2|P.T| / (|P| + |T|).

    P are softmax probabilities, T the one-hot target, sums over the whole
    batch and ignored pixels left out. The mean runs over the classes present
    in the batch's target (optionally weighted by `class_weights`): a class
    that is absent has no overlap to reward, and its false positives are
    already paid for by the pixel-wise terms. `smooth` keeps small classes'
    gradients finite.
    """

    def __init__(self, class_weights=None, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.register_buffer("class_weights", _as_weights(class_weights), persistent=False)

    def forward(self, logits, target):
        _check_shapes(logits, target)
        num_classes = logits.shape[1]
        valid = (target != self.ignore_index).unsqueeze(1)
        probs = logits.float().softmax(dim=1) * valid
        onehot = F.one_hot(target.where(target != self.ignore_index, 0), num_classes).permute(0, 3, 1, 2)
        onehot = onehot.to(probs.dtype) * valid
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        dice = (2.0 * intersection + self.smooth) / (cardinality + self.smooth)
        weights = (onehot.sum(dims) > 0).float()
        class_weights = _class_weights_on(self, logits.device)
        if class_weights is not None:
            weights = weights * class_weights
        return ((1.0 - dice) * weights).sum() / weights.sum().clamp_min(1e-12)


class SegmentationLoss(nn.Module):
    """Weighted sum of cross-entropy, Dice and focal terms, with optional boundary emphasis.

    total = ce_weight * CE + dice_weight * Dice + focal_weight * Focal(gamma).
    `class_weights` (e.g. the data scan's 10 floats) weight the CE and focal
    terms. `boundary_weight` > 0 multiplies the CE/focal weight of pixels within
    `boundary_width` pixels of a class boundary in the target by
    (1 + boundary_weight). Terms with weight 0 are not computed.
    """

    def __init__(
        self,
        class_weights=None,
        ce_weight: float = 1.0,
        dice_weight: float = 0.5,
        focal_weight: float = 1.0,
        gamma: float = 2.0,
        boundary_weight: float = 0.0,
        boundary_width: int = 3,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.ce_weight, self.dice_weight, self.focal_weight = ce_weight, dice_weight, focal_weight
        self.boundary_weight, self.boundary_width = boundary_weight, boundary_width
        self.ignore_index = ignore_index
        self.ce = CrossEntropyLoss(class_weights, ignore_index)
        self.dice = DiceLoss(ignore_index=ignore_index)
        self.focal = FocalLoss(gamma, class_weights, ignore_index)

    def parts(self, logits, target) -> dict[str, torch.Tensor]:
        """Each weighted-in term (unweighted value) and the weighted "total"."""
        pixel_weight = None
        if self.boundary_weight:
            pixel_weight = boundary_weights(target, self.boundary_weight, self.boundary_width, self.ignore_index)
        parts = {}
        if self.ce_weight:
            parts["ce"] = self.ce(logits, target, pixel_weight)
        if self.dice_weight:
            parts["dice"] = self.dice(logits, target)
        if self.focal_weight:
            parts["focal"] = self.focal(logits, target, pixel_weight)
        weights = {"ce": self.ce_weight, "dice": self.dice_weight, "focal": self.focal_weight}
        parts["total"] = sum((weights[k] * v for k, v in parts.items()), logits.new_zeros((), dtype=torch.float32))
        return parts

    def forward(self, logits, target):
        return self.parts(logits, target)["total"]


def _as_weights(class_weights):
    if class_weights is None:
        return None
    return torch.as_tensor(class_weights, dtype=torch.float32).flatten().clone()
