import os
import time

import numpy as np
import pytest
from helpers import make_small_dataset, split_dir, stripes_mask, write_pair
from PIL import Image

from offroadseg.classes import RAW_IDS
from offroadseg.files import read_json
from offroadseg.scan import (
    class_table,
    class_weights,
    load_or_scan,
    problems_table,
    sample_weights,
    scan_dataset,
    unknown_ids_table,
    usable_pairs,
)


def _problems(scan):
    return {os.path.basename(p["file"]): p["problem"] for p in scan["problems"]}


def test_counts_and_presence(tmp_path):
    make_small_dataset(tmp_path, 3, 1, 1)
    write_pair(tmp_path, "train", "onlysky", np.full((12, 20), 10000, np.uint16))
    scan = scan_dataset(tmp_path, workers=1, progress=False)
    train = scan["splits"]["train"]
    assert train["usable"] == 4 and scan["problems"] == []
    stripe = np.bincount(np.arange(20) * 10 // 20, minlength=10) * 12  # pixels per class in one stripes mask
    expected = 3 * stripe
    expected[9] += 12 * 20
    assert train["class_pixels"] == expected.tolist()
    assert train["class_presence"] == [3] * 9 + [4]
    assert len(scan["sample_weights"]) == 4 and len(scan["class_weights"]) == 10


def test_bad_pairs_are_reported_and_skipped_not_raised(tmp_path):
    make_small_dataset(tmp_path, 2, 0, 0)
    train = split_dir(tmp_path, "train")
    write_pair(tmp_path, "train", "badsize", stripes_mask(12, 20), image_size=(30, 12))
    write_pair(tmp_path, "train", "rgbmask")
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(train / "Segmentation" / "rgbmask.png")
    write_pair(tmp_path, "train", "empty")
    (train / "Segmentation" / "empty.png").write_bytes(b"")
    write_pair(tmp_path, "train", "trunc")
    data = (train / "Color_Images" / "trunc.png").read_bytes()
    (train / "Color_Images" / "trunc.png").write_bytes(data[: len(data) - 20])
    write_pair(tmp_path, "train", "notpng")
    (train / "Color_Images" / "notpng.png").write_text("hello")
    write_pair(tmp_path, "train", "jpeginside")
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(train / "Color_Images" / "jpeginside.png", format="JPEG")
    raw = stripes_mask(12, 20)
    raw[0, :5] = 0
    write_pair(tmp_path, "train", "unknown", raw)
    (train / "Color_Images" / "lonely.png").write_bytes((train / "Color_Images" / "unknown.png").read_bytes())

    scan = scan_dataset(tmp_path, workers=1, progress=False)
    problems = _problems(scan)
    assert "differs from image 30x12" in problems["badsize.png"]
    assert "mode RGB" in problems["rgbmask.png"]
    assert "empty file" in problems["empty.png"]
    assert "truncated PNG" in problems["trunc.png"]
    assert "not an image" in problems["notpng.png"]
    assert "named .png but is JPEG" in problems["jpeginside.png"]
    assert problems["lonely.png"] == "image without mask"
    # Unknown raw IDs are summarised per split and value, not listed per file as a problem.
    assert "unknown.png" not in problems
    stems = [img["stem"] for img in scan["splits"]["train"]["images"]]
    assert stems == ["train000", "train001", "unknown"]  # the pair with unknown IDs is kept
    assert scan["unknown_raw_ids"] == {"0": 5}
    row = scan["unknown_ids"]["train"]["0"]
    assert row["pixels"] == 5 and row["images"] == 1 and row["examples"][0].endswith("unknown.png")
    assert "expected in some releases" in unknown_ids_table(scan)
    table = problems_table(scan)
    assert "badsize.png" in table and "skipped" in table
    assert [p.stem for p, _ in usable_pairs(scan, "train")] == stems


def test_parallel_equals_serial(tmp_path):
    make_small_dataset(tmp_path, 40, 4, 2)
    serial = scan_dataset(tmp_path, workers=1, progress=False)
    parallel = scan_dataset(tmp_path, workers=2, progress=False)
    for key in ("splits", "class_weights", "sample_weights", "problems"):
        assert serial[key] == parallel[key]


def test_class_weights_formula():
    counts = [900, 100, 0] + [0] * 7
    w = class_weights(counts)
    f = np.array([0.9, 0.1])
    expected = f**-0.5 / np.sum(f**0.5)
    assert w[:2] == pytest.approx(expected.tolist())
    assert np.dot(f, w[:2]) == pytest.approx(1.0)  # pixel-averaged weight is 1
    assert w[2] == pytest.approx(max(w[:2]))  # absent class: largest present weight
    assert w[1] > w[0]


def test_sample_weights_boost_rare_classes_capped():
    pixels = np.zeros((100, 10), np.int64)
    pixels[:, 9] = 1000  # sky everywhere: no boost
    pixels[:2, 5] = 100  # flowers in 2% of images: 0.5/0.02 = 25 -> capped at 10
    pixels[:20, 6] = 100  # logs in 20%: 2.5x
    pixels[2:4, 7] = 5  # below the presence threshold: not counted
    weights, factors = sample_weights(pixels)
    assert factors[9] == 1.0 and factors[5] == 10.0 and factors[6] == pytest.approx(2.5)
    assert weights[0] == 10.0 and weights[10] == pytest.approx(2.5) and weights[50] == 1.0 and weights[3] == 2.5


def test_scan_json_reused_until_files_change(tmp_path):
    make_small_dataset(tmp_path / "data", 3, 1, 0)
    out = tmp_path / "run" / "scan.json"
    first = load_or_scan(tmp_path / "data", out, workers=1, progress=False)
    assert not first["reused"] and out.exists()
    assert read_json(out)["class_weights"] == first["class_weights"]
    assert load_or_scan(tmp_path / "data", out, workers=1, progress=False)["reused"]
    time.sleep(0.01)
    write_pair(tmp_path / "data", "train", "new", np.full((12, 20), RAW_IDS[5], np.uint16))
    again = load_or_scan(tmp_path / "data", out, workers=1, progress=False)
    assert not again["reused"] and again["splits"]["train"]["usable"] == 4
    out.write_text("{ broken")
    assert not load_or_scan(tmp_path / "data", out, workers=1, progress=False)["reused"]


def test_class_table_lists_every_class(tmp_path):
    make_small_dataset(tmp_path, 2, 0, 0)
    table = class_table(scan_dataset(tmp_path, workers=1, progress=False))
    for name in ("Trees", "Flowers", "Sky"):
        assert name in table


def test_raw_zero_in_every_mask_is_one_summary_row_per_split(tmp_path):
    """Some releases hold raw value 0 in every mask: one row per split, never one problem per file."""
    for split, n in (("train", 5), ("val", 3)):
        for i in range(n):
            raw = stripes_mask(12, 20)
            raw[0, : i + 1] = 0
            if split == "train" and i == 0:
                raw[1, 0] = 42  # a real stray value stays visible beside the 0s
            write_pair(tmp_path, split, f"{split}{i}", raw)
    scan = scan_dataset(tmp_path, workers=1, progress=False)
    assert scan["problems"] == []
    assert scan["unknown_ids"]["train"]["0"] == {"pixels": 15, "images": 5, "examples": [
        str(split_dir(tmp_path, "train") / "Segmentation" / f"train{i}.png") for i in range(3)]}
    assert scan["unknown_ids"]["val"]["0"]["images"] == 3 and scan["unknown_ids"]["train"]["42"]["images"] == 1
    table = unknown_ids_table(scan).splitlines()
    assert len(table) == 1 + 3  # header, train 0, train 42, val 0
    assert "train0.png" in table[2] and "not in the class table" in table[2]
