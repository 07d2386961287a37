"""Dataset files in Duality's Falcon layout: finding them, reading images and masks, writing them.

    <root>/.../Offroad_Segmentation_Training_Dataset/{train,val}/{Color_Images,Segmentation}/<stem>.png
    <root>/.../Offroad_Segmentation_testImages/{Color_Images,Segmentation}/<stem>.png

Archives often unzip one level deeper (`Offroad_Segmentation_Training_Dataset/
Offroad_Segmentation_Training_Dataset/train`) and Kaggle mounts datasets at
/kaggle/input/datasets/<owner>/<name>/..., so `train` can sit 7 levels below the
folder a user names. `find_dataset` searches breadth first down to SEARCH_DEPTH
levels and at most SEARCH_FOLDERS folders (so pointing it at a home folder or a disk
root ends quickly with an error that says the bound instead of walking everything).
Images and masks pair by file stem.

The torch dataset over these pairs, and its decode cache, are `offroadseg.dataset`.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .classes import IGNORE_INDEX, RAW_TO_INDEX
from .files import atomic_open

IMAGE_DIR = "Color_Images"
MASK_DIR = "Segmentation"
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# How deep below the root to look for split folders: Kaggle's /kaggle/input/datasets/<owner>/<name>/
# plus a doubled archive folder puts train 7 levels down (8 from /kaggle); 10 leaves room.
SEARCH_DEPTH = 10
# At most this many folders are listed, so a root such as / or ~ ends in seconds, not hours.
SEARCH_FOLDERS = 20_000
# Folders never worth descending into while looking for a dataset.
SKIP_FOLDERS = frozenset({"__pycache__", "node_modules", "site-packages"})


class DataError(ValueError):
    """A dataset file or folder that cannot be used; the message names it and says why."""


Pair = tuple[Path, "Path | None"]


@dataclass
class Dataset:
    """Pairs per split; a split is None when the data root has no such folder."""

    root: Path
    train: list[Pair] | None = None
    val: list[Pair] | None = None
    test: list[Pair] | None = None
    split_dirs: dict[str, Path] = field(default_factory=dict)
    # Files that could not be paired: (path, reason). The scan reports them.
    unpaired: list[tuple[Path, str]] = field(default_factory=list)
    search: "SearchReport | None" = None  # how far find_dataset looked (for error messages)

    def split(self, name: str) -> list[Pair]:
        pairs = getattr(self, name)
        if pairs is None:
            raise DataError(f"{self.root}: no '{name}' split found (looked for {name}/{IMAGE_DIR})")
        return pairs

    def summary(self) -> dict[str, int | None]:
        return {name: (None if getattr(self, name) is None else len(getattr(self, name))) for name in SPLITS}

    def describe(self) -> str:
        """One line per split: where it was found and how many pairs it holds, or that it is missing."""
        lines = []
        for name in SPLITS:
            pairs = getattr(self, name)
            if pairs is None:
                lines.append(f"  {name:<5}  not found")
            else:
                masks = "" if not pairs or pairs[0][1] is not None else " (images only, no masks)"
                lines.append(f"  {name:<5}  {len(pairs):>6} pairs{masks}  in {self.split_dirs[name]}")
        return "\n".join(lines)

    def require(self, splits=("train", "val")) -> None:
        """DataError naming what was found where unless every split in `splits` is there with pairs.

        Training needs train and val; a search that found only test (a dataset nested deeper than the
        search goes, a wrong folder) must stop here, not after a scan that looks fine.
        """
        missing = [name for name in splits if not getattr(self, name)]
        if not missing:
            return
        what = " and ".join(f"'{name}'" for name in missing)
        bounds = f"The search {self.search.bounds()}. " if self.search is not None else ""
        raise DataError(
            f"{self.root}: no {what} split with image/mask pairs found; training needs both train and val. "
            f"Found:\n{self.describe()}\n{bounds}Expected .../train/{IMAGE_DIR} and .../train/{MASK_DIR} "
            f"(and the same under val/): point --data at the folder holding Offroad_Segmentation_Training_Dataset."
        )


def _split_name(folder: Path) -> str | None:
    """Which split a folder holding Color_Images is: train, val or test (None if unclear)."""
    name = folder.name.lower()
    if name in ("train", "training"):
        return "train"
    if name in ("val", "valid", "validation"):
        return "val"
    if name in ("test", "testing") or "testimages" in name.replace("_", "").lower():
        return "test"
    return None


@dataclass
class SearchReport:
    """What a dataset search looked at: for error messages that say where and how far it looked."""

    folders: int = 0  # folders listed
    deepest: int = 0  # deepest level reached below the root
    stopped: str | None = None  # why the search ended early, if it did

    def bounds(self) -> str:
        text = f"listed {self.folders:,} folders down to {self.deepest} levels (limits: {SEARCH_DEPTH} levels, " \
               f"{SEARCH_FOLDERS:,} folders)"
        return text + (f"; {self.stopped}" if self.stopped else "")


def _walk_split_dirs(root: Path, depth: int | None = None, max_folders: int | None = None,
                     report: SearchReport | None = None) -> list[Path]:
    """Folders under root (to `depth` levels, at most `max_folders` listed) that hold a Color_Images folder.

    Breadth first, so the shallowest copy of a split is found first; a folder holding
    Color_Images is not descended into (its children are the images themselves).
    """
    depth = SEARCH_DEPTH if depth is None else depth
    max_folders = SEARCH_FOLDERS if max_folders is None else max_folders
    report = report if report is not None else SearchReport()
    found, frontier = [], [root]
    for level in range(depth + 1):
        next_frontier = []
        for folder in frontier:
            if report.folders >= max_folders:
                report.stopped = f"stopped after {max_folders:,} folders: give a folder nearer the dataset"
                return found
            report.folders += 1
            report.deepest = max(report.deepest, level)
            try:
                children = sorted(p for p in folder.iterdir()
                                  if not p.name.startswith(".") and p.name not in SKIP_FOLDERS and p.is_dir())
            except OSError:  # unreadable folder, a file that vanished, a dead mount
                continue
            if any(c.name == IMAGE_DIR for c in children):
                found.append(folder)
                continue
            next_frontier.extend(children)
        frontier = next_frontier
        if not frontier:
            break
    if frontier and report.stopped is None:
        report.stopped = f"folders deeper than {depth} levels were not searched"
    return found


def find_dataset(root: str | os.PathLike) -> Dataset:
    """Locate train/val/test under `root` and pair images with masks by stem.

    Raises DataError when root does not exist, is empty, or holds no folder in
    the Duality layout. Images without a mask (in a split that has masks) and
    masks without an image are kept out of the pairs and listed in `unpaired`.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (give the folder that holds the unzipped dataset)")
    if not any(root.iterdir()):
        raise DataError(f"{root}: folder is empty (unzip the dataset here, or leave --data out for the demo desert)")
    dataset = Dataset(root=root)
    report = SearchReport()
    dataset.search = report
    for folder in _walk_split_dirs(root, report=report):
        split = _split_name(folder)
        if split is None:
            continue
        if split in dataset.split_dirs:
            # Two copies (e.g. a zip unpacked twice): keep the first, shallowest one.
            warnings.warn(f"{folder}: second '{split}' split ignored; using {dataset.split_dirs[split]}", stacklevel=2)
            continue
        dataset.split_dirs[split] = folder
        pairs, unpaired = _pair_split(folder)
        setattr(dataset, split, pairs)
        dataset.unpaired.extend(unpaired)
    if not dataset.split_dirs:
        raise DataError(
            f"{root}: no dataset in the Duality layout found ({report.bounds()}); expected e.g. "
            f".../train/{IMAGE_DIR}/*.png with .../train/{MASK_DIR}/*.png, .../val/... and "
            f".../Offroad_Segmentation_testImages/{IMAGE_DIR}/*.png. Give the folder the archives were unzipped into."
        )
    return dataset


def _files_by_stem(folder: Path) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    by_stem: dict[str, Path] = {}
    duplicates = []
    if not folder.is_dir():
        return by_stem, duplicates
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in by_stem:
            # Prefer .png (the distributed format) over another extension with the same stem.
            keep, drop = (path, by_stem[path.stem]) if path.suffix.lower() == ".png" else (by_stem[path.stem], path)
            by_stem[path.stem] = keep
            duplicates.append((drop, f"duplicate stem '{path.stem}' (kept {keep.name})"))
        else:
            by_stem[path.stem] = path
    return by_stem, duplicates


def _pair_split(folder: Path) -> tuple[list[Pair], list[tuple[Path, str]]]:
    images, problems = _files_by_stem(folder / IMAGE_DIR)
    masks, mask_dupes = _files_by_stem(folder / MASK_DIR)
    problems += mask_dupes
    if not masks:
        # A split without masks (some test releases): images only.
        return [(images[s], None) for s in sorted(images)], problems
    pairs = [(images[s], masks[s]) for s in sorted(images) if s in masks]
    problems += [(images[s], "image without mask") for s in sorted(images) if s not in masks]
    problems += [(masks[s], "mask without image") for s in sorted(masks) if s not in images]
    return pairs, problems


def folder_pairs(folder: str | os.PathLike) -> list[Pair]:
    """The (image, mask or None) pairs of one folder a user names: a split folder in the Duality layout
    (holding Color_Images, with or without Segmentation), or a plain folder of images (no masks).

    For notebook 05's `adapt` images (masks, if any, are dropped there) and a held-out labelled part
    of a new desert. DataError when the folder is missing or holds no image.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (give a folder of images, or one holding {IMAGE_DIR}/)")
    if (folder / IMAGE_DIR).is_dir():
        pairs, _ = _pair_split(folder)
    else:
        images, _ = _files_by_stem(folder)
        pairs = [(images[stem], None) for stem in sorted(images)]
    if not pairs:
        raise DataError(f"{folder}: no image ({', '.join(IMAGE_SUFFIXES)}) found there or in {folder / IMAGE_DIR}")
    return pairs


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def truncation(path: Path) -> str | None:
    """'truncated PNG/JPEG (...)' when the file starts as one but lacks its end marker, else None.

    A cut-off download keeps its header but loses the end (PNG's IEND chunk, JPEG's EOI);
    checking costs two small reads, no decoding.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            handle.seek(max(0, path.stat().st_size - 12))
            tail = handle.read()
    except OSError:
        return None  # unreadable: the caller's own reason stands
    if head.startswith(_PNG_SIGNATURE) and not tail.endswith(_PNG_END):
        return "truncated PNG (no IEND chunk at the end)"
    if head.startswith(b"\xff\xd8") and not tail.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end marker)"
    return None


def too_large(err: Exception) -> str:
    """Plain words for PIL's DecompressionBombError (a header claiming an absurd size)."""
    numbers = re.findall(r"\d+", str(err))
    claimed = f"{int(numbers[0]):,} pixels, over Pillow's limit of {int(numbers[1]):,}" if len(numbers) >= 2 else str(err)
    return (f"image too large ({claimed}: a corrupt header or a decompression bomb; "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the image is real)")


def _open_png(path: Path) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a DataError naming it."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        img = Image.open(path)
        try:
            img.load()  # decode now: a truncated file fails here, not later inside a DataLoader
        except BaseException:
            img.close()  # else the open file lingers until garbage collection (a ResourceWarning)
            raise
        return img
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as err:  # not an OSError: would escape as a PIL traceback
        raise DataError(f"{path}: {too_large(err)}") from None
    except UnidentifiedImageError:
        # A PNG cut inside its header is unidentifiable too: say truncated where it is.
        raise DataError(f"{path}: {truncation(path) or 'not an image file (unrecognised format)'}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: {truncation(path) or f'corrupt image data ({err})'}") from None
    except Exception as err:  # noqa: BLE001 - a decoder's internal error on a malformed file (struct.error, ...)
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB image as uint8 (H, W, 3). Grey or RGBA inputs are converted; failures name the file."""
    img = _open_png(Path(path))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def read_raw_mask(path: str | os.PathLike) -> np.ndarray:
    """The mask's raw IDs as a 2-D integer array (8-, 16- or 32-bit single-channel PNG).

    An RGB(A) or two-channel mask is a DataError: colour-coded masks are a
    different format and guessing a mapping would give silently wrong labels.
    So is a JPEG mask, even a greyscale one: lossy compression alters the IDs.
    """
    path = Path(path)
    img = _open_png(path)
    if img.format == "JPEG":
        # A greyscale JPEG is single-channel, but lossy: the class IDs blur at every region edge.
        what = "named .png but is JPEG" if path.suffix.lower() == ".png" else "mask is a JPEG"
        raise DataError(f"{path}: {what}; lossy compression changes class IDs, "
                        "expected a single-channel PNG of raw class IDs")
    if img.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        raw = np.asarray(img)
        if img.mode == "1":
            raw = raw.astype(np.uint8)
        return raw
    raise DataError(
        f"{path}: mask has mode {img.mode} ({len(img.getbands())} channels); "
        "expected a single-channel PNG of raw class IDs (8, 16 or 32 bit)"
    )


def raw_to_index(raw: np.ndarray) -> np.ndarray:
    """Map raw IDs to class indices (uint8); unknown values become IGNORE_INDEX."""
    if raw.dtype == np.uint8 or raw.dtype == np.uint16:
        return RAW_TO_INDEX[raw]
    raw = raw.astype(np.int64, copy=False)
    out = np.full(raw.shape, IGNORE_INDEX, dtype=np.uint8)
    inside = (raw >= 0) & (raw < RAW_TO_INDEX.size)
    out[inside] = RAW_TO_INDEX[raw[inside]]
    return out


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Class indices (uint8, H x W) of a raw-ID mask; unknown raw values become 255."""
    return raw_to_index(read_raw_mask(path))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib level of every PNG the project writes: label maps are large flat regions that level 1 already
# compresses 60x; photos and overlays gain a few percent from higher levels at several times the time.
PNG_LEVEL = 1


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) image or a uint16 (H, W) mask, lossless.

    Written here rather than by Pillow, which tries every PNG filter on every row: the "Sub" filter
    alone (each byte minus the one a pixel before: one numpy subtraction) and zlib at `PNG_LEVEL`
    give files of the same size (714 vs 714 KB for a 960x540 overlay) in half the time (24 vs
    50-65 ms; a 16-bit mask 2 vs 7-11 ms), and writing predictions was dominated by it
    (bench/RESULTS.md, "The prediction path end to end"). Any PNG reader opens them.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8:
        depth, colour_type, step, rows = 8, 2, 3, pixels.reshape(pixels.shape[0], -1)
    elif pixels.ndim == 2 and pixels.dtype == np.uint8:
        depth, colour_type, step, rows = 8, 0, 1, pixels
    elif pixels.ndim == 2 and pixels.dtype == np.uint16:  # PNG stores 16-bit samples big-endian
        depth, colour_type, step = 16, 0, 2
        rows = pixels.astype(">u2", copy=False).view(np.uint8).reshape(pixels.shape[0], -1)
    else:
        raise ValueError(f"encode_png takes uint8 (H, W) or (H, W, 3), or uint16 (H, W); got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(rows)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 1  # filter type Sub: each byte minus the byte `step` before it (uint8 wrap-around, as PNG's)
    filtered[:, 1 : 1 + step] = rows[:, :step]
    np.subtract(rows[:, step:], rows[:, :-step], out=filtered[:, 1 + step :])
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), PNG_LEVEL)) + _png_chunk(b"IEND", b""))


def write_raw_mask(path: str | os.PathLike, raw: np.ndarray) -> None:
    """Write raw IDs as a single-channel 16-bit PNG (the masks' own format), atomically (`encode_png`)."""
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"{path}: a mask must be 2-D, got shape {raw.shape}")
    with atomic_open(path, "wb") as handle:
        handle.write(encode_png(raw.astype(np.uint16, copy=False)))


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically (`encode_png`)."""
    with atomic_open(path, "wb") as handle:
        handle.write(encode_png(np.asarray(rgb, dtype=np.uint8)))
