"""Figures the notebooks show; each is also saved under the run's figures/ folder.

Every function returns the matplotlib Figure, and `save(fig, path)` writes it
atomically (PNG rendered to memory first, then renamed into place).
"""

from __future__ import annotations

import io
import os

# No backend is forced: Jupyter kernels use inline, and headless runs fall back to Agg by themselves.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from .checkpoints import best_row
from .classes import CLASS_NAMES, IGNORE_INDEX, PALETTE
from .files import write_bytes


def save(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-index mask -> RGB (ignore drawn black)."""
    return np.take(PALETTE, np.asarray(mask, dtype=np.uint8), axis=0)  # a third of PALETTE[mask]'s time


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Image with the coloured mask blended in; ignore pixels show the image alone."""
    if alpha == 0.5:
        # The default, in uint8 without a wider copy: (a & b) + ((a ^ b) >> 1) is exactly (a + b) // 2,
        # what the float blend below truncates to at alpha 0.5, in a fifth of its time (24 -> 5 ms a
        # 960x540 frame: writing a prediction's overlay is a large share of predict).
        image = np.asarray(image, dtype=np.uint8)
        mask = np.asarray(mask, dtype=np.uint8)
        colour = colorize(mask)
        blended = (image & colour) + ((image ^ colour) >> 1)
        ignore = mask == IGNORE_INDEX
        if ignore.any():  # never in a prediction: only masks have ignore pixels
            blended[ignore] = image[ignore]
        return blended
    image = np.asarray(image, dtype=np.float32)
    colors = colorize(mask).astype(np.float32)
    keep = (np.asarray(mask) != IGNORE_INDEX)[..., None]
    blended = np.where(keep, (1 - alpha) * image + alpha * colors, image)
    return blended.clip(0, 255).astype(np.uint8)


def _class_bars(values, title: str, xlabel: str, log: bool = False):
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = PALETTE[: len(CLASS_NAMES)] / 255.0
    ax.barh(CLASS_NAMES, values, color=colors, edgecolor="black", linewidth=0.5)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if log:
        ax.set_xscale("log")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}" if v < 100 else f" {v:.0f}", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def class_pixel_share(scan: dict, split: str = "train"):
    pixels = np.asarray(scan["splits"][split]["class_pixels"], dtype=np.float64)
    share = 100 * pixels / max(pixels.sum(), 1)
    return _class_bars(np.maximum(share, 1e-3), f"Class pixel share ({split}, log scale)", "% of labelled pixels", log=True)


def class_presence(scan: dict, split: str = "train"):
    presence = np.asarray(scan["splits"][split]["class_presence"], dtype=np.float64)
    share = 100 * presence / max(scan["splits"][split]["usable"], 1)
    return _class_bars(share, f"Images containing each class ({split})", "% of images")


def legend_handles():
    return [Patch(facecolor=PALETTE[i] / 255.0, edgecolor="black", label=name) for i, name in enumerate(CLASS_NAMES)]


def overlay_grid(samples, columns: int = 3, title: str | None = None):
    """Grid of images with their masks blended in. `samples`: list of (image, mask, caption)."""
    rows = max(1, int(np.ceil(len(samples) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.5 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, mask, caption) in zip(axes.flat, samples):
        ax.imshow(overlay(image, mask))
        ax.set_title(caption, fontsize=8)
    fig.legend(handles=legend_handles(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def training_curves(history: list[dict], title: str = ""):
    """Train/val loss and val mIoU per epoch, side by side."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, miou_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.set_title("loss")
    miou_ax.plot(epochs, [h["val_miou"] for h in history], marker="o", color="tab:green")
    best = best_row(history)  # the epoch best.pt holds
    miou_ax.scatter([best["epoch"]], [best["val_miou"]], s=120, facecolors="none", edgecolors="red", label=f"best {best['val_miou']:.3f}")
    miou_ax.set_xlabel("epoch")
    miou_ax.set_ylabel("val mIoU")
    miou_ax.set_ylim(0, 1)
    miou_ax.legend()
    miou_ax.set_title("validation mIoU")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def per_class_iou_curves(history: list[dict], title: str = ""):
    """Per-class val IoU over epochs, one line per class in its display colour."""
    epochs = [h["epoch"] for h in history]
    ious = np.array([[np.nan if v is None else v for v in h["per_class_iou"]] for h in history], dtype=float)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for c, name in enumerate(CLASS_NAMES):
        ax.plot(epochs, ious[:, c], marker=".", color=PALETTE[c] / 255.0, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val IoU")
    ax.set_ylim(0, 1)
    ax.legend(ncol=2, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "per-class validation IoU")
    fig.tight_layout()
    return fig


def prediction_grid(rows, title: str | None = None):
    """Rows of image / truth / prediction / overlay. `rows`: list of (image, truth, prediction, caption)."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 2.2 * len(rows) + 0.6), squeeze=False)
    for r, (image, truth, pred, caption) in enumerate(rows):
        panels = (image, colorize(truth), colorize(pred), overlay(image, pred))
        for c, (panel, name) in enumerate(zip(panels, ("image", "truth", "prediction", "overlay"))):
            axes[r, c].imshow(panel)
            axes[r, c].axis("off")
            axes[r, c].set_title(f"{name}: {caption}" if c == 0 else name, fontsize=8)
    fig.legend(handles=legend_handles(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def iou_table(per_class_iou, name: str = "IoU") -> str:
    """Per-class IoU as text (stable for nbval: values rounded to 2 decimals)."""
    lines = [f"{'class':<15} {name:>8}"]
    for cname, value in zip(CLASS_NAMES, per_class_iou):
        lines.append(f"{cname:<15} {'-' if value is None or value != value else f'{value:.2f}':>8}")
    return "\n".join(lines)


def confusion_figure(cm, title: str = "normalised confusion matrix (rows: truth)"):
    """Row-normalised confusion matrix: each row shows where a true class's pixels went."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    for r in range(norm.shape[0]):
        for c in range(norm.shape[1]):
            if norm[r, c] >= 0.01:
                ax.text(c, r, f"{norm[r, c]:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if norm[r, c] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def per_class_iou_bars(results: dict[str, list], title: str = "per-class IoU"):
    """Grouped bars: per-class IoU of several models. `results`: {model name: [10 IoUs]}."""
    names = list(results)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(11, 3.8))
    x = np.arange(len(CLASS_NAMES))
    for i, name in enumerate(names):
        values = [0.0 if v is None or v != v else v for v in results[name]]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, CLASS_NAMES, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.legend(ncol=min(len(names), 6), fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig
