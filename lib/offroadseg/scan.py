"""The data scan (notebook 01): check every pair, count class pixels, derive weights.

What it checks, per pair: image and mask both present, non-empty, really PNG
(or JPEG) and not truncated, the mask single-channel, image and mask the same
size, raw IDs outside the class table (counted; those pixels become ignore).
A pair with a problem that makes it unusable is skipped and listed, never a
crash; unknown raw IDs keep the pair and are summarised per split and value
(pixels, images, a few example files) rather than listed once per file, since
some releases hold raw value 0 in every mask.

Weights (computed on the usable train pairs only):
- class weights: w_c = f_c^-1/2 / sum_k f_k^1/2, with f_c the share of labelled
  train pixels of class c. Inverse square root frequency, normalised so the
  pixel-averaged weight is 1 (the weighted loss keeps the unweighted scale); a
  class absent from train gets the largest present weight.
- per-sample weights for rare-class oversampling: an image containing class c
  (at least MIN_PRESENCE_PIXELS pixels) is drawn 0.5 / p_c times as often, p_c
  the fraction of train images containing c; the largest factor over its
  classes counts, clipped to [1, 10]. Classes in half the images or more give
  no boost; the cap of 10x is the reference report's.

The scan writes scan.json into the run folder and reuses it while the data's
fingerprint (every file's relative path, size and modification time) is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .classes import CLASS_NAMES, COLORS, NUM_CLASSES, RAW_IDS
from .data import SPLITS, DataError, Dataset, find_dataset, read_raw_mask, too_large, truncation
from .files import read_json, write_json

SCAN_VERSION = 2  # 2: unknown raw IDs summarised per split (unknown_ids), not per file
UNKNOWN_EXAMPLES = 3
MIN_PRESENCE_PIXELS = 16
SAMPLE_WEIGHT_CAP = 10.0
PRESENCE_REFERENCE = 0.5
_RAW_ID_TO_INDEX = {raw: i for i, raw in enumerate(RAW_IDS)}


def _check_image_file(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) from the header, or a problem. Cheap: no pixel decoding.

    Truncation is caught by the end marker (PNG's IEND chunk, JPEG's EOI), which
    a cut-off file lacks; that costs a 12-byte read instead of a full decode.
    """
    try:
        size_bytes = path.stat().st_size
    except OSError as err:
        return None, f"cannot read file ({err.strerror})"
    if size_bytes == 0:
        return None, "empty file (0 bytes)"
    try:
        with Image.open(path) as img:
            fmt, size = img.format, img.size
    except Image.DecompressionBombError as err:  # not an OSError: it would crash the worker pool
        return None, too_large(err)
    except UnidentifiedImageError:
        return None, truncation(path) or "not an image file (unrecognised format)"
    except (OSError, SyntaxError, ValueError) as err:
        return None, truncation(path) or f"unreadable image header ({err})"
    except Exception as err:  # noqa: BLE001 - a decoder's internal error on a malformed file: a problem, not a crash
        return None, f"unreadable image ({type(err).__name__}: {err})"
    problem = truncation(path)
    if problem:
        return None, problem
    if path.suffix.lower() == ".png" and fmt != "PNG":
        return None, f"named .png but is {fmt}"
    return size, None


def scan_pair(image_path: str, mask_path: str | None) -> dict:
    """Check one pair and count its raw mask values. Runs in worker processes."""
    image_path = Path(image_path)
    record: dict = {"stem": image_path.stem, "image": str(image_path), "mask": None if mask_path is None else str(mask_path)}
    problems = []
    size, problem = _check_image_file(image_path)
    if problem:
        problems.append((str(image_path), problem))
    record["size"] = size
    if mask_path is not None:
        try:
            raw = read_raw_mask(mask_path)
        except DataError as err:
            # The message starts with the path (which may itself hold ": "); the record keeps the reason.
            message, prefix = str(err), f"{Path(mask_path)}: "
            problems.append((str(mask_path), message.removeprefix(prefix)))
            raw = None
        if raw is not None:
            mask_size = (raw.shape[1], raw.shape[0])
            if size is not None and mask_size != size:
                problems.append((str(mask_path), f"size {mask_size[0]}x{mask_size[1]} differs from image {size[0]}x{size[1]}"))
            # np.unique is hash-based for integers in numpy 2.x: cheaper than a 65536-bin bincount.
            values, counts = np.unique(raw, return_counts=True)
            pixels = [0] * NUM_CLASSES
            unknown = {}
            for value, count in zip(values.tolist(), counts.tolist()):
                index = _RAW_ID_TO_INDEX.get(value)
                if index is None:
                    unknown[str(value)] = count
                else:
                    pixels[index] = count
            record["pixels"] = pixels
            record["unknown"] = unknown
    record["problems"] = problems
    record["usable"] = not problems
    return record


def data_fingerprint(dataset: Dataset) -> str:
    """Hash of every file's relative path, size and mtime in the dataset's split folders."""
    digest = hashlib.sha1()
    for split in SPLITS:
        folder = dataset.split_dirs.get(split)
        if folder is None:
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{split}/{path.relative_to(folder).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def class_weights(pixel_counts) -> list[float]:
    """Inverse square root frequency, normalised to a pixel-averaged weight of 1 (see module doc)."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.sum() <= 0:
        return [1.0] * len(counts)
    freq = counts / counts.sum()
    present = freq > 0
    weights = np.zeros_like(freq)
    weights[present] = freq[present] ** -0.5 / np.sum(freq[present] ** 0.5)
    weights[~present] = weights[present].max()
    return weights.tolist()


def sample_weights(per_image_pixels, cap: float = SAMPLE_WEIGHT_CAP) -> tuple[list[float], list[float]]:
    """Per-image draw weights for rare-class oversampling, and each class's boost factor.

    Returns (weights per image, factor per class); see the module doc for the rule.
    """
    present = np.asarray(per_image_pixels, dtype=np.int64) >= MIN_PRESENCE_PIXELS
    if present.size == 0:
        return [], [1.0] * NUM_CLASSES
    presence = present.mean(axis=0)
    factor = np.ones(present.shape[1])
    seen = presence > 0
    factor[seen] = np.clip(PRESENCE_REFERENCE / presence[seen], 1.0, cap)
    weights = np.where(present, factor[None, :], 1.0).max(axis=1)
    return weights.tolist(), factor.tolist()


def _iter_jobs(dataset: Dataset):
    for split in SPLITS:
        pairs = getattr(dataset, split)
        for image, mask in pairs or []:
            yield split, str(image), None if mask is None else str(mask)


def scan_dataset(dataset: Dataset | str | os.PathLike, workers: int | None = None, progress: bool = True) -> dict:
    """Scan every pair of every split with all cores; returns the scan.json content."""
    if not isinstance(dataset, Dataset):
        dataset = find_dataset(dataset)
    started = time.perf_counter()
    jobs = list(_iter_jobs(dataset))
    workers = workers or os.cpu_count() or 1
    records: dict[str, list] = {split: [] for split in SPLITS}
    bar = tqdm(total=len(jobs), desc="scan", unit="pair", disable=not progress)
    if workers > 1 and len(jobs) > 32:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(scan_pair, [j[1] for j in jobs], [j[2] for j in jobs], chunksize=16)
            for (split, _, _), record in zip(jobs, results):
                records[split].append(record)
                bar.update()
    else:
        for split, image, mask in jobs:
            records[split].append(scan_pair(image, mask))
            bar.update()
    bar.close()
    return _summarise(dataset, records, time.perf_counter() - started)


def _summarise(dataset: Dataset, records: dict[str, list], seconds: float) -> dict:
    problems = [
        {"split": split, "file": str(path), "problem": reason, "action": "skipped"}
        for split in SPLITS
        for record in records[split]
        for path, reason in record["problems"]
    ]
    for path, reason in dataset.unpaired:
        split = next((s for s, d in dataset.split_dirs.items() if Path(d) in Path(path).parents), "?")
        problems.append({"split": split, "file": str(path), "problem": reason, "action": "skipped"})
    unknown_by_split = _unknown_ids(records)
    unknown_total: dict[str, int] = {}
    for per_split in unknown_by_split.values():
        for value, row in per_split.items():
            unknown_total[value] = unknown_total.get(value, 0) + row["pixels"]
    unknown_total = dict(sorted(unknown_total.items(), key=lambda kv: int(kv[0])))
    splits = {}
    for split in SPLITS:
        usable = [r for r in records[split] if r["usable"]]
        labelled = [r for r in usable if "pixels" in r]
        pixels = np.array([r["pixels"] for r in labelled], dtype=np.int64).reshape(-1, NUM_CLASSES)
        splits[split] = {
            "present": getattr(dataset, split) is not None,
            "folder": str(dataset.split_dirs[split]) if split in dataset.split_dirs else None,
            "pairs_found": len(records[split]),
            "usable": len(usable),
            "class_pixels": pixels.sum(axis=0).tolist(),
            "class_presence": (pixels >= MIN_PRESENCE_PIXELS).sum(axis=0).tolist(),
            "images": [
                {"stem": r["stem"], "image": r["image"], "mask": r["mask"], "size": r["size"], "pixels": r.get("pixels")}
                for r in usable
            ],
        }
    train_pixels = [img["pixels"] for img in splits["train"]["images"] if img["pixels"] is not None]
    weights_per_sample, factors = sample_weights(train_pixels)
    return {
        "version": SCAN_VERSION,
        "data_root": str(dataset.root),
        "fingerprint": data_fingerprint(dataset),
        "seconds": round(seconds, 3),
        "classes": [{"index": i, "name": n, "raw_id": r, "color": list(c)} for i, (n, r, c) in enumerate(zip(CLASS_NAMES, RAW_IDS, COLORS))],
        "splits": splits,
        "problems": problems,
        "unknown_raw_ids": unknown_total,
        "unknown_ids": unknown_by_split,
        "class_weights": class_weights(splits["train"]["class_pixels"]),
        "class_weights_formula": "w_c = f_c^-0.5 / sum_k f_k^0.5 (f_c: share of labelled train pixels); pixel-averaged weight 1",
        "sample_weights": weights_per_sample,
        "sample_weight_class_factors": factors,
        "sample_weights_formula": f"max over classes in the image of clip({PRESENCE_REFERENCE} / p_c, 1, {SAMPLE_WEIGHT_CAP:g}); p_c: fraction of train images with >= {MIN_PRESENCE_PIXELS} px of class c",
    }


def _unknown_ids(records: dict[str, list]) -> dict[str, dict[str, dict]]:
    """Per split, each raw value outside the class table: pixels, images holding it, a few example masks.

    One summary row per value instead of one problem per file: raw value 0 is in every mask of some
    releases, and 2,857 identical rows would hide the real faults in the problems table.
    """
    out: dict[str, dict[str, dict]] = {}
    for split in SPLITS:
        rows: dict[str, dict] = {}
        for record in records[split]:
            for value, count in (record.get("unknown") or {}).items():
                row = rows.setdefault(value, {"pixels": 0, "images": 0, "examples": []})
                row["pixels"] += count
                row["images"] += 1
                if len(row["examples"]) < UNKNOWN_EXAMPLES:
                    row["examples"].append(record["mask"])
        if rows:
            out[split] = dict(sorted(rows.items(), key=lambda kv: int(kv[0])))
    return out


def unknown_ids_table(scan: dict) -> str:
    """The unknown raw IDs as a plain-text table: one row per split and value."""
    by_split = scan.get("unknown_ids") or {}
    if not by_split:
        return "no raw IDs outside the class table"
    lines = [f"{'split':<6} {'raw ID':>7} {'pixels':>14} {'images':>7}  note"]
    for split, rows in by_split.items():
        images = max(1, scan["splits"][split]["pairs_found"])
        for value, row in rows.items():
            if int(value) == 0:
                note = "expected in some releases (unlabelled pixels); ignored (255)"
            else:
                example = Path(row["examples"][0]).name if row["examples"] else "?"
                note = f"not in the class table; ignored (255); e.g. {example}"
            lines.append(f"{split:<6} {value:>7} {row['pixels']:>14,} {row['images']:>7}  "
                         f"{note} ({100 * row['images'] / images:.0f}% of {split} masks)")
    return "\n".join(lines)


def load_or_scan(data_root: str | os.PathLike, scan_path: str | os.PathLike, workers: int | None = None,
                 progress: bool = True, force: bool = False) -> dict:
    """scan.json at `scan_path` if it matches the data's current fingerprint, else a fresh scan (written atomically)."""
    dataset = find_dataset(data_root)
    scan_path = Path(scan_path)
    if scan_path.exists() and not force:
        try:
            cached = read_json(scan_path)
        except ValueError:
            cached = None  # unreadable: rescan and overwrite
        if cached and cached.get("version") == SCAN_VERSION and cached.get("fingerprint") == data_fingerprint(dataset):
            cached["reused"] = True
            return cached
    result = scan_dataset(dataset, workers=workers, progress=progress)
    write_json(scan_path, result)
    result["reused"] = False
    return result


def read_scan(scan_path: str | os.PathLike) -> dict:
    """The scan.json a later notebook needs; a clear error naming notebook 01 when it is missing."""
    scan_path = Path(scan_path)
    if not scan_path.exists():
        raise FileNotFoundError(f"{scan_path} not found: run notebook 01_data_scan for this run first")
    return read_json(scan_path)


def usable_pairs(scan: dict, split: str) -> list[tuple[Path, Path | None]]:
    """The (image, mask) pairs of a split that passed the scan, in scan order (aligned with sample weights)."""
    return [(Path(img["image"]), None if img["mask"] is None else Path(img["mask"])) for img in scan["splits"][split]["images"]]


def problems_table(scan: dict, limit: int | None = None) -> str:
    """The problems as a plain-text table (notebook display and logs)."""
    rows = scan["problems"][:limit] if limit else scan["problems"]
    if not rows:
        return "no problems found"
    lines = [f"{'split':<6} {'file':<60} problem -> action"]
    for row in rows:
        name = row["file"] if len(row["file"]) <= 60 else "..." + row["file"][-57:]
        lines.append(f"{row['split']:<6} {name:<60} {row['problem']} -> {row['action']}")
    if limit and len(scan["problems"]) > limit:
        lines.append(f"... and {len(scan['problems']) - limit} more (see scan.json)")
    return "\n".join(lines)


def class_table(scan: dict) -> str:
    """Per-class pixel share, image presence and weights for the train split."""
    train = scan["splits"]["train"]
    total = max(1, sum(train["class_pixels"]))
    n_images = max(1, train["usable"])
    lines = [f"{'class':<15} {'raw':>6} {'pixels %':>9} {'images %':>9} {'weight':>7} {'boost':>6}"]
    for i, name in enumerate(CLASS_NAMES):
        lines.append(
            f"{name:<15} {RAW_IDS[i]:>6} {100 * train['class_pixels'][i] / total:>9.2f} "
            f"{100 * train['class_presence'][i] / n_images:>9.1f} {scan['class_weights'][i]:>7.3f} "
            f"{scan['sample_weight_class_factors'][i]:>6.2f}"
        )
    return "\n".join(lines)
