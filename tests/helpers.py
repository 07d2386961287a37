"""Small hand-made datasets in the Duality layout for unit tests (independent of synth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from offroadseg.classes import RAW_IDS

TRAIN = "Offroad_Segmentation_Training_Dataset"
TEST = "Offroad_Segmentation_testImages"


def split_dir(root: Path, split: str) -> Path:
    return root / (TEST if split == "test" else f"{TRAIN}/{split}")


def stripes_mask(height: int, width: int, classes=range(10)) -> np.ndarray:
    """Vertical stripes of the given class indices, as raw IDs (uint16)."""
    classes = list(classes)
    cols = np.arange(width) * len(classes) // width
    return np.tile(np.asarray([RAW_IDS[c] for c in classes], dtype=np.uint16)[cols], (height, 1))


def write_pair(root: Path, split: str, stem: str, raw: np.ndarray | None = None, image_size=None) -> tuple[Path, Path]:
    folder = split_dir(root, split)
    (folder / "Color_Images").mkdir(parents=True, exist_ok=True)
    (folder / "Segmentation").mkdir(parents=True, exist_ok=True)
    if raw is None:
        raw = stripes_mask(12, 20)
    h, w = raw.shape
    iw, ih = image_size or (w, h)
    image = np.random.default_rng(abs(hash(stem)) % 2**32).integers(0, 255, (ih, iw, 3), dtype=np.uint8)
    image_path = folder / "Color_Images" / f"{stem}.png"
    mask_path = folder / "Segmentation" / f"{stem}.png"
    Image.fromarray(image).save(image_path)
    Image.fromarray(raw.astype(np.uint16)).save(mask_path)
    return image_path, mask_path


def make_small_dataset(root: Path, n_train: int = 4, n_val: int = 2, n_test: int = 2) -> Path:
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            write_pair(root, split, f"{split}{i:03d}")
    return root
