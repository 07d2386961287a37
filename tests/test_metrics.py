import math

import numpy as np
import pytest
import torch

from offroadseg.metrics import confusion_matrix, per_class, scores


def test_confusion_matrix_hand_case():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    cm = confusion_matrix(pred, target, num_classes=3)
    # rows = truth, cols = prediction; the 255 pixel is dropped
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    assert torch.equal(cm, expected)
    assert cm.dtype == torch.int64


def test_scores_hand_computed():
    cm = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    s = scores(cm)
    # IoU: class0 1/(1+0+1)=0.5, class1 2/(2+1+0)=2/3, class2 1/1
    assert s["iou"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 5)
    assert s["class_acc"] == pytest.approx([0.5, 1.0, 1.0])
    assert s["mean_class_acc"] == pytest.approx(2.5 / 3)
    # Dice: 2TP/(2TP+FP+FN): class0 2/3, class1 4/5, class2 1
    assert s["dice"] == pytest.approx([2 / 3, 0.8, 1.0])


def test_absent_class_is_nan_and_left_out_of_mean():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    s = scores(confusion_matrix(pred, target, num_classes=4))
    assert math.isnan(s["iou"][2]) and math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_predicted_but_absent_class_scores_zero():
    target = torch.tensor([0, 0, 0])
    pred = torch.tensor([0, 0, 1])
    s = scores(confusion_matrix(pred, target, num_classes=2))
    assert s["iou"] == pytest.approx([2 / 3, 0.0])
    assert s["miou"] == pytest.approx(1 / 3)


def test_streaming_equals_one_shot_and_numpy_input():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 10, size=(4, 32, 32))
    target[:, :2] = 255
    pred = rng.integers(0, 10, size=(4, 32, 32))
    total = sum(confusion_matrix(pred[i], target[i]) for i in range(4))
    assert torch.equal(total, confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target)))
    assert int(total.sum()) == 4 * 30 * 32


def test_perfect_prediction():
    target = torch.randint(0, 10, (2, 16, 16))
    s = scores(confusion_matrix(target, target))
    assert s["miou"] == pytest.approx(1.0) and s["pixel_acc"] == pytest.approx(1.0)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(torch.tensor([12]), torch.tensor([0]))
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(torch.tensor([0]), torch.tensor([11]))


def test_empty_matrix_gives_nan_not_crash():
    s = scores(torch.zeros(10, 10, dtype=torch.int64))
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_acc"])


def test_per_class_names_and_nan_to_none():
    d = per_class([0.5] + [float("nan")] * 9)
    assert d["Trees"] == 0.5 and d["Sky"] is None and len(d) == 10
