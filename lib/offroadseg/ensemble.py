"""Ensembles and test-time augmentation of anything that segments.

    ensemble = Ensemble([segformer, deeplab], weights=[0.6, 0.4])
    probs = ensemble(x)                                   # (N, 10, H, W) probabilities, not logits
    w, table = choose_weight(segformer, deeplab, val_loader)   # one pass over the loader
    tta = TestTimeAugmentation(ensemble, flips=("h", "v"))    # one batched pass per scale

Scoring any of these over a loader is `evaluate.evaluate_model`, and choosing the TTA flip set
by that score is `evaluate.choose_tta`: evaluate builds on this module (its prediction path
wraps predictors in `TestTimeAugmentation`), so this one never imports evaluate.

Conventions:
- Models (`offroadseg.models`) return logits. An `Ensemble` and a
  `TestTimeAugmentation` return probabilities and say so with the class
  attribute `returns_probs = True`; everything here that needs probabilities
  reads that attribute and applies a softmax only to callables without it.
  Evaluation only takes an argmax, so it accepts either.
- Averages are taken over probabilities (softmax outputs), never over logits:
  members trained with different losses have logits of different scales, and
  the reference report averaged softmax outputs.
- Devices and precision follow the one rule of `offroadseg.device` (`default_device`,
  `on_device`, `inference_autocast`); probabilities are computed in fp32.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_model
from .classes import NUM_CLASSES
from .device import default_device, inference_autocast, on_device
from .metrics import confusion_matrix, scores

# Test-time flips by name: the tensor dimensions each one reverses in an (N, C, H, W) batch.
FLIPS = {"h": (-1,), "v": (-2,), "hv": (-2, -1)}


def probabilities(predictor: Callable, x: torch.Tensor, size=None) -> torch.Tensor:
    """fp32 class probabilities (N, C, H, W) of `predictor(x)`, optionally resized to `size` (H, W).

    Applies a softmax unless the predictor declares `returns_probs = True`
    (an `Ensemble`, a `TestTimeAugmentation`). Logits are resized (bilinear)
    before the softmax, as the models themselves upsample their logits.
    """
    out = predictor(x).float()
    if size is not None:
        out = _resize(out, size)
    return out if getattr(predictor, "returns_probs", False) else out.softmax(dim=1)


def _resize(maps: torch.Tensor, size) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def upsampled_argmax(scores: torch.Tensor, size) -> torch.Tensor:
    """argmax over classes of fp32 `scores` (N, C, h, w) upsampled bilinearly to `size`: (N, H, W) int64.

    Logits or probabilities alike: a softmax cannot change a single model's argmax, so none is
    taken. The upsample runs on a channels-last copy: its output then holds each pixel's C scores
    side by side, and the argmax reads them contiguously (faster than upsample + argmax over NCHW,
    which strides over whole planes; the figure is in bench/RESULTS.md, "Figures moved from
    docstrings").
    """
    scores = scores.float()
    if tuple(scores.shape[-2:]) != tuple(size):
        scores = F.interpolate(scores.contiguous(memory_format=torch.channels_last), size=tuple(size),
                               mode="bilinear", align_corners=False)
    return scores.argmax(dim=1)


# ----------------------------------------------------------------------------- ensemble


class Ensemble(nn.Module):
    """Weighted average of frozen member models' softmax probabilities.

    `forward(x)` returns PROBABILITIES (N, C, H, W): sum_i w_i softmax(z_i),
    with z_i member i's logits and the weights normalised to sum to 1 (equal
    weights by default). `probs(x, temperature=T)` is the same at a softmax
    temperature, sum_i w_i softmax(z_i / T): the soft labels of distillation.

    The members are frozen (`requires_grad=False`) and always in eval mode,
    whatever `.train()` is called on the ensemble: they are fixed teachers, and
    dropout or BatchNorm statistics updates would make them drift.
    """

    returns_probs = True

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if len(members) == 0:
            raise ValueError("an ensemble needs at least one member")
        if weights is None:
            weights = [1.0] * len(members)
        weights = [float(w) for w in weights]
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} members")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"ensemble weights must be finite, non-negative and not all zero, got {weights}")
        self.members = nn.ModuleList(members)
        # Plain floats, not a buffer: they follow the members to any device for free.
        self.weights = [w / sum(weights) for w in weights]
        self.members.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_checkpoints(cls, paths: Iterable, weights: Sequence[float] | None = None,
                         map_location="cpu") -> "Ensemble":
        """An ensemble of the models saved by `engine.fit` (best.pt files)."""
        return cls([load_model(path, map_location) for path in paths], weights)

    def train(self, mode: bool = True) -> "Ensemble":
        super().train(mode)
        self.members.eval()  # frozen members keep inference behaviour (see the class docstring)
        return self

    def average(self, member_logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """sum_i w_i softmax(z_i / temperature) in fp32, for logits the caller already computed."""
        if len(member_logits) != len(self.weights):
            raise ValueError(f"{len(member_logits)} logits for {len(self.weights)} members")
        return sum(w * (z.float() / temperature).softmax(dim=1) for w, z in zip(self.weights, member_logits))

    def probs(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Weighted average of the members' softmax(logits / temperature), (N, C, H, W) fp32."""
        return self.average([member(x) for member in self.members], temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted average of the members' softmax probabilities (not logits), (N, C, H, W)."""
        return self.probs(x)


# -------------------------------------------------------------- test-time augmentation


def tta_probs(
    predictor: Callable,
    x: torch.Tensor,
    flips: Sequence[str] = ("h", "v"),
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """Probabilities averaged over the input and its flipped (and rescaled) copies.

    The views are the input itself plus one per name in `flips` ("h" horizontal,
    "v" vertical, "hv" both). All views of one scale are stacked along the
    batch dimension and run as ONE call of `predictor`, so the model sees one
    batch of (1 + len(flips)) x N images per scale; each output is flipped back
    before averaging. `scales` (e.g. (0.75, 1.0, 1.25); default (1.0,)) adds
    one batched call per scale on the input resized bilinearly, its outputs
    (logits, before the softmax) resized back to the input size.

    `predictor` returns logits (a softmax is applied to each view) or, when it
    declares `returns_probs = True` (an `Ensemble`), probabilities (averaged as
    they are). Returns fp32 probabilities (N, C, H, W). Memory grows with the
    number of views: lower the batch size rather than loop.
    """
    unknown = [f for f in flips if f not in FLIPS]
    if unknown:
        raise ValueError(f"unknown flip(s) {unknown}; use {sorted(FLIPS)}")
    if len(set(flips)) != len(flips):
        raise ValueError(f"flips {tuple(flips)} name a view twice")
    scales = tuple(scales) if scales else (1.0,)
    if any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")
    views = [()] + [FLIPS[f] for f in flips]  # () is the unflipped input
    n, size = x.shape[0], x.shape[-2:]

    total = None
    for scale in scales:
        scaled = x if scale == 1 else _resize(x, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))))
        batch = torch.cat([scaled.flip(dims) if dims else scaled for dims in views])
        probs = probabilities(predictor, batch, size)
        for index, dims in enumerate(views):
            view = probs[index * n : (index + 1) * n]
            view = view.flip(dims) if dims else view
            total = view if total is None else total + view
    return total / (len(views) * len(scales))


class TestTimeAugmentation(nn.Module):
    """A predictor wrapped with test-time flips (and scales): forward returns PROBABILITIES.

    `TestTimeAugmentation(model_or_ensemble, flips=("h", "v"), scales=None)(x)`
    is `tta_probs(model_or_ensemble, x, flips, scales)`; as a module it can be
    evaluated, timed and moved to a device like any model.
    """

    returns_probs = True
    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, model: Callable, flips: Sequence[str] = ("h", "v"), scales: Sequence[float] | None = None):
        super().__init__()
        self.model = model
        self.flips = tuple(flips)
        self.scales = tuple(scales) if scales else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_probs(self.model, x, self.flips, self.scales)


# ------------------------------------------------------------------ sliding windows


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of `window` pixels along `length` that overlap by at least `overlap`
    (a share of the window, 0 <= overlap < 1) and cover every pixel, the last one flush with the end."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if length <= window:
        return [0]
    stride = max(1, int(window * (1.0 - overlap)))
    count = math.ceil((length - window) / stride) + 1
    return sorted({min(index * stride, length - window) for index in range(count)})


def slide_probs(predictor: Callable, x: torch.Tensor, window, overlap: float = 1 / 3, batch: int = 8,
                scale: float = 1.0) -> torch.Tensor:
    """Probabilities (N, C, H, W) of `predictor` over `x` (N, 3, H, W) at its own resolution, window by window.

    MMSegmentation's "slide" inference: windows of `window` (height, width; the model's input size)
    overlapping by `overlap`, run `batch` at a time; each window's probabilities (a softmax of its
    logits, unless the predictor `returns_probs`) are added where it lies and the sum divided by the
    number of windows over each pixel. A frame smaller than the window along a side is padded there
    (the padding's predictions are dropped), so every pixel is predicted at the model's own scale.
    `scale` resizes `x` first (bilinear; e.g. to the scale the model was trained at) and the
    probabilities back to `x`'s size.
    """
    if scale != 1.0:
        size = x.shape[-2:]
        scaled = _resize(x, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))))
        return _resize(slide_probs(predictor, scaled, window, overlap, batch), size)
    n, _, height, width = x.shape
    win_h, win_w = int(window[0]), int(window[1])
    pad_h, pad_w = max(0, win_h - height), max(0, win_w - width)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    boxes = [(top, left) for top in window_starts(x.shape[-2], win_h, overlap)
             for left in window_starts(x.shape[-1], win_w, overlap)]
    total, count = None, torch.zeros(1, 1, x.shape[-2], x.shape[-1], device=x.device)
    for start in range(0, len(boxes), max(1, batch // n)):
        chunk = boxes[start:start + max(1, batch // n)]
        crops = torch.cat([x[..., top:top + win_h, left:left + win_w] for top, left in chunk])
        probs = probabilities(predictor, crops, (win_h, win_w))
        if total is None:
            total = torch.zeros(n, probs.shape[1], x.shape[-2], x.shape[-1], device=x.device)
        for index, (top, left) in enumerate(chunk):
            total[..., top:top + win_h, left:left + win_w] += probs[index * n:(index + 1) * n]
            count[..., top:top + win_h, left:left + win_w] += 1
    return (total / count)[..., :height, :width]


class SlidingWindow(nn.Module):
    """A predictor run window by window over frames at their own resolution: forward returns PROBABILITIES.

    `SlidingWindow(model, window=(512, 512), overlap=1/3)(x)` is `slide_probs(model, x, ...)`: feed it
    frames at native resolution (not resized to the model input), as `evaluate.predict_labels(...,
    input_size=None)` and a native-size loader do. Wraps any predictor: a model, an `Ensemble`, a
    `TestTimeAugmentation` (flips inside each window) or an ONNX session of the window's size.
    """

    returns_probs = True

    def __init__(self, model: Callable, window, overlap: float = 1 / 3, batch: int = 8, scale: float = 1.0):
        super().__init__()
        window_starts(1, 1, overlap)  # checks overlap now, not at the first frame
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.model = model
        self.window = (int(window[0]), int(window[1]))
        self.overlap = float(overlap)
        self.batch = batch
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return slide_probs(self.model, x, self.window, self.overlap, self.batch, self.scale)


# ------------------------------------------------------------------ choosing the blend


@torch.inference_mode()
def choose_weight(
    model_a: Callable,
    model_b: Callable,
    loader: Iterable,
    grid: Sequence[float] = np.linspace(0, 1, 11),
    device=None,
    num_classes: int = NUM_CLASSES,
) -> tuple[float, list[dict]]:
    """The weight w of member a (1 - w for b) that maximises val mIoU of w p_a + (1 - w) p_b.

    ONE pass over `loader`: each batch runs both members once, and one confusion
    matrix per grid weight is updated from the blended probabilities. So it keeps its own
    accumulation (`metrics.confusion_matrix`, `metrics.scores`) rather than calling the scorer,
    `evaluate.evaluate_model`, once per weight, which would run both members len(grid) times;
    the members run under the same rules (`device.on_device`, `inference_autocast`). Returns
    `(best_w, table)`, `table` holding {"weight", "miou", "pixel_acc"} per grid
    weight in grid order. Among equally good weights the one closest to 0.5
    wins: with no evidence either way, an even blend is the safer bet.
    """
    grid = [float(w) for w in grid]
    if not grid or any(not 0.0 <= w <= 1.0 for w in grid):
        raise ValueError(f"grid weights must lie in [0, 1], got {grid}")
    device = default_device(device)
    cms = torch.zeros(len(grid), num_classes, num_classes, dtype=torch.int64, device=device)
    with on_device(model_a, device), on_device(model_b, device):
        for images, masks in loader:
            images, masks = images.to(device), masks.to(device)
            with inference_autocast(device):
                probs_a = probabilities(model_a, images, masks.shape[-2:])
                probs_b = probabilities(model_b, images, masks.shape[-2:])
            difference = probs_a - probs_b  # w p_a + (1 - w) p_b = p_b + w (p_a - p_b)
            for index, w in enumerate(grid):
                cms[index] += confusion_matrix((probs_b + w * difference).argmax(dim=1), masks, num_classes=num_classes)
    table = []
    for w, cm in zip(grid, cms):
        result = scores(cm)
        table.append({"weight": w, "miou": result["miou"], "pixel_acc": result["pixel_acc"]})

    def rank(row):
        miou = row["miou"] if not math.isnan(row["miou"]) else -math.inf
        return (miou, -abs(row["weight"] - 0.5))

    return max(table, key=rank)["weight"], table
