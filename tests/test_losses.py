import pytest
import torch
import torch.nn.functional as F

from offroadseg.losses import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    SegmentationLoss,
    boundary_mask,
    boundary_weights,
)

WEIGHTS = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.7, 5.0, 4.0, 1.5, 0.3, 0.2])


def batch(seed=0, n=2, h=12, w=16, ignored=True):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, h, w, generator=generator) * 2
    target = torch.randint(0, 10, (n, h, w), generator=generator)
    if ignored:
        target[:, :3, :5] = 255
        target[1, -1, :] = 255
    return logits, target


@pytest.mark.parametrize("class_weights", [None, WEIGHTS])
@pytest.mark.parametrize("ignored", [False, True])
def test_focal_at_gamma_zero_is_cross_entropy(class_weights, ignored):
    logits, target = batch(ignored=ignored)
    expected = F.cross_entropy(logits, target, weight=class_weights, ignore_index=255)
    assert FocalLoss(gamma=0.0, class_weights=class_weights)(logits, target) == pytest.approx(expected.item(), rel=1e-5)
    assert CrossEntropyLoss(class_weights)(logits, target) == pytest.approx(expected.item(), rel=1e-5)


def test_focal_matches_formula_and_down_weights_easy_pixels():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.5]]).T.reshape(1, 2, 1, 2)  # pixel 0 easy, pixel 1 hard
    target = torch.tensor([[[0, 0]]])
    p = logits.softmax(1)[0, 0, 0]
    expected = (-(1 - p) ** 2 * p.log()).mean()
    assert FocalLoss(gamma=2.0)(logits, target) == pytest.approx(expected.item(), rel=1e-5)
    assert FocalLoss(gamma=2.0)(logits, target) < F.cross_entropy(logits, target)


def test_dice_is_zero_for_perfect_and_positive_for_wrong_predictions():
    _, target = batch()
    perfect = F.one_hot(target.where(target != 255, 0), 10).permute(0, 3, 1, 2).float() * 100.0
    assert DiceLoss()(perfect, target) == pytest.approx(0.0, abs=1e-4)
    assert DiceLoss(class_weights=WEIGHTS)(perfect, target) == pytest.approx(0.0, abs=1e-4)
    wrong = perfect.roll(1, dims=1)  # every pixel confidently the next class
    assert DiceLoss()(wrong, target) > 0.9
    assert SegmentationLoss(class_weights=WEIGHTS, boundary_weight=2.0)(perfect, target) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    "criterion",
    [
        SegmentationLoss(class_weights=WEIGHTS, ce_weight=1.0, dice_weight=0.5, focal_weight=1.0, boundary_weight=2.0),
        DiceLoss(),
        FocalLoss(class_weights=WEIGHTS),
    ],
    ids=["combined", "dice", "focal"],
)
def test_ignored_pixels_change_nothing(criterion):
    logits, target = batch()
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    changed = logits.clone()
    changed[ignored] = torch.randn(int(ignored.sum())) * 50
    a = logits.clone().requires_grad_()
    b = changed.clone().requires_grad_()
    loss_a, loss_b = criterion(a, target), criterion(b, target)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    loss_a.backward()
    loss_b.backward()
    assert torch.all(a.grad[ignored] == 0) and torch.all(b.grad[ignored] == 0)
    assert a.grad[~ignored].abs().sum() > 0
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_all_ignored_batch_gives_zero_not_nan():
    logits, target = batch()
    target[:] = 255
    loss = SegmentationLoss(class_weights=WEIGHTS, boundary_weight=1.0)(logits.requires_grad_(), target)
    assert loss.item() == 0.0
    loss.backward()


def test_boundary_mask_marks_pixels_near_class_edges_only():
    target = torch.zeros(1, 10, 20, dtype=torch.long)
    target[:, :, 10:] = 1  # vertical edge between columns 9 and 10
    target[:, :, 18:] = 255  # an ignore region is not a class edge
    mask = boundary_mask(target, width=2)
    columns = mask[0].all(dim=0)
    assert columns.tolist() == [c in (8, 9, 10, 11) for c in range(20)]
    assert not mask[0].any(dim=0)[[0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]].any()
    weights = boundary_weights(target, boundary_weight=3.0, width=2)
    assert set(weights[0, :, 9].tolist()) == {4.0}
    assert set(weights[0, :, 0].tolist()) == {1.0} and set(weights[0, :, 15].tolist()) == {1.0}


def test_boundary_weight_raises_gradient_near_edges_only():
    target = torch.zeros(1, 8, 16, dtype=torch.long)
    target[:, :, 8:] = 1
    logits = torch.zeros(1, 10, 8, 16)  # identical prediction everywhere
    grads = []
    for boundary_weight in (0.0, 3.0):
        x = logits.clone().requires_grad_()
        SegmentationLoss(ce_weight=1.0, dice_weight=0.0, focal_weight=0.0, boundary_weight=boundary_weight, boundary_width=1)(x, target).backward()
        grads.append(x.grad[0].norm(dim=0))  # per pixel; the same for either true class
    plain, weighted = grads
    assert torch.allclose(plain, plain[0, 0].expand_as(plain))  # uniform without boundary weighting
    # near the edge (columns 7 and 8) the weight is 4x that of the interior
    assert torch.allclose(weighted[:, 7] / weighted[:, 0], torch.full((8,), 4.0))
    assert torch.allclose(weighted[:, 8] / weighted[:, 15], torch.full((8,), 4.0))
    assert torch.allclose(weighted[:, 0], weighted[:, 5])


def test_parts_and_term_weights():
    logits, target = batch()
    criterion = SegmentationLoss(class_weights=WEIGHTS.tolist(), ce_weight=0.3, dice_weight=2.0, focal_weight=0.0)
    parts = criterion.parts(logits, target)
    assert set(parts) == {"ce", "dice", "total"}
    assert parts["total"].item() == pytest.approx(0.3 * parts["ce"].item() + 2.0 * parts["dice"].item(), rel=1e-6)
    assert criterion(logits, target).item() == pytest.approx(parts["total"].item())
    assert criterion.to(torch.float64).ce.class_weights is not None  # buffers move with the module


def test_low_precision_logits_are_handled():
    logits, target = batch()
    loss = SegmentationLoss(class_weights=WEIGHTS)(logits.to(torch.bfloat16), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_shape_mismatch_is_an_error():
    logits, target = batch()
    with pytest.raises(ValueError, match="must agree"):
        SegmentationLoss()(logits, target[:, :-1])
