"""Evaluation: the one scorer, the one prediction path, and notebook 06's rows, rankings and files.

    result = evaluate_model(tta, val_loader)        # {"miou", "pixel_acc", "iou", "per_class_iou", ...}
    flips, table = choose_tta(ensemble, val_loader)  # the TTA flip set that scores best
    labels = predict_labels(model, frames, input_size=(180, 320))   # uint8 class maps, one per frame

- `evaluate_model` scores any predictor (a model, an Ensemble, a TTA wrapper, an ONNX session)
  over a loader: notebooks 04 and 06, `choose_tta`, and with its hooks (loss, reduction over
  processes, the accelerator's autocast) training's validation.
- `predict_labels` turns images into label maps for every caller that wants maps rather than
  scores: notebook 06's test predictions and best/worst rows, the uncertainty ranking,
  `python -m offroadseg.predict`, bench/inference.py.

metrics.json (what users and scripts read) holds one row per evaluated model:
{"model", "params", "latency_ms": {"median", "p90", "device", "input_size"}, "images_per_s",
 "best_batch", "miou", "pixel_acc", "per_class_iou": {class name: IoU or null}, "split"}.
"""

from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .classes import CLASS_NAMES, INDEX_TO_RAW, NUM_CLASSES
from .data import DataError, read_image, read_mask, write_image, write_raw_mask
from .device import default_device, inference_autocast, keep_freed_memory, model_device, on_device, synchronize
from .ensemble import SlidingWindow, TestTimeAugmentation, upsampled_argmax
from .files import write_json
from .metrics import confusion_matrix, per_class, scores
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, frames_to_batch

METRICS_VERSION = 1


# ------------------------------------------------------------------------- the one scorer


@torch.inference_mode()
def evaluate_model(predictor: Callable, loader: Iterable, device=None, num_classes: int = NUM_CLASSES,
                   loss_fn: Callable | None = None, reduce: Callable | None = None,
                   autocast: Callable | None = None) -> dict:
    """THE scorer: scores of `predictor` (a model, an Ensemble, a TTA wrapper, any callable) over `loader`.

    `loader` yields (images, masks) batches (masks int64 with 255 = ignore). The prediction is the
    argmax of the predictor's output (logits or probabilities), upsampled bilinearly to the mask's
    size when it differs (`ensemble.upsampled_argmax`, as `predict_labels` does), and one confusion
    matrix is accumulated on the device. The predictor runs on `device` (None: the GPU when there
    is one) in eval mode and is put back where and as it was (`device.on_device`), under
    `device.inference_autocast(device)`.

    Hooks, for training's validation:
    - `loss_fn(outputs, masks)`, called on the fp32 outputs as the predictor returns them: the
      result gains "loss", the mean over images of the batch losses; a batch whose loss is not
      finite (only ignore pixels) is left out, and with none left the loss is NaN.
    - `reduce(tensor)` returns `tensor` summed over processes (`accelerator.reduce`, whose default
      reduction is the sum): the confusion matrix, the loss sums and the image count go through
      it before scoring, so every process returns the scores of all processes' shares.
    - `autocast()` returns the context the forward runs in (`accelerator.autocast`), instead of
      the inference precision rule.

    Returns `metrics.scores` (miou, pixel_acc, iou, ...) plus per_class_iou {class name: IoU} (for
    the ten classes), confusion_matrix (nested lists), images (count) and, with `loss_fn`, loss.
    """
    device = default_device(device)
    if autocast is None:
        def autocast():
            return inference_autocast(device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum of per-image losses, images with one
    images_seen = torch.zeros((), dtype=torch.int64, device=device)
    with on_device(predictor, device):
        for images, masks in loader:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            with autocast():
                out = predictor(images)
            if loss_fn is not None:
                loss = loss_fn(out.float(), masks)
                if torch.isfinite(loss):  # a batch of only ignore pixels has no loss
                    loss_sum += torch.stack([loss.double() * len(images), loss_sum.new_tensor(len(images))])
            cm += confusion_matrix(upsampled_argmax(out, masks.shape[-2:]), masks, num_classes=num_classes)
            images_seen += len(images)
    if reduce is not None:
        cm, loss_sum, images_seen = reduce(cm), reduce(loss_sum), reduce(images_seen)
    result = scores(cm)
    if num_classes == NUM_CLASSES:
        result["per_class_iou"] = per_class(result["iou"])
    result["confusion_matrix"] = cm.cpu().tolist()
    result["images"] = int(images_seen)
    if loss_fn is not None:
        result["loss"] = (loss_sum[0] / loss_sum[1]).item() if loss_sum[1] > 0 else math.nan
    return result


def choose_tta(predictor: Callable, loader: Iterable, candidates=(("h",), ("h", "v")), device=None) -> tuple[tuple, list[dict]]:
    """The TTA flip set that scores best on `loader` (`evaluate_model`), and every candidate's scores.

    Chosen on validation data like the member weight (`ensemble.choose_weight`): a vertical flip
    puts the sky at the bottom, which models trained with horizontal flips only may never have
    seen, so whether it helps is measured rather than assumed. "none" (no TTA) is always scored
    as the baseline; ties go to the cheaper set. Each row holds the candidate's scores ("miou",
    "pixel_acc", "per_class_iou"), so the plain and the chosen predictor need no second pass.
    """
    def row(flips, result):
        return {"flips": list(flips), "miou": result["miou"], "pixel_acc": result["pixel_acc"],
                "per_class_iou": result["per_class_iou"]}

    table = [row((), evaluate_model(predictor, loader, device))]
    for flips in candidates:
        table.append(row(flips, evaluate_model(TestTimeAugmentation(predictor, flips=tuple(flips)), loader, device)))
    best = max(table[1:], key=lambda row: (row["miou"], -len(row["flips"])))
    return tuple(best["flips"]), table


# ------------------------------------------------------------------------- notebook 06's rows


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


# ------------------------------------------------------------------ the one prediction path


class _Clock:
    """Adds the seconds of each stage to `timings` (when given); synchronises a GPU so work is counted
    where it runs, not where it was queued."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.device = timings, device
        self.last = time.perf_counter() if timings is not None else None

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


@torch.inference_mode()
def predict_labels(predictor, images, input_size=None, sizes=None, flips: Sequence[str] = (), scales=None,
                   precision: str = "auto", mean=IMAGENET_MEAN, std=IMAGENET_STD, return_log_probs: bool = False,
                   timings: dict | None = None, slide: float | None = None):
    """THE prediction path: class-index maps (uint8 numpy, one per image) from any predictor.

    `images`: uint8 RGB frames (a list of H x W x 3 arrays or tensors, sizes may differ), resized
    and normalised on the device to `input_size` (`preprocess.frames_to_batch`); or an already normalised
    float batch (N, 3, h, w), used as it is. Each label map comes back at its frame's own size
    (for a float batch: `sizes`, one (H, W) or one per image; default the batch's own size):
    the model's output is upsampled bilinearly before the argmax (`ensemble.upsampled_argmax`),
    labels are never resized.

    Rules every caller gets: inputs go to the predictor's device (`device.model_device`), the
    predictor runs in eval mode and is left where and as it was (`device.on_device`), under
    `device.inference_autocast(device, precision)`. `flips`/`scales` wrap it in test-time
    augmentation. Logits or probabilities (`returns_probs`) both work: the argmax needs no softmax.

    `slide` (an overlap, e.g. 1/3): slide inference (`ensemble.SlidingWindow`): uint8 frames are
    normalised at their own resolution, not resized (a float batch is taken as at its own), and the
    model runs on windows of `input_size` overlapping by that share (TTA inside each window);
    frames of different sizes run one by one.

    `return_log_probs=True` returns (labels, log_probs): fp32 log-probabilities (N, C, h, w) at
    the model's output size, on the device (what uncertainty measures need). `timings` (a dict)
    accumulates seconds per stage: "preprocess", "model", "upsample_argmax".
    """
    window = None
    if slide is not None:
        if input_size is None:
            raise ValueError("slide inference needs the model's input_size (its window)")
        window = tuple(int(side) for side in input_size)
        if not (isinstance(images, torch.Tensor) and images.is_floating_point()):
            images = list(images)
            if len({tuple(frame.shape[:2]) for frame in images}) > 1:  # one native size per call
                if return_log_probs:
                    raise ValueError("slide inference returns log-probabilities for frames of one size only")
                return [predict_labels(predictor, [frame], window, None, flips, scales, precision, mean, std,
                                       timings=timings, slide=slide)[0] for frame in images]
            input_size = tuple(images[0].shape[:2])  # frames normalised as they are: the windows do the rest
    device = model_device(predictor)
    clock = _Clock(timings, device)
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        x = images.to(device, non_blocking=True)
        if x.ndim == 3:
            x = x[None]
        native = [tuple(x.shape[-2:])] * len(x)
    else:
        frames = list(images)
        if input_size is None:
            raise ValueError("uint8 frames need the model's input_size (height, width)")
        native = [tuple(frame.shape[:2]) for frame in frames]
        x = frames_to_batch(frames, input_size, device, mean, std)
    if sizes is not None:
        sizes = [tuple(sizes)] * len(x) if len(sizes) == 2 and isinstance(sizes[0], int) else [tuple(s) for s in sizes]
        if len(sizes) != len(x):
            raise ValueError(f"{len(sizes)} output sizes for {len(x)} images")
        native = sizes
    clock.lap("preprocess")
    model = TestTimeAugmentation(predictor, flips=tuple(flips), scales=scales) if (flips or scales) else predictor
    if window is not None:
        model = SlidingWindow(model, window, slide)
    with on_device(predictor), inference_autocast(device, precision):
        out = model(x)
    out = out.float()
    clock.lap("model")
    if len(set(native)) == 1:
        labels = list(upsampled_argmax(out, native[0]).to("cpu", torch.uint8).numpy())
    else:
        labels = [upsampled_argmax(out[i : i + 1], size)[0].to("cpu", torch.uint8).numpy()
                  for i, size in enumerate(native)]
    clock.lap("upsample_argmax")
    if not return_log_probs:
        return labels
    if getattr(model, "returns_probs", False):
        log_probs = out.clamp_min(torch.finfo(torch.float32).tiny).log()
    else:
        log_probs = out.log_softmax(dim=1)
    return labels, log_probs


def write_prediction(out_dir, stem: str, labels: np.ndarray, image: np.ndarray | None = None) -> Path:
    """raw/<stem>.png (raw IDs, 16-bit, the masks' own format) and, given the image, color/<stem>.png
    (overlay), both atomically, in `out_dir`; returns the raw path."""
    from .plots import overlay  # noqa: PLC0415 (plots imports pyplot: a second of predict's start-up)

    out_dir = Path(out_dir)
    raw_path = out_dir / "raw" / f"{stem}.png"
    write_raw_mask(raw_path, INDEX_TO_RAW[labels])
    if image is not None:
        write_image(out_dir / "color" / f"{stem}.png", overlay(image, labels))
    return raw_path


def predict_files(predictor, paths: Sequence, out_dir, input_size, batch_size: int = 4, flips: Sequence[str] = (),
                  scales=None, precision: str = "auto", color: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  skip_unreadable: bool = False, progress: bool = True, desc: str = "predict",
                  background_writes: bool = True, slide: float | None = None) -> dict:
    """Predict every image file of `paths` into `out_dir`/raw (and /color), at each image's own size.

    Files are decoded (`data.read_image`), predicted `batch_size` at a time (`predict_labels`) and
    written (`write_prediction`). With `background_writes` a batch's PNGs are encoded on one
    worker thread while the next batch is decoded and predicted (zlib and Pillow's encoder release
    the GIL; at most one batch waits, so memory stays bounded); errors still surface here. With
    `skip_unreadable` an unreadable file is named in a warning and skipped (the run goes on);
    otherwise its DataError stops the run. Returns {"written": [raw paths], "skipped": [(path,
    reason)], "images", "seconds" (end to end), "timings" {stage: busy seconds: decode, preprocess,
    model, upsample_argmax, encode (overlay + PNGs; overlapping the others when in the background)},
    "class_pixels" (int64 per class)}. `slide`: slide inference with that overlap (`predict_labels`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if model_device(predictor).type == "cpu":
        keep_freed_memory()  # the frames' and maps' buffers reused from image to image
    started = time.perf_counter()
    timings = {"decode": 0.0, "preprocess": 0.0, "model": 0.0, "upsample_argmax": 0.0, "encode": 0.0}
    written, skipped, pending = [], [], []
    class_pixels = np.zeros(NUM_CLASSES, dtype=np.int64)
    paths = [Path(p) for p in paths]
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)

    def write_batch(batch, labels):
        tick = time.perf_counter()
        out = [write_prediction(out_dir, path.stem, label, image if color else None)
               for (path, image), label in zip(batch, labels)]
        return out, time.perf_counter() - tick

    def collect(limit: int) -> None:
        while len(pending) > limit:
            raw_paths, seconds = pending.pop(0).result()
            written.extend(raw_paths)
            timings["encode"] += seconds
            bar.update(len(raw_paths))

    def flush(batch, pool):
        labels = predict_labels(predictor, [image for _, image in batch], input_size, flips=flips, scales=scales,
                                precision=precision, mean=mean, std=std, timings=timings, slide=slide)
        for label in labels:
            class_pixels[:] += np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES]
        if pool is None:
            raw_paths, seconds = write_batch(batch, labels)
            written.extend(raw_paths)
            timings["encode"] += seconds
            bar.update(len(raw_paths))
        else:
            pending.append(pool.submit(write_batch, batch, labels))
            collect(1)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-write") if background_writes else None
    try:
        batch = []
        for path in paths:
            tick = time.perf_counter()
            try:
                image = read_image(path)
            except DataError as err:
                if not skip_unreadable:
                    raise
                warnings.warn(f"skipped {err}", stacklevel=2)
                skipped.append((path, str(err)))
                bar.update(1)
                continue
            finally:
                timings["decode"] += time.perf_counter() - tick
            batch.append((path, image))
            if len(batch) == batch_size:
                flush(batch, pool)
                batch = []
        if batch:
            flush(batch, pool)
        collect(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        bar.close()
    return {"written": written, "skipped": skipped, "images": len(written),
            "seconds": time.perf_counter() - started, "timings": timings, "class_pixels": class_pixels}


def write_predictions(predictor, pairs, out_dir, input_size, device=None, batch_size: int = 4,
                      progress: bool = True) -> list[Path]:
    """Predictions for every image of `pairs` (notebook 06's test split): raw/<stem>.png and
    color/<stem>.png in `out_dir` (`predict_files`), at the native resolution; files of an
    earlier run for images no longer in `pairs` are removed. `input_size` (height, width) is the
    model's; `device` None: the GPU when there is one (the predictor is put back afterwards)."""
    out_dir = Path(out_dir)
    # Predictions of an earlier run for images no longer in `pairs` would mix two runs in one folder.
    stems = {Path(image_path).stem for image_path, _ in pairs}
    for stale in [*out_dir.glob("raw/*.png"), *out_dir.glob("color/*.png")]:
        if stale.stem not in stems:
            stale.unlink()
    with on_device(predictor, default_device(device)):
        result = predict_files(predictor, [image_path for image_path, _ in pairs], out_dir, input_size,
                               batch_size=batch_size, progress=progress)
    return result["written"]


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
    mask = read_mask(path)
    return bool((mask < NUM_CLASSES).all())


def per_image_results(predictor, dataset, device=None, progress: bool = False) -> list[dict]:
    """Per-image mIoU of `predictor` on `dataset` (masks at their own size), best first.

    Rows: {"index", "stem", "miou", "prediction" (uint8 class map at the mask's size)}.
    """
    rows = []
    with on_device(predictor, default_device(device)):
        for index in tqdm(range(len(dataset)), desc="per-image", disable=not progress):
            image, mask = dataset[index]
            pred = predict_labels(predictor, image[None], sizes=tuple(mask.shape[-2:]))[0]
            rows.append({"index": index, "stem": dataset.stem(index), "prediction": pred,
                         "miou": scores(confusion_matrix(torch.from_numpy(pred).long(), mask))["miou"]})
    rows.sort(key=lambda row: row["miou"], reverse=True)
    return rows


def best_and_worst_rows(rows: list[dict], dataset, count: int = 2) -> list[tuple]:
    """(image, truth, prediction, caption) rows of the `count` best and worst images, for plots.prediction_grid."""
    chosen = [("best", r) for r in rows[:count]] + [("worst", r) for r in rows[-count:][::-1]]
    out = []
    for label, row in chosen:
        image_path, mask_path = dataset.pairs[row["index"]]
        out.append((read_image(image_path), read_mask(mask_path), row["prediction"],
                    f"{label}: {row['stem']} mIoU {row['miou']:.2f}"))
    return out
