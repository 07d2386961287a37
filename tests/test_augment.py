import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from offroadseg.augment import AugmentRecipe, eval_transform, train_transform
from offroadseg.classes import COLORS
from offroadseg.preprocess import denormalize

PALETTE = torch.tensor(COLORS, dtype=torch.float32)
# Every step off: a test turns on the one it looks at.
NOTHING = AugmentRecipe(crop_p=0, rotate_p=0, scale_p=0, flip_p=0, jitter_p=0)


def blocks(height=120, width=160):
    """A grid of blocks, one class each, whose image colour is the class colour."""
    rows, cols = np.mgrid[:height, :width]
    mask = ((rows * 2 // height) * 5 + (cols * 5 // width)).astype(np.uint8)
    return np.asarray(COLORS, dtype=np.uint8)[mask], mask


def uniform_neighbourhood(mask, radius):
    """True where every pixel within `radius` has the same class (ignore and off-frame count as others)."""
    m = mask.float()[None, None]
    m = torch.where(m == 255, torch.tensor(-1000.0), m)
    padded = F.pad(m, (radius,) * 4, value=-1000.0)
    k = 2 * radius + 1
    largest = F.max_pool2d(padded, k, 1)
    smallest = -F.max_pool2d(-padded, k, 1)
    return ((largest == smallest) & (m >= 0))[0, 0]


def test_augmentation_keeps_image_and_mask_aligned():
    image, mask = blocks()
    transform = train_transform((60, 80), AugmentRecipe(jitter_p=0.0))
    checked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, m = transform(image, mask)
        assert x.shape == (3, 60, 80) and x.dtype == torch.float32
        assert m.shape == (60, 80) and m.dtype == torch.int64
        assert set(m.unique().tolist()) <= set(range(10)) | {255}
        rgb = denormalize(x) * 255
        # Away from class edges (2 px band for bilinear blending) the colour is the class colour
        # (tolerance 12: the two closest class colours differ by 38 in some channel).
        inside = uniform_neighbourhood(m, radius=2)
        assert inside.sum() > 1000
        error = (rgb[:, inside] - PALETTE[m[inside]].T).abs().max()
        assert error < 12, f"seed {seed}: colour differs from the mask's class by {error:.1f}"
        # And over all labelled pixels, the mask names the nearest class colour almost everywhere.
        nearest = ((rgb[None] - PALETTE[:, :, None, None]) ** 2).sum(1).argmin(0)
        labelled = m != 255
        assert (nearest[labelled] == m[labelled]).float().mean() > 0.9
        checked += int(inside.sum())
    assert checked > 40 * 2000


def test_pixels_brought_in_from_outside_are_ignored():
    image, mask = blocks()
    rotate = train_transform((60, 80), replace(NOTHING, rotate_p=1.0, degrees=(20, 20)))
    x, m = rotate(image, mask)
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert m[corner] == 255
        assert x[(slice(None), *corner)].abs().max() < 0.05  # the mean colour normalises to ~0
    assert m[30, 40] != 255
    shrink = train_transform((60, 80), replace(NOTHING, scale_p=1.0, scale=(0.8, 0.8)))
    _, m = shrink(image, mask)
    assert (m[0] == 255).all() and (m[:, -1] == 255).all() and (m[30, 10:70] != 255).all()


def test_mask_resize_samples_cell_centres():
    # Downscaling 3x: cell i covers source columns 3i..3i+2 = classes (0, 1, 1), so its image
    # colour is mostly class 1. torch's plain "nearest" would pick column 3i (class 0).
    mask = np.tile(np.array([0, 1, 1], dtype=np.uint8), (6, 8))
    image = np.asarray(COLORS, dtype=np.uint8)[mask]
    _, m = eval_transform((2, 8))(image, mask)
    assert (m == 1).all()


def test_colour_jitter_changes_the_image_only():
    image, mask = blocks()
    jitter_only = train_transform((60, 80), replace(NOTHING, jitter_p=1.0))
    plain_x, plain_m = eval_transform((60, 80))(image, mask)
    torch.manual_seed(0)
    x, m = jitter_only(image, mask)
    assert torch.equal(m, plain_m)
    assert not torch.allclose(x, plain_x, atol=0.05)


def test_eval_transform_is_deterministic_and_accepts_all_input_forms():
    image, mask = blocks()
    transform = eval_transform((60, 80))
    x, m = transform(image, mask)
    torch.manual_seed(123)
    x2, m2 = transform(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask))
    assert torch.equal(x, x2) and torch.equal(m, m2)
    x3, m3 = transform(Image.fromarray(image), mask.astype(np.int64))
    assert torch.equal(x, x3) and torch.equal(m, m3)
    x4, none = transform(torch.from_numpy(image))  # (H, W, 3) tensor, no mask
    assert torch.equal(x, x4) and none is None
    native_x, native_m = eval_transform()(image, mask)
    assert native_x.shape == (3, 120, 160) and torch.equal(native_m, torch.from_numpy(mask).long())
    _, full_m = eval_transform((60, 80), keep_mask_size=True)(image, mask)
    assert full_m.shape == (120, 160)


def test_bad_inputs_are_errors():
    image, mask = blocks()
    with pytest.raises(ValueError, match="raw IDs"):
        eval_transform((60, 80))(image, mask.astype(np.int32) * 100 + 100)
    with pytest.raises(ValueError, match="differ in size"):
        eval_transform((60, 80))(image, mask[:-1])
    with pytest.raises(ValueError, match="uint8 RGB"):
        eval_transform((60, 80))(image.astype(np.float32), mask)


def test_recipe_checks_probabilities_and_holds_tuples():
    with pytest.raises(ValueError, match="rotate_p=1.5: a probability"):
        AugmentRecipe(rotate_p=1.5)
    from_json = AugmentRecipe(crop_scale=[0.6, 1.0], degrees=[-5, 5], scale=[0.9, 1.1], jitter=[0.1, 0.1, 0.1, 0.0])
    assert from_json == AugmentRecipe(crop_scale=(0.6, 1.0), degrees=(-5, 5), scale=(0.9, 1.1), jitter=(0.1, 0.1, 0.1, 0.0))
    assert hash(from_json) == hash(replace(from_json))
    assert AugmentRecipe(degrees=15).degrees == 15  # a bound stays a bound


def test_transforms_pickle_for_dataloader_workers():
    image, mask = blocks()
    transform = pickle.loads(pickle.dumps(train_transform((60, 80))))
    torch.manual_seed(0)
    x, m = transform(image, mask)
    assert x.shape == (3, 60, 80) and m.shape == (60, 80)
