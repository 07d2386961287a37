"""Which images to label next: unlabelled images ranked by how unsure the model is about them.

    dataset = SegmentationDataset(test_pairs, eval_transform((180, 320)))
    rows = rank_by_uncertainty(model, dataset, measure="entropy")
    write_ranking_csv(rows, run / "uncertainty.csv")
    plots.save(uncertainty_figure(rows, dataset, model), run / "figures" / "uncertainty.png")

Per-pixel measures, from the softmax p over the classes; an image's score is
their mean over all its pixels (masks, if any, are not used):

- "entropy": -sum_c p_c log p_c in nats; 0 when one class takes all the
  probability, log(10) ~ 2.303 for a uniform prediction over ten classes. It
  weighs the whole distribution.
- "margin": 1 - (p1 - p2), p1 and p2 the two largest probabilities; 0 when
  the model is certain, 1 when its top two classes tie. It looks only at the
  decision the model is torn over (active learning's "margin sampling").

Each row also carries the predicted pixel share of every class and the class
whose predicted pixels hold the most uncertainty in total (summed, not
averaged, so that a few stray pixels do not outrank a large doubtful region):
what a labeller should look at first.
"""

from __future__ import annotations

import csv
import io
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .classes import CLASS_NAMES
from .device import on_device
from .evaluate import predict_labels
from .files import write_bytes
from .plots import legend_handles, overlay
from .preprocess import denormalize

MEASURES = ("entropy", "margin")
# The CSV's fixed columns, then one "share:<class>" column per class.
CSV_COLUMNS = ("rank", "stem", "score", "measure", "uncertain_class", "image", "index")
SHARE_PREFIX = "share:"


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax over dim 1: (N, C, H, W) -> (N, H, W).

    Logits or log-probabilities alike (log_softmax of log-probabilities is themselves).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    # log_softmax stays finite where softmax underflows to 0, so p * log p is 0 there, never NaN.
    return -(log_p.exp() * log_p).sum(dim=1)


def pixel_margin(logits: torch.Tensor) -> torch.Tensor:
    """1 - (p1 - p2), the gap between the two most likely classes: (N, C, H, W) -> (N, H, W)."""
    top2 = F.softmax(logits.float(), dim=1).topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def pixel_uncertainty(logits: torch.Tensor, measure: str = "entropy") -> torch.Tensor:
    """Per-pixel uncertainty by `measure` ("entropy" or "margin"): (N, C, H, W) -> (N, H, W)."""
    if measure == "entropy":
        return pixel_entropy(logits)
    if measure == "margin":
        return pixel_margin(logits)
    raise ValueError(f"measure must be one of {MEASURES}, not {measure!r}")


def measure_range(measure: str, num_classes: int = len(CLASS_NAMES)) -> tuple[float, float]:
    """The values `measure` can take: (0, log C) for entropy, (0, 1) for margin."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, not {measure!r}")
    return (0.0, math.log(num_classes)) if measure == "entropy" else (0.0, 1.0)


def _images_of(batch) -> torch.Tensor:
    """The image batch of a loader item: (images, masks, ...) or images alone."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _describe(dataset, index: int) -> tuple[str, str | None]:
    """(stem, image path or None) of item `index`; plain sequences get their index as stem."""
    stem = dataset.stem(index) if hasattr(dataset, "stem") else str(index)
    pairs = getattr(dataset, "pairs", None)
    return stem, (str(pairs[index][0]) if pairs is not None else None)


def _image_rows(logits: torch.Tensor, measure: str, class_names) -> list[dict]:
    """Score, class shares and most uncertain class of each image in a batch of logits."""
    n, c = logits.shape[:2]
    uncertainty = pixel_uncertainty(logits, measure).flatten(1)  # (N, pixels)
    predicted = logits.argmax(dim=1).flatten(1)
    pixels = predicted.shape[1]
    counts = torch.zeros(n, c, device=logits.device).scatter_add_(1, predicted, torch.ones_like(uncertainty))
    uncertainty_by_class = torch.zeros(n, c, device=logits.device).scatter_add_(1, predicted, uncertainty)
    scores = uncertainty.mean(dim=1).cpu().tolist()
    shares = (counts / pixels).cpu().tolist()
    worst = uncertainty_by_class.argmax(dim=1).cpu().tolist()
    return [
        {
            "measure": measure,
            "score": score,
            "uncertain_class": class_names[w],
            "class_share": dict(zip(class_names, share)),
        }
        for score, share, w in zip(scores, shares, worst)
    ]


def rank_by_uncertainty(
    model: nn.Module,
    dataset,
    batch_size: int = 8,
    measure: str = "entropy",
    device=None,
    num_workers: int = 0,
    progress: bool = False,
    class_names=CLASS_NAMES,
) -> list[dict]:
    """Score every image of `dataset` by the model's mean pixel uncertainty; most uncertain first.

    `dataset` yields normalised images (or (image, mask) pairs) as the model
    expects them, e.g. a `SegmentationDataset` with `eval_transform(size)`.
    The model runs through `evaluate.predict_labels` (inference precision rule,
    eval mode), on `device` (default: the model's own), and is left where and
    as it was. A predictor returning probabilities (TTA, an ensemble) works too.
    Rows: {"rank" (1 = most uncertain), "index" (in `dataset`), "stem",
    "image" (path, None for datasets without `pairs`), "measure", "score",
    "uncertain_class", "class_share" {class name: predicted pixel share}}.
    Ties keep dataset order.
    """
    pixel_uncertainty(torch.zeros(1, 2, 1, 1), measure)  # reject an unknown measure before any work
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if progress:
        loader = tqdm(loader, desc=f"uncertainty ({measure})", leave=False)
    rows = []
    with on_device(model, device):
        for batch in loader:
            _, log_probs = predict_labels(model, _images_of(batch), return_log_probs=True)
            for row in _image_rows(log_probs, measure, list(class_names)):
                index = len(rows)
                stem, image = _describe(dataset, index)
                rows.append({"index": index, "stem": stem, "image": image, **row})
    rows.sort(key=lambda row: (-row["score"], row["index"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


# ----------------------------------------------------------------------------- CSV


def write_ranking_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Write the ranking as CSV, atomically: the fixed columns, then one share column per class."""
    class_names = list(rows[0]["class_share"]) if rows else list(CLASS_NAMES)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(SHARE_PREFIX + name for name in class_names)])
    for rank, row in enumerate(rows, start=1):
        writer.writerow([
            row.get("rank", rank),
            row["stem"],
            repr(float(row["score"])),  # repr: the shortest text that reads back to the same float
            row["measure"],
            row["uncertain_class"],
            "" if row.get("image") is None else row["image"],
            row["index"],
            *(repr(float(row["class_share"][name])) for name in class_names),
        ])
    write_bytes(path, text.getvalue().encode("utf-8"))


# ----------------------------------------------------------------------------- figure


def uncertainty_figure(rows: list[dict], dataset, model: nn.Module, top: int = 4, device=None):
    """The `top` most uncertain images: image, prediction overlay, per-pixel uncertainty map.

    The model is run again on each image (from `dataset` by the row's index, through
    `evaluate.predict_labels` as the ranking was), so the maps match the ranking's measure. Returns the Figure; save it with `plots.save`.
    """
    if not rows:
        raise ValueError("no rows to show")
    shown = rows[:top]
    measure = shown[0]["measure"]
    low, high = measure_range(measure)
    fig, axes = plt.subplots(len(shown), 3, figsize=(12, 2.4 * len(shown) + 0.7), squeeze=False)
    with on_device(model, device):
        for (image_ax, pred_ax, map_ax), row in zip(axes, shown):
            image = _images_of(dataset[row["index"]])
            (prediction,), log_probs = predict_labels(model, image.unsqueeze(0), return_log_probs=True)
            uncertainty = pixel_uncertainty(log_probs, measure)[0].cpu().numpy()
            rgb = (denormalize(image.float()).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
            image_ax.imshow(rgb)
            image_ax.set_title(f"#{row.get('rank', '?')} {row['stem']}", fontsize=8)
            pred_ax.imshow(overlay(rgb, prediction))
            pred_ax.set_title(f"prediction (most doubt: {row['uncertain_class']})", fontsize=8)
            heat = map_ax.imshow(uncertainty, cmap="magma", vmin=low, vmax=high)
            map_ax.set_title(f"{measure}, mean {row['score']:.3f}", fontsize=8)
            fig.colorbar(heat, ax=map_ax, fraction=0.046, pad=0.02)
            for ax in (image_ax, pred_ax, map_ax):
                ax.axis("off")
    fig.legend(handles=legend_handles(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"Most uncertain images ({measure})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
