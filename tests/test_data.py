import numpy as np
import pytest
from helpers import TEST, TRAIN, make_small_dataset, split_dir, stripes_mask, write_pair
from PIL import Image

from offroadseg import data
from offroadseg.classes import IGNORE_INDEX, INDEX_TO_RAW, RAW_IDS
from offroadseg.data import DataError, find_dataset, read_image, read_mask, read_raw_mask, write_raw_mask


def test_find_dataset_pairs_by_stem(tmp_path):
    make_small_dataset(tmp_path, 3, 2, 1)
    ds = find_dataset(tmp_path)
    assert ds.summary() == {"train": 3, "val": 2, "test": 1}
    for image, mask in ds.train:
        assert image.stem == mask.stem and image.parent.name == "Color_Images" and mask.parent.name == "Segmentation"


def test_find_dataset_nested_unzip_and_kaggle_layout(tmp_path):
    # Kaggle: /kaggle/input/<dataset>/<zip name>/<zip name>/train/...
    root = tmp_path / "kaggle" / "input" / "offroad"
    make_small_dataset(root / TRAIN, 2, 1, 0)  # TRAIN/TRAIN/train: one level deeper, as archives unzip
    make_small_dataset(root / "extra", 0, 0, 2)
    ds = find_dataset(tmp_path / "kaggle")
    assert ds.summary() == {"train": 2, "val": 1, "test": 2}
    assert ds.split_dirs["train"] == root / TRAIN / TRAIN / "train"


def test_find_dataset_in_kaggles_current_mount_with_doubled_archive_folders(tmp_path):
    # /kaggle/input/datasets/<owner>/<name>/<zip>/<zip>/train: train is 8 levels below /kaggle.
    dataset_dir = tmp_path / "kaggle" / "input" / "datasets" / "someone" / "falcon-desert"
    make_small_dataset(dataset_dir / TRAIN, 2, 1, 0)
    write_pair(dataset_dir / TEST, "test", "t0")  # <name>/<test zip>/<test zip>/Color_Images
    for root in (tmp_path / "kaggle", tmp_path / "kaggle" / "input", dataset_dir):
        ds = find_dataset(root)
        assert ds.summary() == {"train": 2, "val": 1, "test": 1}, root
        assert ds.split_dirs["train"] == dataset_dir / TRAIN / TRAIN / "train"
    ds.require(("train", "val"))  # both there: no error


def test_a_dataset_without_train_or_val_says_what_was_found_where(tmp_path):
    make_small_dataset(tmp_path, 0, 0, 2)
    ds = find_dataset(tmp_path)
    with pytest.raises(DataError) as info:
        ds.require(("train", "val"))
    message = str(info.value)
    assert "no 'train' and 'val' split" in message and "training needs both" in message
    assert f"test        2 pairs  in {split_dir(tmp_path, 'test')}" in message
    assert "train  not found" in message and "The search listed 2 folders down to 1 levels" in message


def test_search_is_bounded_and_says_its_bounds(tmp_path, monkeypatch):
    import offroadseg.data as data

    deep = tmp_path
    for i in range(data.SEARCH_DEPTH + 2):
        deep = deep / f"d{i}"
    make_small_dataset(deep, 1, 1, 0)
    with pytest.raises(DataError, match=rf"down to {data.SEARCH_DEPTH} levels .*deeper than {data.SEARCH_DEPTH}"):
        find_dataset(tmp_path)
    wide = tmp_path / "wide"
    for i in range(30):
        (wide / f"f{i:02d}" / "x").mkdir(parents=True)
    monkeypatch.setattr(data, "SEARCH_FOLDERS", 10)
    with pytest.raises(DataError, match="stopped after 10 folders: give a folder nearer the dataset"):
        find_dataset(wide)


def test_missing_split_is_none_and_split_raises(tmp_path):
    make_small_dataset(tmp_path, 2, 0, 0)
    ds = find_dataset(tmp_path)
    assert ds.val is None and ds.test is None
    with pytest.raises(DataError, match="no 'val' split"):
        ds.split("val")


def test_test_split_without_masks(tmp_path):
    folder = split_dir(tmp_path, "test") / "Color_Images"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "a.png")
    ds = find_dataset(tmp_path)
    assert ds.test == [(folder / "a.png", None)]


def test_unpaired_files_are_reported_not_paired(tmp_path):
    make_small_dataset(tmp_path, 2, 0, 0)
    train = split_dir(tmp_path, "train")
    (train / "Segmentation" / "train000.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(train / "Segmentation" / "orphan.png")
    ds = find_dataset(tmp_path)
    assert [p[0].stem for p in ds.train] == ["train001"]
    reasons = {p.name: r for p, r in ds.unpaired}
    assert reasons == {"train000.png": "image without mask", "orphan.png": "mask without image"}


def test_duplicate_stem_prefers_png(tmp_path):
    make_small_dataset(tmp_path, 1, 0, 0)
    images = split_dir(tmp_path, "train") / "Color_Images"
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(images / "train000.jpg")
    ds = find_dataset(tmp_path)
    assert ds.train[0][0].suffix == ".png"
    assert any("duplicate stem" in r and p.suffix == ".jpg" for p, r in ds.unpaired)


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: p, "is empty"),
    (lambda p: (p / "stuff").mkdir() or p, "no dataset in the Duality layout"),
])
def test_bad_roots_are_clear_errors(tmp_path, setup, message):
    root = setup(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        find_dataset(root)
    assert str(root) in str(info.value)


def test_read_mask_maps_raw_ids_and_unknown_to_ignore(tmp_path):
    raw = np.array([[100, 200, 300, 500, 550], [600, 700, 800, 7100, 10000], [0, 1, 65535, 7100, 42]], np.uint16)
    path = tmp_path / "m.png"
    Image.fromarray(raw).save(path)
    mask = read_mask(path)
    assert mask.dtype == np.uint8
    assert mask[:2].ravel().tolist() == list(range(10))  # Flowers (600) is class 5, not forgotten
    assert (mask[2, [0, 1, 2, 4]] == IGNORE_INDEX).all()  # 0 is not "Background"


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_read_mask_8_16_32_bit(tmp_path, bits):
    # PNG itself stops at 16 bits per channel; 32-bit single-channel masks reach us as
    # PIL mode "I" (older Pillow opened 16-bit PNGs that way, TIFF exports store it).
    values = [100, 200] if bits == 8 else [100, 10000]
    dtype = {8: np.uint8, 16: np.uint16, 32: np.int32}[bits]
    raw = np.array([values * 3], dtype=dtype)
    path = tmp_path / ("m.tif" if bits == 32 else "m.png")
    Image.fromarray(raw).save(path)
    assert Image.open(path).mode == {8: "L", 16: "I;16", 32: "I"}[bits]
    expected = [0, 1] * 3 if bits == 8 else [0, 9] * 3
    assert read_mask(path).ravel().tolist() == expected


def test_read_mask_32bit_out_of_range_is_ignore(tmp_path):
    raw = np.array([[100, 70000, -5]], np.int32)
    path = tmp_path / "m.tif"
    Image.fromarray(raw).save(path)
    assert read_mask(path).tolist() == [[0, 255, 255]]


def test_rgb_mask_is_clear_error(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(DataError, match="RGB") as info:
        read_mask(path)
    assert str(path) in str(info.value)


def test_zero_byte_truncated_and_non_png_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 60000, (64, 64), dtype=np.uint16)).save(good)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.png"
    text.write_text("not a png")
    for path, message in ((empty, "empty file"), (truncated, "truncated"), (text, "not an image")):
        with pytest.raises(DataError, match=message) as info:
            read_mask(path)
        assert str(path) in str(info.value)


def test_read_image_rgb_and_roundtrip_mask_writer(tmp_path):
    image_path, _ = write_pair(tmp_path, "train", "a")
    assert read_image(image_path).shape == (12, 20, 3)
    raw = stripes_mask(5, 10)
    write_raw_mask(tmp_path / "out.png", raw)
    assert np.array_equal(read_raw_mask(tmp_path / "out.png"), raw)
    assert Image.open(tmp_path / "out.png").mode.startswith("I;16")
    # predictions written via INDEX_TO_RAW reopen to the same classes
    classes = np.arange(10, dtype=np.uint8).reshape(2, 5)
    write_raw_mask(tmp_path / "pred.png", INDEX_TO_RAW[classes])
    assert np.array_equal(read_mask(tmp_path / "pred.png"), classes)
    assert list(RAW_IDS) == INDEX_TO_RAW[:10].tolist()


def test_a_truncated_image_is_closed_when_it_fails_to_decode(tmp_path):
    import gc
    import warnings

    image_path, _ = write_pair(tmp_path, "train", "t0", stripes_mask(60, 80))
    image_path.write_bytes(image_path.read_bytes()[:200])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="truncated"):
            read_image(image_path)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("pixels", [
    np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8),  # a photo, odd sizes
    np.random.default_rng(1).integers(0, 256, (9, 7), dtype=np.uint8),
    np.array([[0, 100, 10000], [65535, 7100, 550]], dtype=np.uint16),  # raw IDs, 16-bit
])
def test_encode_png_is_lossless_and_any_reader_opens_it(pixels, tmp_path):
    encoded = data.encode_png(pixels)
    (tmp_path / "x.png").write_bytes(encoded)
    with Image.open(tmp_path / "x.png") as image:
        image.load()  # PIL checks every chunk's CRC and the zlib stream
        assert image.size == (pixels.shape[1], pixels.shape[0])
        back = np.asarray(image)
    assert back.shape == pixels.shape and np.array_equal(back.astype(np.int64), pixels.astype(np.int64))
    if pixels.dtype == np.uint16:  # 16-bit masks stay 16-bit: read_raw_mask gives the same raw IDs
        assert np.array_equal(data.read_raw_mask(tmp_path / "x.png"), pixels)


def test_encode_png_refuses_what_it_cannot_write():
    for bad in (np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4, 4), dtype=np.uint8), np.zeros((4, 4, 3), np.uint16)):
        with pytest.raises(ValueError, match="encode_png takes"):
            data.encode_png(bad)
