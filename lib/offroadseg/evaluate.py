"""Final evaluation (notebook 06): scores per model, per-image ranking, confusions, predictions.

metrics.json (what users and scripts read) holds one row per evaluated model:
{"model", "params", "latency_ms": {"median", "p90", "device", "input_size"}, "images_per_s",
 "best_batch", "miou", "pixel_acc", "per_class_iou": {class name: IoU or null}, "split"}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .classes import CLASS_NAMES, INDEX_TO_RAW, NUM_CLASSES
from .data import read_image, write_image, write_raw_mask
from .files import read_json, write_json
from .metrics import confusion_matrix, per_class, scores

METRICS_VERSION = 1


def most_confused_pairs(cm, top: int = 5) -> list[dict]:
    """The largest off-diagonal cells, as a share of the true class's pixels."""
    cm = np.asarray(torch.as_tensor(cm).cpu(), dtype=np.float64)
    truth_totals = cm.sum(axis=1)
    pairs = []
    for t in range(cm.shape[0]):
        for p in range(cm.shape[1]):
            if t != p and cm[t, p] > 0:
                pairs.append({"truth": CLASS_NAMES[t], "predicted": CLASS_NAMES[p], "pixels": int(cm[t, p]),
                              "share_of_truth": float(cm[t, p] / truth_totals[t])})
    pairs.sort(key=lambda row: row["share_of_truth"], reverse=True)
    return pairs[:top]


def per_image_scores(predictions, targets) -> list[float]:
    """mIoU of each image on its own (classes absent from both are left out, as in `scores`)."""
    return [scores(confusion_matrix(p, t))["miou"] for p, t in zip(predictions, targets)]


@torch.inference_mode()
def predict_native(predictor, image: np.ndarray, transform, device="cpu") -> np.ndarray:
    """Class indices at the image's own resolution: model input at `transform`'s size, outputs
    upsampled bilinearly to the native size before the argmax (labels are never resized)."""
    from .ensemble import probabilities

    tensor, _ = transform(image, None)
    probs = probabilities(predictor, tensor[None].to(device), size=image.shape[:2])
    return probs.argmax(dim=1)[0].to("cpu", torch.uint8).numpy()


def write_predictions(predictor, pairs, out_dir, transform, device="cpu", progress: bool = True) -> list[Path]:
    """Predictions for every image of `pairs`: raw/<stem>.png (raw IDs, 16-bit, the masks' own
    format) and color/<stem>.png (overlay), both at the native resolution, written atomically."""
    from tqdm.auto import tqdm

    from .plots import overlay

    out_dir = Path(out_dir)
    # Predictions of an earlier run for images no longer in `pairs` would mix two runs in one folder.
    stems = {Path(image_path).stem for image_path, _ in pairs}
    for stale in [*out_dir.glob("raw/*.png"), *out_dir.glob("color/*.png")]:
        if stale.stem not in stems:
            stale.unlink()
    written = []
    for image_path, _ in tqdm(pairs, desc="predict", unit="img", disable=not progress):
        image = read_image(image_path)
        pred = predict_native(predictor, image, transform, device)
        raw_path = out_dir / "raw" / f"{Path(image_path).stem}.png"
        write_raw_mask(raw_path, INDEX_TO_RAW[pred])
        write_image(out_dir / "color" / f"{Path(image_path).stem}.png", overlay(image, pred))
        written.append(raw_path)
    return written


def metrics_row(model: str, result: dict, params: int | None, latency: dict | None, throughput: dict | None,
                split: str, device: str, input_size) -> dict:
    """One metrics.json row from a scores dict and timing measurements."""
    return {
        "model": model,
        "params": params,
        "latency_ms": None if latency is None else {"median": latency["median_ms"], "p90": latency["p90_ms"],
                                                    "device": device, "input_size": list(input_size)},
        "images_per_s": None if throughput is None else throughput["images_per_s"],
        "best_batch": None if throughput is None else throughput["best_batch"],
        "miou": result["miou"],
        "pixel_acc": result["pixel_acc"],
        "per_class_iou": per_class(result["iou"]),
        "split": split,
    }


def split_row(row: dict, result: dict, split: str) -> dict:
    """The metrics row of the same model scored on another split: `row`'s params and timings
    (they do not depend on the data), `result`'s scores."""
    return {**row, "miou": result["miou"], "pixel_acc": result["pixel_acc"],
            "per_class_iou": per_class(result["iou"]), "split": split}


def write_metrics(path, rows: list[dict], **context) -> dict:
    """metrics.json, atomically; `context` (run, profile, data root, ...) goes beside the rows."""
    content = {"version": METRICS_VERSION, **context, "models": rows}
    write_json(path, content)
    return content


def read_metrics(path) -> dict:
    return read_json(path)


def comparison_table(rows: list[dict]) -> str:
    """Plain-text comparison of metrics rows."""
    header = f"{'model':<14} {'params M':>8} {'mIoU':>6} {'pix acc':>7} {'ms/img':>8} {'p90 ms':>8} {'img/s':>7} {'batch':>5}"
    lines = [header]
    for r in rows:
        lat = r["latency_ms"] or {}
        lines.append(
            f"{r['model']:<14} {(r['params'] or 0) / 1e6:>8.2f} {r['miou']:>6.3f} {r['pixel_acc']:>7.3f} "
            f"{lat.get('median', float('nan')):>8.1f} {lat.get('p90', float('nan')):>8.1f} "
            f"{r['images_per_s'] or float('nan'):>7.1f} {r['best_batch'] or '-':>5}"
        )
    return "\n".join(lines)


def prediction_is_valid(path) -> bool:
    """True when a written prediction reopens with read_mask to valid class indices only."""
    from .data import read_mask

    mask = read_mask(path)
    return bool((mask < NUM_CLASSES).all())


@torch.inference_mode()
def per_image_results(predictor, dataset, device=None, progress: bool = False) -> list[dict]:
    """Per-image mIoU of `predictor` on `dataset` (masks at their own size), best first.

    Rows: {"index", "stem", "miou", "prediction" (uint8 class map at the mask's size)}.
    """
    from tqdm.auto import tqdm

    from .ensemble import default_device, inference_autocast, prepare_for_inference, probabilities

    device = default_device(device)
    predictor = prepare_for_inference(predictor, device)
    rows = []
    for index in tqdm(range(len(dataset)), desc="per-image", disable=not progress):
        image, mask = dataset[index]
        with inference_autocast(device):
            probs = probabilities(predictor, image[None].to(device), size=tuple(mask.shape[-2:]))
        pred = probs.float().argmax(dim=1)[0].cpu()
        rows.append({"index": index, "stem": dataset.stem(index), "miou": scores(confusion_matrix(pred, mask))["miou"],
                     "prediction": pred.to(torch.uint8).numpy()})
    rows.sort(key=lambda row: row["miou"], reverse=True)
    return rows


def best_and_worst_rows(rows: list[dict], dataset, count: int = 2) -> list[tuple]:
    """(image, truth, prediction, caption) rows of the `count` best and worst images, for plots.prediction_grid."""
    from .data import read_mask

    chosen = [("best", r) for r in rows[:count]] + [("worst", r) for r in rows[-count:][::-1]]
    out = []
    for label, row in chosen:
        image_path, mask_path = dataset.pairs[row["index"]]
        out.append((read_image(image_path), read_mask(mask_path), row["prediction"],
                    f"{label}: {row['stem']} mIoU {row['miou']:.2f}"))
    return out
