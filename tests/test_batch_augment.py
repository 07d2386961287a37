"""BatchAugment (whole batches on their device) against the CPU path, on CPU.

The reference is built from the ops that SegmentationTransform's steps call (the crop and
resize of `preprocess`, torchvision's affine for rotation then scale, horizontal_flip,
adjust_*), run with the same fixed parameters.
"""

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from offroadseg.augment import AugmentRecipe, eval_transform, to_tensors, train_transform
from offroadseg.batch_augment import BRIGHTNESS, CONTRAST, HUE, SATURATION, BatchAugment
from offroadseg.classes import COLORS, IGNORE_INDEX
from offroadseg.preprocess import denormalize, normalize, resize_image, resize_mask

pytestmark = pytest.mark.usefixtures("one_thread")

PALETTE = torch.tensor(COLORS, dtype=torch.float32)
SIZE = (120, 160)  # the model input; inputs are 1.5x, as assembly.TRAIN_CACHE_SCALE caches them
INPUT = (180, 240)
# One grey level in normalised units (the mean of the three channels' std).
GREY = 1 / (255 * 0.226)
# Every step off: a test turns on the one it looks at.
NOTHING = AugmentRecipe(crop_p=0, rotate_p=0, scale_p=0, flip_p=0, jitter_p=0)


def blocks(height=INPUT[0], width=INPUT[1]):
    """Classes in a 3 x 5 grid of blocks (every class present), the image coloured by class."""
    rows, cols = np.mgrid[:height, :width]
    mask = (((rows * 3 // height) * 5 + (cols * 5 // width)) % 10).astype(np.uint8)
    return np.asarray(COLORS, dtype=np.uint8)[mask], mask


def texture(height=INPUT[0], width=INPUT[1], seed=0):
    """A smooth random RGB texture: fine detail shows resampling differences that flat blocks hide."""
    noise = torch.from_numpy(np.random.default_rng(seed).random((1, 3, height // 3, width // 3), dtype=np.float32))
    smooth = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    return (smooth[0] * 255).round().byte().permute(1, 2, 0).numpy()


def fixed(augment, batch=1, box=None, angle=0.0, scale=1.0, flip=False, jitter=None, order=None, shape=INPUT):
    """Parameters with every step off except those given (probabilities of `augment` are ignored)."""
    params = BatchAugment(augment.size, NOTHING).sample(batch, *shape)
    if box is not None:
        params.box = torch.tensor([box] * batch, dtype=torch.float32)
    params.angle[:], params.scale[:], params.flip[:] = angle, scale, flip
    if jitter is not None:
        params.jitter[:] = True
        params.brightness[:], params.contrast[:], params.saturation[:], params.hue[:] = jitter
        params.order = torch.tensor([order] * batch)
    return params


def cpu_reference(image, mask, box=None, angle=0.0, scale=1.0, flip=False, size=SIZE):
    """SegmentationTransform's geometric steps with fixed parameters: (normalised image, int64 mask)."""
    image, mask = to_tensors(image, mask)
    box = box or (0, 0, *image.shape[-2:])
    image = tv_tensors.Image(resize_image(image, size, box))
    mask = tv_tensors.Mask(resize_mask(mask[None], size, box))
    fill = [round(255 * m) for m in (0.485, 0.456, 0.406)]
    for step_angle, step_scale in ((angle, 1.0), (0.0, scale)):  # two RandomAffine steps: rotation, then scale
        if (step_angle, step_scale) != (0.0, 1.0):
            common = {"angle": step_angle, "translate": [0, 0], "scale": step_scale, "shear": [0.0, 0.0]}
            image = TF.affine(image, **common, interpolation=InterpolationMode.BILINEAR, fill=fill)
            mask = TF.affine(mask, **common, fill=IGNORE_INDEX)
    if flip:
        image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
    image = normalize(image.as_subclass(torch.Tensor).float() / 255)
    return image, mask.as_subclass(torch.Tensor)[0].long()


def batch_of(image, mask, count=1):
    image, mask = to_tensors(image, mask)
    return image.expand(count, -1, -1, -1).contiguous(), mask.expand(count, -1, -1).contiguous()


def class_edges(mask, radius=1):
    """True where a pixel within `radius` holds another label (ignore included)."""
    m = mask.float()[None, None]
    padded = F.pad(m, (radius,) * 4, mode="replicate")
    k = 2 * radius + 1
    return (F.max_pool2d(padded, k, 1) != -F.max_pool2d(-padded, k, 1))[0, 0]


def decoded_classes(image):
    """Each pixel's nearest class colour, from a normalised (3, H, W) image."""
    rgb = denormalize(image) * 255
    return ((rgb[None] - PALETTE[:, :, None, None]) ** 2).sum(1).argmin(0)


CASES = {
    # name: (box top, left, height, width or None, angle, scale, flip)
    "resize only": (None, 0.0, 1.0, False),
    "flip only": (None, 0.0, 1.0, True),
    "crop box": ((30, 40, 132, 176), 0.0, 1.0, False),
    "crop at 2x": ((20, 40, 160, 200), 0.0, 1.0, False),  # ties for nearest: every sample point is half-way
    "rotation 17": (None, 17.0, 1.0, False),
    "zoom out 0.8": (None, 0.0, 0.8, False),
    "zoom in 1.15": (None, 0.0, 1.15, False),
    "rotation 17 + zoom out 0.8": (None, 17.0, 0.8, False),
    "everything": ((30, 40, 132, 176), -12.0, 1.15, True),
    "everything, zoomed out": ((30, 40, 132, 176), -12.0, 0.85, True),
}
# Exact-grid cases: one nearest-neighbour step on both sides, so the masks must agree everywhere.
SINGLE_STEP = {"resize only", "flip only", "crop box", "crop at 2x"}


@pytest.mark.parametrize("name", list(CASES))
def test_fixed_parameters_match_the_cpu_path(name):
    box, angle, scale, flip = CASES[name]
    augment = BatchAugment(SIZE)
    image, mask = blocks()
    ref_x, ref_m = cpu_reference(image, mask, box, angle, scale, flip)
    x, m = augment.apply(*batch_of(image, mask), fixed(augment, box=box, angle=angle, scale=scale, flip=flip))
    x, m = x[0], m[0]
    inner = (slice(2, -2), slice(2, -2))  # the frame's outermost pixels blend with the fill differently
    agree = (m == ref_m)[inner].float().mean().item()
    # Off class edges the labels must be identical; on them the CPU path's second nearest step
    # (rotation or zoom after the resize) can round a boundary one pixel the other way.
    settled = ~class_edges(ref_m)[inner]
    assert (m == ref_m)[inner][settled].all()
    assert agree == 1.0 if name in SINGLE_STEP else agree > 0.98, f"{name}: masks agree on {agree:.4f}"
    assert ((m == IGNORE_INDEX) == (ref_m == IGNORE_INDEX))[inner].float().mean() > 0.995
    # Images: within a grey level or two on average, on flat colours and on fine texture alike.
    blocks_error = (x - ref_x)[:, 2:-2, 2:-2].abs().mean() / GREY
    tex_x, _ = augment.apply(*batch_of(texture(), mask), fixed(augment, box=box, angle=angle, scale=scale, flip=flip))
    tex_ref, _ = cpu_reference(texture(), mask, box, angle, scale, flip)
    texture_error = (tex_x[0] - tex_ref)[:, 2:-2, 2:-2].abs().mean() / GREY
    assert blocks_error < 2 and texture_error < 8, f"{name}: {blocks_error:.2f} / {texture_error:.2f} grey levels"


@pytest.mark.parametrize("angle, zoom", [(17.0, 0.8), (-20.0, 0.8), (8.0, 0.9)])
def test_rotation_with_zoom_out_ignores_the_same_pixels_on_both_paths(angle, zoom):
    # About a quarter of training samples are rotated and zoomed out. The CPU path rotates (filling the
    # corners), then zooms out (filling around the rotated frame): the batch path must ignore as much.
    recipe = replace(NOTHING, rotate_p=1.0, degrees=(angle, angle), scale_p=1.0, scale=(zoom, zoom), flip_p=1.0)
    image, mask = blocks()
    ref_x, ref_m = train_transform(SIZE, recipe)(image, mask)
    x, m = BatchAugment(SIZE, recipe)(*batch_of(image, mask))
    x, m = x[0], m[0]
    cpu_ignored = (ref_m == IGNORE_INDEX).float().mean().item()
    batch_ignored = (m == IGNORE_INDEX).float().mean().item()
    assert cpu_ignored > 1 - zoom**2 + 0.03  # more than the zoom-out alone: the rotation's corners show too
    assert batch_ignored == pytest.approx(cpu_ignored, abs=0.01)
    assert ((m == IGNORE_INDEX) == (ref_m == IGNORE_INDEX)).float().mean() > 0.995
    # Image and mask aligned: the colour names the mask's class, and off class edges the two paths agree.
    labelled = m != IGNORE_INDEX
    assert (decoded_classes(x)[labelled] == m[labelled]).float().mean() > 0.98
    assert (m == ref_m)[labelled & ~class_edges(ref_m)].all()
    assert x[:, ~labelled & ~class_edges(m)].abs().max() < 0.05  # ignored pixels hold the mean colour


def test_antialiasing_follows_the_cpu_resize():
    # Shrinking 1.5x: the four-tap approximation is much closer to the antialiased resize than one tap.
    image, mask = texture(), blocks()[1]
    ref, _ = cpu_reference(image, mask)
    errors = {}
    for antialias in (True, False):
        augment = BatchAugment(SIZE, antialias=antialias)
        x, _ = augment.apply(*batch_of(image, mask), fixed(augment))
        errors[antialias] = ((x[0] - ref).abs().mean() / GREY).item()
    assert errors[True] < 1.5 and errors[True] < errors[False] / 2.5, errors


def test_probabilities_zero_give_the_eval_transform():
    augment = BatchAugment(SIZE, NOTHING)
    for image, mask in (blocks(), (texture(), blocks()[1])):
        x, m = augment(*batch_of(image, mask, 3))
        ref_x, ref_m = eval_transform(SIZE)(image, mask)
        assert torch.equal(m, ref_m.expand(3, -1, -1))
        assert ((x - ref_x).abs().mean() / GREY) < 1.5
    # Nearest-exact, as the CPU path: a 3x shrink of columns (0, 1, 1) samples the middle column.
    stripes = np.tile(np.array([0, 1, 1], dtype=np.uint8), (6, 8))
    _, m = BatchAugment((2, 8), NOTHING)(
        *batch_of(np.asarray(COLORS, dtype=np.uint8)[stripes], stripes))
    assert (m == 1).all()


@pytest.mark.parametrize("order", [(BRIGHTNESS, CONTRAST, SATURATION, HUE), (HUE, SATURATION, CONTRAST, BRIGHTNESS),
                                   (CONTRAST, HUE, BRIGHTNESS, SATURATION)])
def test_colour_jitter_matches_torchvision(order):
    factors = (1.25, 0.75, 1.3, 0.04)
    image, mask = texture(*SIZE), blocks(*SIZE)[1]
    augment = BatchAugment(SIZE)
    x, m = augment.apply(*batch_of(image, mask), fixed(augment, jitter=factors, order=order, shape=SIZE))
    ops = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast,
           SATURATION: TF.adjust_saturation, HUE: TF.adjust_hue}
    ref = to_tensors(image)[0].float() / 255
    for op in order:
        ref = ops[op](ref, factors[op])
    assert (x[0] - normalize(ref)).abs().max() < 1e-3  # the same maths in float
    assert torch.equal(m[0], torch.from_numpy(mask).long())  # the mask is untouched
    # The CPU path jitters uint8 images, rounding after each step: within a couple of grey levels.
    ref_uint8 = to_tensors(image)[0]
    for op in order:
        ref_uint8 = ops[op](ref_uint8, factors[op])
    assert (x[0] - normalize(ref_uint8.float() / 255)).abs().mean() / GREY < 2


def test_jitter_is_per_sample_and_skips_samples_without_it():
    image, mask = batch_of(texture(*SIZE), blocks(*SIZE)[1], 3)
    augment = BatchAugment(SIZE)
    params = fixed(augment, batch=3, jitter=(1.2, 0.8, 1.1, -0.03), order=(HUE, BRIGHTNESS, SATURATION, CONTRAST),
                   shape=SIZE)
    params.jitter[1] = False
    params.brightness[2] = 0.9
    x, _ = augment.apply(image, mask, params)
    plain, _ = eval_transform()(image[0], mask[0])
    assert torch.allclose(x[1], plain, atol=1e-4)  # sampling at the pixel centres: the input itself
    assert not torch.allclose(x[0], plain, atol=0.05) and not torch.allclose(x[0], x[2], atol=0.05)


def test_random_augmentation_keeps_image_and_mask_aligned():
    image, mask = batch_of(*blocks(), 24)
    torch.manual_seed(0)
    x, m = BatchAugment(SIZE, AugmentRecipe(jitter_p=0))(image, mask)
    for i in range(len(x)):
        labelled = m[i] != IGNORE_INDEX
        assert labelled.sum() > 0.3 * m[i].numel()
        agree = (decoded_classes(x[i])[labelled] == m[i][labelled]).float().mean()
        assert agree > 0.98, f"sample {i}: the image's colour names the mask's class on {agree:.4f}"


def test_pixels_from_outside_are_ignore_and_mean_colour():
    image, mask = blocks()
    augment = BatchAugment(SIZE)
    x, m = augment.apply(*batch_of(image, mask), fixed(augment, angle=20.0))
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert m[(0, *corner)] == IGNORE_INDEX
        assert x[(0, slice(None), *corner)].abs().max() < 0.05  # the mean colour normalises to ~0
    assert (m[0, 50:70, 70:90] != IGNORE_INDEX).all()
    x, m = augment.apply(*batch_of(image, mask), fixed(augment, scale=0.8))
    assert (m[0, :5] == IGNORE_INDEX).all() and (m[0, :, -5:] == IGNORE_INDEX).all()
    assert (m[0, 20:100, 20:140] != IGNORE_INDEX).all()
    assert x[0, :, :5].abs().max() < 0.05
    # A zoomed-out crop shows fill outside the crop, as the CPU path does, not the input around it.
    _, m = augment.apply(*batch_of(image, mask), fixed(augment, box=(30, 40, 132, 176), scale=0.8))
    _, ref_m = cpu_reference(image, mask, (30, 40, 132, 176), scale=0.8)
    assert (m[0] == IGNORE_INDEX).float().mean() > 0.3  # zoom 0.8 leaves 1 - 0.8^2 = 36% outside the frame
    assert ((m[0] == IGNORE_INDEX) == (ref_m == IGNORE_INDEX)).float().mean() > 0.995


def test_flip_happens_to_about_half_of_a_batch():
    # An asymmetric input, nothing else random: each output is the plain resize or its mirror image.
    image, mask = batch_of(*blocks(), 200)
    torch.manual_seed(0)
    x, m = BatchAugment(SIZE, replace(NOTHING, flip_p=0.5))(image, mask)
    plain_x, plain_m = eval_transform(SIZE)(image[0], mask[0])
    flipped = (m == plain_m.flip(-1)).flatten(1).all(1)
    assert (flipped | (m == plain_m).flatten(1).all(1)).all()
    assert 80 <= int(flipped.sum()) <= 120
    error = x[flipped] - plain_x.flip(-1)
    assert error.abs().mean() < GREY and error.abs().max() < 0.1  # resampling differs a little at class edges


def test_random_parameters_follow_train_transform():
    torch.manual_seed(0)
    augment = BatchAugment(SIZE)
    p = augment.sample(4000, *INPUT)
    whole = (p.box == torch.tensor([0, 0, *INPUT])).all(1)
    for drawn, probability in ((~whole, 0.5), (p.angle != 0, 0.7), (p.scale != 1, 0.7), (p.flip, 0.5), (p.jitter, 0.8)):
        assert abs(drawn.float().mean().item() - probability) < 0.03
    top, left, height, width = p.box[~whole].unbind(1)
    area = height * width / (INPUT[0] * INPUT[1])
    assert area.min() > 0.49 and area.max() <= 1.0 and area.mean().item() == pytest.approx(0.75, abs=0.02)
    assert ((width / height) - SIZE[1] / SIZE[0]).abs().max() < 0.02  # the output's aspect: no stretching
    assert (top >= 0).all() and (top + height <= INPUT[0]).all() and (left + width <= INPUT[1]).all()
    assert p.angle.abs().max() <= 20 and p.scale.min() >= 0.8 and p.scale.max() <= 1.2
    assert p.brightness.min() >= 0.7 and p.brightness.max() <= 1.3 and p.hue.abs().max() <= 0.05
    assert (p.order.sort(1).values == torch.arange(4)).all()
    # A crop the input's aspect cannot hold falls back to the largest one of the output's aspect.
    narrow = BatchAugment(SIZE, AugmentRecipe(crop_p=1.0, crop_scale=(1.0, 1.0))).sample(5, 300, 160)
    assert (narrow.box[:, 2:] == torch.tensor([120.0, 160.0])).all()
    assert (narrow.box[:, 0] + 120 <= 300).all() and (narrow.box[:, 1] == 0).all()


def test_output_shapes_dtypes_and_determinism():
    image, mask = batch_of(*blocks(), 4)
    augment = BatchAugment(SIZE)
    torch.manual_seed(7)
    x, m = augment(image, mask.long())  # int64 masks are accepted too
    assert x.shape == (4, 3, *SIZE) and x.dtype == torch.float32
    assert m.shape == (4, *SIZE) and m.dtype == torch.int64
    assert set(m.unique().tolist()) <= set(range(10)) | {IGNORE_INDEX}
    torch.manual_seed(7)
    x2, m2 = pickle.loads(pickle.dumps(augment))(image, mask)
    assert torch.equal(x, x2) and torch.equal(m, m2)
    x3, _ = augment(image, mask)
    assert not torch.equal(x, x3)
    same, _ = BatchAugment(None, NOTHING)(image, mask)
    assert same.shape == (4, 3, *INPUT)


def test_bad_inputs_are_errors():
    image, mask = batch_of(*blocks(), 2)
    augment = BatchAugment(SIZE)
    with pytest.raises(ValueError, match="uint8 images"):
        augment(image.float(), mask)
    with pytest.raises(ValueError, match="do not match"):
        augment(image, mask[:, :-1])


def test_to_tensors_gives_owned_uint8_tensors():
    image, mask = blocks()
    image.flags.writeable = False  # as the decode cache's memory-mapped views are
    mask.flags.writeable = False
    t_image, t_mask = to_tensors(image, mask)
    assert t_image.shape == (3, *INPUT) and t_image.dtype == torch.uint8 and t_mask.dtype == torch.uint8
    assert torch.equal(t_image.permute(1, 2, 0), torch.from_numpy(image.copy()))
    assert torch.equal(t_mask, torch.from_numpy(mask.copy()))
    t_image[0, 0, 0] = 1 - int(image[0, 0, 0])  # writable, and not a view of the input
    assert to_tensors(image)[1] is None
