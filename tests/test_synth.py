"""The procedural desert: Duality layout and format, determinism, class balance, domain shift,
and that colour alone cannot solve it (nearest-class-mean RGB scores below 0.35 val mIoU).

Scenes are generated at half size (480x270) to keep the file fast; they scale with the size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from offroadseg.classes import CLASS_NAMES, NUM_CLASSES, RAW_IDS
from offroadseg.data import find_dataset, read_image, read_mask, read_raw_mask
from offroadseg.synth import DEMO_COUNTS, MARKER_NAME, make_demo_desert, make_desert, split_folder

SIZE = (480, 270)
COUNTS = {"train": 20, "val": 10, "test": 6}
FLOWERS, LOGS, LANDSCAPE, SKY = (CLASS_NAMES.index(n) for n in ("Flowers", "Logs", "Landscape", "Sky"))


@pytest.fixture(scope="module")
def desert(tmp_path_factory):
    """The demo recipe at half size: train/val in the default desert, test in the novel one."""
    root = tmp_path_factory.mktemp("desert")
    summary = make_demo_desert(root, counts=COUNTS, size=SIZE, progress=False)
    return summary, find_dataset(root)


@pytest.fixture(scope="module")
def train_data(desert):
    _, data = desert
    images = np.stack([read_image(i) for i, _ in data.train])
    masks = np.stack([read_mask(m) for _, m in data.train])
    return images, masks


def test_layout_and_format(desert):
    summary, data = desert
    assert summary["generated"] == ["train", "val", "test"]
    assert data.summary() == COUNTS
    assert not data.unpaired
    root = summary["root"]
    assert (root / "Offroad_Segmentation_Training_Dataset" / "train" / "Color_Images").is_dir()
    assert (root / "Offroad_Segmentation_Training_Dataset" / "val" / "Segmentation").is_dir()
    assert (root / "Offroad_Segmentation_testImages" / "Segmentation").is_dir()
    for split in ("train", "val", "test"):
        image_path, mask_path = data.split(split)[0]
        with Image.open(image_path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", SIZE)
        with Image.open(mask_path) as mask:
            assert mask.format == "PNG" and mask.mode.startswith("I;16") and mask.size == SIZE
        raw = read_raw_mask(mask_path)
        assert set(np.unique(raw)) <= set(RAW_IDS)  # raw IDs, nothing unknown (no ignore pixels)
        assert read_mask(mask_path).max() < NUM_CLASSES


def test_stems_unique_across_splits_and_domains(desert):
    _, data = desert
    stems = [i.stem for split in ("train", "val", "test") for i, _ in data.split(split)]
    assert len(set(stems)) == len(stems)
    assert all("novel" in i.stem for i, _ in data.test)
    assert all("default" in i.stem for i, _ in data.train + data.val)


def test_default_size_is_960x540(tmp_path):
    make_desert(tmp_path, {"val": 1}, seed=3, progress=False)
    (image_path, mask_path), = find_dataset(tmp_path).val
    assert read_image(image_path).shape == (540, 960, 3)
    assert read_raw_mask(mask_path).shape == (540, 960)


def _all_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_deterministic_across_processes_and_seeds(tmp_path):
    counts, size = {"train": 3, "test": 1}, (240, 136)
    a = make_desert(tmp_path / "a", counts, size=size, seed=5, workers=1, progress=False)["root"]
    b = make_desert(tmp_path / "b", counts, size=size, seed=5, workers=2, progress=False)["root"]
    c = make_desert(tmp_path / "c", counts, size=size, seed=6, workers=1, progress=False)["root"]
    files_a, files_b, files_c = _all_bytes(a), _all_bytes(b), _all_bytes(c)
    assert len(files_a) == 8
    assert files_a == files_b  # parallel generation gives byte-identical files
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a if "Color_Images" in k)  # another seed, other scenes


def test_all_classes_and_real_imbalance(train_data):
    _, masks = train_data
    counts = np.bincount(masks.ravel(), minlength=256)
    assert counts[NUM_CLASSES:].sum() == 0
    share = counts[:NUM_CLASSES] / counts.sum()
    presence = np.array([[np.any(m == c) for c in range(NUM_CLASSES)] for m in masks]).mean(0)
    missing = [CLASS_NAMES[c] for c in range(NUM_CLASSES) if counts[c] == 0]
    assert not missing, f"classes absent from train: {missing}"
    assert share[SKY] + share[LANDSCAPE] >= 0.5
    assert share[SKY] > 0.15 and share[LANDSCAPE] > 0.15
    for rare in (FLOWERS, LOGS):
        assert 0 < presence[rare] < 0.5, f"{CLASS_NAMES[rare]} in {presence[rare]:.0%} of images"
        assert 0 < share[rare] < 0.01, f"{CLASS_NAMES[rare]} covers {share[rare]:.2%} of pixels"
    # Every other class is a clear minority next to sky and landscape.
    assert share[:LANDSCAPE].max() < 0.2


def test_novel_domain_shifts_the_palette(desert, train_data):
    _, data = desert
    default_mean = train_data[0].reshape(-1, 3).mean(0)
    novel = np.stack([read_image(i) for i, _ in data.test])
    novel_mean = novel.reshape(-1, 3).mean(0)
    # The novel desert is redder: a clearly larger red/blue ratio and a shifted mean colour.
    assert novel_mean[0] / novel_mean[2] > 1.2 * default_mean[0] / default_mean[2]
    assert np.abs(novel_mean - default_mean).max() > 20


def _miou(pred: np.ndarray, truth: np.ndarray) -> float:
    cm = np.bincount(truth.ravel().astype(np.int64) * NUM_CLASSES + pred.ravel(), minlength=NUM_CLASSES**2)
    cm = cm.reshape(NUM_CLASSES, NUM_CLASSES)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0  # classes in truth or prediction
    return float((inter[present] / union[present]).mean())


def test_colour_alone_does_not_separate_the_classes(desert, train_data):
    """A per-pixel nearest-class-mean-RGB classifier fitted on train stays below 0.35 val mIoU."""
    images, masks = train_data
    pixels, labels = images.reshape(-1, 3).astype(np.float64), masks.ravel()
    means = np.stack([pixels[labels == c].mean(0) for c in range(NUM_CLASSES)])
    _, data = desert
    val_images = np.stack([read_image(i) for i, _ in data.val]).reshape(-1, 3).astype(np.float64)
    val_masks = np.stack([read_mask(m) for _, m in data.val]).ravel()
    pred = ((val_images[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    miou = _miou(pred, val_masks)
    assert 0.05 < miou < 0.35, f"colour baseline val mIoU {miou:.3f}"


def test_idempotent_and_regenerates_on_change(tmp_path):
    counts, size = {"train": 3, "val": 1}, (160, 90)
    first = make_desert(tmp_path, counts, size=size, progress=False)
    assert first["generated"] == ["train", "val"]
    marker = json.loads((tmp_path / MARKER_NAME).read_text())
    assert marker["train"]["count"] == 3 and marker["val"]["size"] == [160, 90]
    image = find_dataset(tmp_path).train[0][0]
    stamp = image.stat().st_mtime_ns
    again = make_desert(tmp_path, counts, size=size, progress=False)
    assert again["generated"] == [] and again["skipped"] == ["train", "val"]
    assert image.stat().st_mtime_ns == stamp
    # Fewer train images: the split is regenerated and no stale file lingers; val stays.
    fewer = make_desert(tmp_path, {"train": 2, "val": 1}, size=size, progress=False)
    assert fewer["generated"] == ["train"] and fewer["skipped"] == ["val"]
    assert find_dataset(tmp_path).summary() == {"train": 2, "val": 1, "test": None}
    # A missing file is noticed and regenerated.
    image = find_dataset(tmp_path).train[0][0]
    image.unlink()
    assert make_desert(tmp_path, {"train": 2}, size=size, progress=False)["generated"] == ["train"]
    assert image.is_file()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"domain": "moon"},
        {"counts": {"train": -1}},
        {"counts": {"training": 2}},
        {"counts": {"train": 1.5}},
        {"counts": [("train", 2)]},
        {"size": (10, 10)},
        {"size": "960x540"},
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs):
    args = {"counts": {"train": 1}, **kwargs}
    with pytest.raises(ValueError):
        make_desert(tmp_path, progress=False, **args)
    assert not any(tmp_path.iterdir())  # nothing written


def test_demo_counts_shape():
    assert set(DEMO_COUNTS) == {"train", "val", "test", "adapt", "novel_val"}
    assert all(isinstance(n, int) and n > 0 for n in DEMO_COUNTS.values())
    with pytest.raises(ValueError):
        make_demo_desert("/nonexistent", counts={"train": 1, "bogus": 1})


def test_adaptation_splits_are_novel_unlabelled_and_never_the_test_images(tmp_path):
    """adapt (images only) and novel_val (with masks) come from the novel desert, in their own folder that
    find_dataset does not take for train, val or test; no adapt or novel_val image equals a test image."""
    counts = {"train": 1, "val": 1, "test": 3, "adapt": 3, "novel_val": 2}
    summary = make_demo_desert(tmp_path, counts=counts, size=(128, 72), workers=1, progress=False)
    assert summary["generated"] == ["train", "val", "test", "adapt", "novel_val"]
    assert find_dataset(tmp_path).summary() == {"train": 1, "val": 1, "test": 3}
    adapt, novel_val = split_folder(tmp_path, "adapt"), split_folder(tmp_path, "novel_val")
    assert adapt.parent.name == novel_val.parent.name == "Offroad_Segmentation_Adaptation"
    adapt_images = sorted((adapt / "Color_Images").glob("*.png"))
    assert [p.stem for p in adapt_images] == [f"synth_novel_adapt_{i:05d}" for i in range(3)]
    assert not (adapt / "Segmentation").exists()  # unlabelled: no masks written
    assert len(list((novel_val / "Segmentation").glob("*.png"))) == 2
    test_images = [read_image(i).tobytes() for i, _ in find_dataset(tmp_path).test]
    for path in adapt_images + sorted((novel_val / "Color_Images").glob("*.png")):
        assert read_image(path).tobytes() not in test_images
    marker = json.loads((tmp_path / MARKER_NAME).read_text())
    assert marker["adapt"]["domain"] == marker["novel_val"]["domain"] == "novel"
    again = make_demo_desert(tmp_path, counts=counts, size=(128, 72), workers=1, progress=False)
    assert again["generated"] == []  # the unlabelled split counts as present without masks
