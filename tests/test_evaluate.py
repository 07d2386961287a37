import math

import numpy as np
import pytest
import torch
from helpers import write_pair
from predictors import LabelReader, labelled_loader
from torch import nn

from offroadseg import engine, evaluate
from offroadseg.classes import CLASS_NAMES, NUM_CLASSES
from offroadseg.data import read_mask, read_raw_mask
from offroadseg.ensemble import Ensemble, TestTimeAugmentation
from offroadseg.files import read_json
from offroadseg.metrics import confusion_matrix, scores

pytestmark = pytest.mark.usefixtures("one_thread")


def test_most_confused_pairs_share_of_truth():
    cm = torch.zeros(10, 10, dtype=torch.int64)
    cm[2, 2], cm[2, 3] = 60, 40  # Dry Grass -> Dry Bushes: 40% of dry grass
    cm[9, 9], cm[9, 8] = 990, 10  # Sky -> Landscape: 1% of sky
    pairs = evaluate.most_confused_pairs(cm, top=2)
    assert [(p["truth"], p["predicted"]) for p in pairs] == [("Dry Grass", "Dry Bushes"), ("Sky", "Landscape")]
    assert pairs[0]["share_of_truth"] == pytest.approx(0.4) and pairs[0]["pixels"] == 40


class _Pairs:
    """A dataset of (normalised image, mask) items with stems, as `per_image_results` reads one."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def stem(self, index):
        return f"img{index}"


def test_per_image_results_scores_each_image_on_its_own_best_first():
    target = torch.tensor([[0, 0], [1, 1]])
    wrong, right = torch.zeros(3, 2, 2), torch.zeros(3, 2, 2)
    right[0] = target.float()  # LabelReader answers channel 0: right on this one, all class 0 on the other
    rows = evaluate.per_image_results(LabelReader(shift=0, scale=5.0), _Pairs([(wrong, target), (right, target)]))
    assert [(row["stem"], row["index"]) for row in rows] == [("img1", 1), ("img0", 0)]
    # class 0 IoU 2/4 and class 1 IoU 0 on the wrong image; classes absent from both are left out
    assert [row["miou"] for row in rows] == pytest.approx([1.0, 0.25])
    assert rows[0]["prediction"].dtype == np.uint8 and (rows[0]["prediction"] == target.numpy()).all()


class _Fixed(torch.nn.Module):
    """Predicts class = 9 on the top half and 8 below, whatever the input."""

    def forward(self, x):
        n, _, h, w = x.shape
        probs = torch.zeros(n, NUM_CLASSES, h, w)
        probs[:, 9, : h // 2] = 1
        probs[:, 8, h // 2 :] = 1
        return probs


def test_write_predictions_native_size_raw_ids(tmp_path):
    image_path, _ = write_pair(tmp_path / "data", "test", "t0", np.full((40, 64), 10000, np.uint16))
    written = evaluate.write_predictions(_Fixed(), [(image_path, None)], tmp_path / "pred", (20, 32),
                                         progress=False)
    raw = read_raw_mask(written[0])
    assert raw.shape == (40, 64) and raw.dtype == np.uint16
    assert set(np.unique(raw).tolist()) == {7100, 10000}
    assert evaluate.prediction_is_valid(written[0])
    mask = read_mask(written[0])
    assert (mask[:20] == 9).all() and (mask[20:] == 8).all()
    assert (tmp_path / "pred" / "color" / "t0.png").exists()


def test_metrics_rows_and_json(tmp_path):
    result = scores(confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])))
    row = evaluate.metrics_row("student", result, params=1_000_000, latency={"median_ms": 4.0, "p90_ms": 5.0},
                               throughput={"images_per_s": 250.0, "best_batch": 8}, split="val", device="cpu",
                               input_size=(540, 960))
    assert row["latency_ms"] == {"median": 4.0, "p90": 5.0, "device": "cpu", "input_size": [540, 960]}
    assert set(row["per_class_iou"]) == set(CLASS_NAMES) and row["per_class_iou"]["Sky"] is None
    content = evaluate.write_metrics(tmp_path / "metrics.json", [row], run="demo")
    assert read_json(tmp_path / "metrics.json") == content
    table = evaluate.comparison_table([row])
    assert "student" in table and "0.500" in table
    assert math.isclose(row["miou"], 0.5)
    test = evaluate.split_row(row, scores(confusion_matrix(torch.tensor([2, 2]), torch.tensor([2, 2]))), "test")
    assert test["split"] == "test" and test["miou"] == 1.0 and test["per_class_iou"]["Dry Grass"] == 1.0
    assert test["params"] == row["params"] and test["latency_ms"] == row["latency_ms"] and row["split"] == "val"


def test_write_predictions_removes_an_earlier_runs_stale_files(tmp_path):
    image_path, _ = write_pair(tmp_path / "data", "test", "t0", np.full((40, 64), 10000, np.uint16))
    for sub in ("raw", "color"):
        (tmp_path / "pred" / sub).mkdir(parents=True)
        (tmp_path / "pred" / sub / "gone.png").write_bytes(b"from an earlier run")
    evaluate.write_predictions(_Fixed(), [(image_path, None)], tmp_path / "pred", (20, 32),
                               progress=False)
    assert sorted(p.name for p in (tmp_path / "pred").rglob("*.png")) == ["t0.png", "t0.png"]


# ------------------------------------------------------------------------- the scorer


def test_evaluate_model_scores_models_ensembles_and_tta():
    loader = labelled_loader()
    perfect = LabelReader(shift=0, scale=5.0)
    for predictor in (perfect, Ensemble([perfect]), TestTimeAugmentation(Ensemble([perfect]), flips=())):
        result = evaluate.evaluate_model(predictor, loader, device="cpu")
        assert result["miou"] == pytest.approx(1.0) and result["pixel_acc"] == pytest.approx(1.0)
        assert result["images"] == 6
        assert sum(map(sum, result["confusion_matrix"])) == 6 * 6 * 8 - 6  # ignore pixels left out
        assert list(result["per_class_iou"]) == list(CLASS_NAMES)
    wrong = evaluate.evaluate_model(LabelReader(shift=1, scale=5.0), loader, device="cpu")
    assert wrong["pixel_acc"] == 0.0 and wrong["miou"] == 0.0


def test_evaluate_model_resizes_predictions_to_the_masks():
    # A model at half resolution: its argmax is upsampled to the mask, where it is still right.
    class HalfSize(nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 10, x.shape[-2] // 2, x.shape[-1] // 2)
            logits[:, 3] = 1.0
            return logits

    masks = torch.full((2, 6, 8), 3)
    result = evaluate.evaluate_model(HalfSize(), [(torch.zeros(2, 3, 6, 8), masks)], device="cpu")
    assert result["pixel_acc"] == 1.0 and math.isnan(result["iou"][0]) and result["iou"][3] == 1.0


def test_choose_tta_prefers_the_set_that_scores_best():
    # Truth: class 1 on the top half, class 0 below. The model has learnt "class 1 is up"
    # (like sky): an h-flipped view agrees with it, a v-flipped view contradicts it.
    images = torch.rand(2, 3, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[:, :4] = 1

    class UpIsClassOne(torch.nn.Module):
        def forward(self, x):
            logits = torch.full((x.shape[0], 10, 8, 8), -5.0)
            logits[:, 1, :4] = 4.0
            logits[:, 0, 4:] = 4.0
            return logits

    flips, table = evaluate.choose_tta(UpIsClassOne(), [(images, masks)], candidates=(("v",), ("h",)), device="cpu")
    assert flips == ("h",)
    scores = {tuple(row["flips"]): row["miou"] for row in table}
    assert scores[()] == pytest.approx(1.0) and scores[("h",)] == pytest.approx(1.0)
    assert scores[("v",)] < 0.5  # the v view cancels the plain one and the tie falls to class 0
    # Each row carries the candidate's scores as the scorer gives them: no second pass is needed.
    plain = evaluate.evaluate_model(UpIsClassOne(), [(images, masks)], device="cpu")
    assert {key: table[0][key] for key in ("miou", "pixel_acc", "per_class_iou")} == {
        key: plain[key] for key in ("miou", "pixel_acc", "per_class_iou")}


def hand_validation(model, loader, loss_fn):
    """Training's validation written out plainly (what engine.evaluate computed before it called
    the scorer): the mean over images of the finite batch losses, one confusion matrix, its scores."""
    cm = torch.zeros(10, 10, dtype=torch.int64)
    loss_sum = images = 0.0
    with torch.inference_mode():
        model.eval()
        for x, y in loader:
            logits = model(x)
            loss = loss_fn(logits.float(), y)
            if torch.isfinite(loss):
                loss_sum, images = loss_sum + float(loss.double()) * len(x), images + len(x)
            cm += confusion_matrix(logits.argmax(1), y)
    return {**scores(cm), "loss": loss_sum / images, "confusion_matrix": cm.tolist()}


def test_evaluate_model_with_a_loss_gives_what_training_validation_gives():
    # fit's validation (engine.evaluate) is the scorer with training's hooks: the same loss,
    # confusion matrix and scores as the plain loop, and the hooks do what they say.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 10, 1))
    model.train()
    loader = labelled_loader(batches=3, n=2, h=6, w=8)
    loader.append((torch.randn(2, 3, 6, 8), torch.full((2, 6, 8), 255)))  # only ignore pixels: no loss
    loss_fn = nn.CrossEntropyLoss(ignore_index=255)
    accelerator = engine.make_accelerator("fp32")
    reduced = []

    def reduce(tensor):
        reduced.append(tuple(tensor.shape))
        return accelerator.reduce(tensor)

    ours = evaluate.evaluate_model(model, loader, device=accelerator.device, loss_fn=loss_fn, reduce=reduce,
                                   autocast=accelerator.autocast)
    assert model.training  # put back as it came
    expected = hand_validation(model, loader, loss_fn)
    model.train()
    training = engine.evaluate(model, loader, loss_fn, accelerator)
    assert not model.training  # fit's validation leaves the model in eval mode, as fit hands it back
    for result in (ours, training):
        assert math.isfinite(result["loss"]) and result["loss"] == pytest.approx(expected["loss"], rel=1e-12)
        assert result["confusion_matrix"] == expected["confusion_matrix"]
        assert result["miou"] == expected["miou"] and result["pixel_acc"] == expected["pixel_acc"]
        np.testing.assert_equal(result["iou"], expected["iou"])  # NaN where a class is absent, in both
    assert sorted(reduced) == [(), (2,), (10, 10)] and ours["images"] == 8

    # Two processes with equal shares: sums double, scores and the mean loss stay.
    doubled = evaluate.evaluate_model(model, loader, device="cpu", loss_fn=loss_fn, reduce=lambda t: 2 * t)
    assert doubled["images"] == 16
    assert doubled["confusion_matrix"] == [[2 * v for v in row] for row in expected["confusion_matrix"]]
    assert doubled["miou"] == pytest.approx(ours["miou"]) and doubled["loss"] == pytest.approx(ours["loss"])
    assert math.isnan(evaluate.evaluate_model(model, loader[-1:], device="cpu", loss_fn=loss_fn)["loss"])
    assert "loss" not in evaluate.evaluate_model(model, loader, device="cpu")
