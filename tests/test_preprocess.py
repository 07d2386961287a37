"""The one preprocessing path: training's validation, evaluation and predict give a model the same input."""

import json

import numpy as np
import pytest
import torch
from helpers import make_small_dataset, stripes_mask, write_pair
from PIL import Image

from offroadseg import dataset
from offroadseg.chapters import assembly
from offroadseg.data import read_image, read_mask
from offroadseg.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    frames_to_batch,
    normalize,
    resize_image,
    resize_mask,
    resize_pair,
    to_model_input,
)
from offroadseg.scan import scan_dataset

NATIVE = (54, 96)  # (height, width) of the frames: larger than the model input, as Falcon's 540x960
INPUT = (20, 36)  # a shrink by 2.7, not a whole factor: every output pixel blends several inputs
GREY = 1 / 255 / min(IMAGENET_STD)  # one grey level, in normalised units (the largest per channel)


def test_normalize_round_trip_and_constants():
    x = torch.rand(2, 3, 5, 7)
    assert torch.allclose(denormalize(normalize(x)), x, atol=1e-6)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(normalize(mean), torch.zeros(3, 4, 4), atol=1e-6)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)
    # A model file's own statistics (JSON lists) work as well as the default tuples.
    assert torch.allclose(normalize(torch.full((3, 2, 2), 0.5), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]), torch.zeros(3, 2, 2))
    assert torch.equal(to_model_input(torch.full((3, 2, 2), 255, dtype=torch.uint8)), normalize(torch.ones(3, 2, 2)))


def test_images_are_antialiased_when_shrinking():
    # Every fourth column white, shrunk 4x: each output pixel covers one white and three black columns.
    # Antialiased, it is their mean (64); sampled without antialiasing it would be 0 or 255 (aliasing).
    stripes = torch.zeros(3, 16, 64, dtype=torch.uint8)
    stripes[..., ::4] = 255
    small = resize_image(stripes, (4, 16))
    assert small.dtype == torch.uint8 and small.shape == (3, 4, 16)
    interior = small[..., 1:-1].float()
    assert (interior - 255 / 4).abs().max() < 12, interior
    # Growing is plain bilinear; the same size is left alone (the same tensor, no copy).
    assert resize_image(stripes, (32, 128)).shape == (3, 32, 128)
    assert resize_image(stripes, (16, 64)) is stripes


def test_masks_take_the_label_under_each_cell_centre():
    # Shrinking 3x: cell i covers source columns 3i..3i+2 = classes (0, 1, 2); its centre is on class 1.
    # torch's plain "nearest" would take column 3i (class 0), half a pixel left of the image.
    mask = torch.tensor([0, 1, 2], dtype=torch.uint8).repeat(6, 8)
    small = resize_mask(mask, (2, 8))
    assert small.dtype == torch.uint8 and small.shape == (2, 8) and (small == 1).all()
    assert torch.equal(resize_mask(mask[None], (2, 8)), small[None])  # (1, H, W) too
    # A crop box is cropped first, as resize_image crops the image: columns 3.. of the mask.
    assert (resize_mask(mask, (6, 7), box=(0, 3, 6, 21)) == 1).all()
    assert torch.equal(resize_image(torch.zeros(3, 6, 24, dtype=torch.uint8), (6, 7), box=(0, 3, 6, 21)),
                       torch.zeros(3, 6, 7, dtype=torch.uint8))


def test_resize_pair_is_resize_image_and_resize_mask_on_numpy():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*NATIVE, 3), dtype=np.uint8)
    mask = rng.integers(0, 10, NATIVE, dtype=np.uint8)
    image.flags.writeable = False  # as PIL hands them over
    small, small_mask = resize_pair(image, mask, INPUT)
    assert small.shape == (*INPUT, 3) and small.dtype == np.uint8 and small.flags.c_contiguous
    expected = resize_image(torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(), INPUT)
    assert np.array_equal(small, expected.permute(1, 2, 0).numpy())
    assert np.array_equal(small_mask, resize_mask(torch.from_numpy(mask), INPUT).numpy())
    assert resize_pair(image, None, INPUT)[1] is None
    same_image, same_mask = resize_pair(image, mask, NATIVE)
    assert same_image is image and same_mask is mask


def test_frames_to_batch_keeps_order_across_sizes_and_checks_frames():
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(*NATIVE, 3), (30, 40, 3), (*NATIVE, 3)]]
    frames[1] = torch.from_numpy(frames[1])  # tensors too
    batch = frames_to_batch(frames, INPUT, "cpu", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert batch.shape == (3, 3, *INPUT) and batch.dtype == torch.float32
    for frame, row in zip(frames, batch):
        pixels = torch.as_tensor(frame).permute(2, 0, 1)
        assert torch.equal(row, to_model_input(resize_image(pixels, INPUT), [0.5] * 3, [0.5] * 3))
    with pytest.raises(ValueError, match=r"uint8 RGB \(H, W, 3\)"):
        frames_to_batch([np.zeros((*NATIVE, 3), np.float32)], INPUT, "cpu")


@pytest.fixture
def scanned(tmp_path):
    """A scanned dataset whose val frames are noise (the hardest case for equal pixels) at NATIVE size."""
    make_small_dataset(tmp_path / "data", 2, 0, 0)
    for index in range(3):
        write_pair(tmp_path / "data", "val", f"val{index:03d}", stripes_mask(*NATIVE))
    scan = scan_dataset(tmp_path / "data", workers=1, progress=False)
    assert scan["splits"]["val"]["usable"] == 3
    return scan


def test_training_validation_evaluation_and_predict_see_the_same_model_input(scanned, tmp_path):
    # 1. What training validates on: the val set of `chapters.assembly.datasets` through the decode cache on disk.
    _, val = assembly.datasets(scanned, INPUT, cache_dir=tmp_path / "cache")
    assert val.store is not None  # read from the memory-mapped cache, not decoded again
    val_images, val_masks = next(iter(dataset.eval_loader(val, batch_size=3)))
    # 2. What notebook 06 scores: native images and masks, resized by the transform.
    native = assembly.val_dataset(scanned, INPUT, native_masks=True)
    native_images, native_masks = next(iter(dataset.eval_loader(native, batch_size=3)))
    # 3. What predict computes: the decoded frames through frames_to_batch.
    frames = [read_image(image) for image, _ in native.pairs]
    predicted = frames_to_batch(frames, INPUT, "cpu")
    assert val_images.shape == native_images.shape == predicted.shape == (3, 3, *INPUT)
    # Equal to the bit on one device: the same resize (torch's uint8 kernel on the CPU), rounding and normalisation.
    assert torch.equal(val_images, native_images) and torch.equal(native_images, predicted)
    # The masks: native for notebook 06; nearest-exact at the model input for training's validation.
    truth = [torch.from_numpy(read_mask(mask)) for _, mask in native.pairs]
    assert torch.equal(native_masks, torch.stack(truth).long())
    assert torch.equal(val_masks, torch.stack([resize_mask(m, INPUT) for m in truth]).long())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_on_a_gpu_sees_the_cached_pixels_within_one_grey_level(scanned, tmp_path):
    # On a GPU torchvision interpolates in float32 and rounds; the CPU's uint8 kernel uses fixed-point
    # weights: the two round a share of the pixels differently, by one level at most (see preprocess).
    _, val = assembly.datasets(scanned, INPUT, cache_dir=tmp_path / "cache")
    cached = torch.stack([val[i][0] for i in range(len(val))])
    on_gpu = frames_to_batch([read_image(image) for image, _ in val.pairs], INPUT, "cuda").cpu()
    assert (on_gpu - cached).abs().max() <= GREY * 1.001


def test_a_cache_of_the_old_box_filter_format_is_rebuilt(scanned, tmp_path):
    # Format 1 held PIL's box-filtered pixels: read as this rule's, validation would drift from predict again.
    _, val = assembly.datasets(scanned, INPUT, cache_dir=tmp_path / "cache")
    frame = read_image(val.pairs[0][0])
    box = np.asarray(Image.fromarray(frame).resize(INPUT[::-1], Image.Resampling.BOX))
    assert not np.array_equal(box, val.load(0)[0])  # the two rules differ on this frame
    index = json.loads(val.store.index_path.read_text())
    val.store.index_path.write_text(json.dumps({**index, "version": 1}))
    _, again = assembly.datasets(scanned, INPUT, cache_dir=tmp_path / "cache")
    assert json.loads(again.store.index_path.read_text())["version"] == dataset.FORMAT_VERSION >= 2
    assert np.array_equal(again.load(0)[0], resize_pair(frame, None, INPUT)[0])
