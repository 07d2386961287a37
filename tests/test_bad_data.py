"""A corpus of broken data (issue 6): every kind of bad file a real download or a careless
export produces, in one dataset beside good pairs.

The contract: the scan names each bad file with a plain reason and skips it (unknown raw IDs
are summarised per split and keep their pair), training on the rest works, and a bad file read directly
is a DataError naming it, never an OSError or PIL traceback from deep inside.
"""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from helpers import split_dir, stripes_mask, write_pair
from PIL import Image
from torch import nn

from offroadseg import scan as scan_module
from offroadseg.chapters.assembly import datasets
from offroadseg.data import DataError, read_image, read_mask
from offroadseg.dataset import SegmentationDataset
from offroadseg.engine import TrainConfig, fit
from offroadseg.scan import problems_table, scan_dataset, usable_pairs

H, W = 24, 40
N_GOOD = 14  # with the bad pairs, more than the 32 jobs above which the scan uses worker processes
GOOD_UNICODE = "dünen_ß_日本"
BAD_UNICODE = "sable_cassé_砂丘"
COLON_NAME = "oasis: ü"  # the scan once split "<path>: <reason>" at the first ": ", keeping half the name


def png_claiming_size(width: int, height: int) -> bytes:
    """A complete, well-formed PNG whose header claims width x height: opening it trips PIL's
    decompression-bomb guard (an exception outside OSError) before any pixel is read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def cut_in_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def jpeg_bytes(array: np.ndarray) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


# file name -> (split, what the scan's reason must say) for every skipped file; the unknown-ID mask
# is kept and appears in the per-split unknown-ID summary instead.
EXPECTED = {
    "empty_image.png": ("train", "empty file (0 bytes)"),
    "empty_mask.png": ("train", "empty file (0 bytes)"),
    "truncated_image.png": ("train", "truncated PNG"),
    "truncated_mask.png": ("train", "truncated PNG"),
    "header_cut_image.png": ("train", "truncated PNG"),  # cut inside IHDR: PIL cannot even identify it
    "text_image.png": ("train", "not an image file"),
    "text_mask.png": ("train", "not an image file"),
    "jpeg_image.png": ("train", "named .png but is JPEG"),
    "jpeg_mask.png": ("train", "named .png but is JPEG"),
    "rgb_mask.png": ("train", "mask has mode RGB (3 channels)"),
    "size_mismatch.png": ("train", f"size {W}x{H} differs from image {W}x{H + 6}"),
    "dup.jpg": ("train", "duplicate stem 'dup' (kept dup.png)"),
    "no_mask.png": ("train", "image without mask"),
    "no_image.png": ("train", "mask without image"),
    f"{BAD_UNICODE}.png": ("train", "empty file (0 bytes)"),
    f"{COLON_NAME}.png": ("train", "empty file (0 bytes)"),
    "huge_image.png": ("train", "image too large"),
    "huge_mask.png": ("train", "image too large"),
    "val_truncated_mask.png": ("val", "truncated PNG"),
}
# Which file of each broken pair is the bad one (the other is fine and must not be listed).
BAD_IMAGE_STEMS = ("empty_image", "truncated_image", "header_cut_image", "text_image", "jpeg_image", "huge_image",
                   BAD_UNICODE)
BAD_MASK_STEMS = ("empty_mask", "truncated_mask", "text_mask", "jpeg_mask", "rgb_mask", "size_mismatch", "huge_mask",
                  COLON_NAME)


def write_corpus(root):
    """Good pairs plus one of every fault, in the Duality layout."""
    good = stripes_mask(H, W)
    for i in range(N_GOOD):
        write_pair(root, "train", f"good{i:03d}", good)
    for i in range(4):
        write_pair(root, "val", f"val{i:03d}", good)
    write_pair(root, "train", GOOD_UNICODE, good)
    for stem in BAD_IMAGE_STEMS + BAD_MASK_STEMS:
        write_pair(root, "train", stem, good)
    train = split_dir(root, "train")
    images, masks = train / "Color_Images", train / "Segmentation"

    (images / "empty_image.png").write_bytes(b"")
    (masks / "empty_mask.png").write_bytes(b"")
    cut_in_half(images / "truncated_image.png")
    cut_in_half(masks / "truncated_mask.png")
    (images / "header_cut_image.png").write_bytes((images / "header_cut_image.png").read_bytes()[:20])
    (images / "text_image.png").write_text("<html>404 Not Found</html>")  # a failed download
    (masks / "text_mask.png").write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    (images / "jpeg_image.png").write_bytes(jpeg_bytes(np.zeros((H, W, 3), np.uint8)))
    # A greyscale JPEG of raw IDs below 256: single-channel, so only its format gives it away;
    # lossy compression would blur the class IDs at every boundary.
    (masks / "jpeg_mask.png").write_bytes(jpeg_bytes(np.full((H, W), 100, np.uint8)))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(masks / "rgb_mask.png")
    write_pair(root, "train", "size_mismatch", good, image_size=(W, H + 6))
    (images / "huge_image.png").write_bytes(png_claiming_size(100_000, 100_000))
    (masks / "huge_mask.png").write_bytes(png_claiming_size(100_000, 100_000))
    (images / f"{BAD_UNICODE}.png").write_bytes(b"")
    (masks / f"{COLON_NAME}.png").write_bytes(b"")

    unknown = good.copy()
    unknown[0, :] = 7  # one row of each unknown ID: 40 px apiece
    unknown[1, :] = 12345
    write_pair(root, "train", "unknown_ids", unknown)

    write_pair(root, "train", "dup", good)
    (images / "dup.jpg").write_bytes(jpeg_bytes(np.zeros((H, W, 3), np.uint8)))
    write_pair(root, "train", "no_mask", good)
    (masks / "no_mask.png").unlink()
    write_pair(root, "train", "no_image", good)
    (images / "no_image.png").unlink()

    write_pair(root, "val", "val_truncated_mask", good)
    cut_in_half(split_dir(root, "val") / "Segmentation" / "val_truncated_mask.png")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("bad_data"))


@pytest.fixture(scope="module")
def scan(corpus):
    return scan_dataset(corpus, workers=1, progress=False)


def _problems(scan) -> dict[str, dict]:
    by_name = {}
    for row in scan["problems"]:
        name = os.path.basename(row["file"])
        assert name not in by_name, f"{name} reported twice: {by_name[name]} and {row}"
        by_name[name] = row
    return by_name


def test_scan_names_every_bad_file_with_its_reason(scan):
    problems = _problems(scan)
    # Exactly the bad files: no good file is listed, and none of the bad ones is missing.
    assert sorted(problems) == sorted(EXPECTED)
    for name, (split, reason) in EXPECTED.items():
        row = problems[name]
        assert row["problem"].startswith(reason), f"{name}: {row['problem']!r} does not say {reason!r}"
        assert row["split"] == split, name
        # The reason is plain words, not a raw exception dump naming the file a second time.
        assert row["file"] not in row["problem"] and "Error" not in row["problem"], row
        assert row["action"] == "skipped", name
    # A broken image is reported by its image path, a broken mask by its mask path.
    for stem in BAD_IMAGE_STEMS:
        assert os.path.basename(os.path.dirname(problems[f"{stem}.png"]["file"])) == "Color_Images", stem
    for stem in BAD_MASK_STEMS:
        assert os.path.basename(os.path.dirname(problems[f"{stem}.png"]["file"])) == "Segmentation", stem
    # The unknown-ID mask is kept and summarised per value (not a per-file problem).
    assert scan["unknown_raw_ids"] == {"7": 40, "12345": 40}
    assert {v: (r["pixels"], r["images"]) for v, r in scan["unknown_ids"]["train"].items()} == {"7": (40, 1), "12345": (40, 1)}


def test_problems_table_lists_every_bad_file(scan):
    table = problems_table(scan)
    for name in EXPECTED:
        line = next((line for line in table.splitlines() if name in line), None)
        assert line is not None, f"{name} missing from the table"
        assert EXPECTED[name][1] in line


def test_usable_pairs_are_the_good_ones(scan):
    usable = {(image.name, mask.name) for image, mask in usable_pairs(scan, "train")}
    kept = [f"good{i:03d}" for i in range(N_GOOD)] + [GOOD_UNICODE, "unknown_ids", "dup"]
    assert usable == {(f"{stem}.png", f"{stem}.png") for stem in kept}
    assert [image.name for image, _ in usable_pairs(scan, "val")] == [f"val{i:03d}.png" for i in range(4)]
    train = scan["splits"]["train"]
    assert train["usable"] == len(kept) and len(scan["sample_weights"]) == len(kept)
    # The unknown-ID pixels are not counted in any class: 2 rows of the 24 are left out.
    assert sum(train["class_pixels"]) == len(kept) * H * W - 2 * W


class TinyNet(nn.Module):
    """The smallest model fit accepts: logits at input resolution and a `spec`."""

    def __init__(self):
        super().__init__()
        self.spec = {"name": "tiny", "num_classes": 10, "options": {}}
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 1))

    def forward(self, x):
        return self.net(x)


def test_training_on_the_rest_works(scan, tmp_path, one_thread):
    train_set, val_set = datasets(scan, (16, 32))
    torch.manual_seed(0)
    config = TrainConfig(epochs=1, batch_size=2, precision="fp32", num_workers=0)
    history = fit(TinyNet(), train_set, val_set, config, tmp_path / "model",
                  sample_weights=scan["sample_weights"], progress=False)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert (tmp_path / "model" / "best.pt").exists()


def test_parallel_scan_records_bad_files_instead_of_crashing_the_pool(corpus, scan, monkeypatch):
    pools = []

    class CountingPool(scan_module.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(scan_module, "ProcessPoolExecutor", CountingPool)
    parallel = scan_dataset(corpus, workers=2, progress=False)
    assert pools, "the corpus is meant to be large enough for the scan to use worker processes"
    for key in ("splits", "problems", "unknown_raw_ids", "class_weights", "sample_weights"):
        assert parallel[key] == scan[key], key


def _pair(corpus, stem, split="train"):
    folder = split_dir(corpus, split)
    return folder / "Color_Images" / f"{stem}.png", folder / "Segmentation" / f"{stem}.png"


@pytest.mark.parametrize("stem, message", [
    ("empty_image", "empty file"),
    ("truncated_image", "truncated PNG"),
    ("text_image", "not an image file"),
    ("header_cut_image", "truncated PNG"),
    ("huge_image", "image too large"),
    (BAD_UNICODE, "empty file"),
])
def test_read_image_bad_file_is_data_error_naming_it(corpus, stem, message):
    path = _pair(corpus, stem)[0]
    with pytest.raises(DataError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)
    error = info.value  # no PIL traceback chained under it ("During handling of the above exception ...")
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.parametrize("stem, message", [
    ("jpeg_mask", "named .png but is JPEG"),
    ("huge_mask", "image too large"),
])
def test_read_mask_bad_file_is_data_error_naming_it(corpus, stem, message):
    # Empty, truncated, text and RGB masks are covered in test_data.py.
    path = _pair(corpus, stem)[1]
    with pytest.raises(DataError, match=message) as info:
        read_mask(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("stem, bad", [
    ("empty_image", 0), ("truncated_image", 0), ("huge_image", 0), (BAD_UNICODE, 0),
    ("empty_mask", 1), ("truncated_mask", 1), ("text_mask", 1), ("jpeg_mask", 1), ("rgb_mask", 1),
])
def test_segmentation_dataset_bad_pair_is_data_error_naming_the_file(corpus, stem, bad):
    pair = _pair(corpus, stem)
    with pytest.raises(DataError) as info:
        SegmentationDataset([pair], cache_size=(16, 32))[0]
    assert str(pair[bad]) in str(info.value)


def test_unexpected_decoder_error_is_a_problem_not_a_crash(corpus, tmp_path, monkeypatch):
    # Malformed files have made PIL's decoders raise struct.error, IndexError and the like,
    # outside the OSError family; simulate one for a single file.
    import struct as struct_module

    real_open = Image.open

    def open_failing_on_one(path, *args, **kwargs):
        if os.path.basename(str(path)) == "good001.png":
            raise struct_module.error("unpack requires a buffer of 4 bytes")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_failing_on_one)
    image_path, mask_path = _pair(corpus, "good001")
    for reader, path in ((read_image, image_path), (read_mask, mask_path)):
        with pytest.raises(DataError, match="unreadable image") as info:
            reader(path)
        assert str(path) in str(info.value)
    problems = {row["file"]: row for row in scan_dataset(corpus, workers=1, progress=False)["problems"]}
    for path in (image_path, mask_path):
        assert "unreadable image" in problems[str(path)]["problem"] and problems[str(path)]["action"] == "skipped"
