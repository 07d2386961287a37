"""Segmentation metrics from a streaming confusion matrix.

`confusion_matrix` accumulates on whatever device the tensors live on (CPU or
GPU), so evaluation never copies full prediction maps to the host; add the
matrices of successive batches (and all-reduce them across processes).

Conventions (stated because papers and repos differ):
- rows are truth, columns prediction; ignore-index pixels are dropped first;
- IoU_c = TP / (TP + FP + FN). A class absent from both truth and prediction
  has an undefined IoU: it is NaN and left out of the mean (mIoU is a nanmean
  over the classes that occur). A class present in truth but never predicted
  scores 0, and one predicted but absent from truth scores 0 too;
- pixel accuracy = trace / total; mean class accuracy = mean over classes
  present in truth of TP / (TP + FN);
- Dice_c = 2 TP / (2 TP + FP + FN) (F1), with the same NaN rule.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES


def confusion_matrix(pred, target, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts of (truth, prediction) pixel pairs.

    `pred` and `target` are integer class maps of the same shape (any number of
    dimensions, tensors or numpy arrays). Pixels whose target is `ignore_index`
    are skipped. A prediction outside [0, num_classes) is an error, not a silent
    drop: it means the model and the metric disagree on the classes.
    """
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target, device=pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target holds values outside 0..{num_classes - 1} (and not the ignore index {ignore_index})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction holds values outside 0..{num_classes - 1}")
    # One bincount over combined indices: a single pass, works on CPU and GPU alike.
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def scores(cm) -> dict:
    """Scores from a confusion matrix (truth rows, prediction columns).

    Returns {"iou": [per class], "miou", "pixel_acc", "class_acc": [per class],
    "mean_class_acc", "dice": [per class], "mdice"}; lists hold NaN for classes
    where the score is undefined (see the module docstring).
    """
    cm = torch.as_tensor(cm).detach().to("cpu", torch.float64).numpy()
    tp = np.diag(cm)
    truth = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    union = truth + predicted - tp
    iou = _safe_ratio(tp, union)
    dice = _safe_ratio(2 * tp, truth + predicted)
    class_acc = _safe_ratio(tp, truth)
    total = cm.sum()
    return {
        "iou": iou.tolist(),
        "miou": _nanmean(iou),
        "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "class_acc": class_acc.tolist(),
        "mean_class_acc": _nanmean(class_acc),
        "dice": dice.tolist(),
        "mdice": _nanmean(dice),
    }


def per_class(values, names=None) -> dict:
    """{class name: value} for a per-class list (for JSON and tables)."""
    names = names or CLASS_NAMES
    return {name: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)) for name, v in zip(names, values)}
