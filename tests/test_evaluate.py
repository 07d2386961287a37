import math

import numpy as np
import pytest
import torch
from helpers import write_pair

from offroadseg import evaluate
from offroadseg.classes import CLASS_NAMES, NUM_CLASSES
from offroadseg.data import read_mask, read_raw_mask
from offroadseg.metrics import confusion_matrix, scores


def test_most_confused_pairs_share_of_truth():
    cm = torch.zeros(10, 10, dtype=torch.int64)
    cm[2, 2], cm[2, 3] = 60, 40  # Dry Grass -> Dry Bushes: 40% of dry grass
    cm[9, 9], cm[9, 8] = 990, 10  # Sky -> Landscape: 1% of sky
    pairs = evaluate.most_confused_pairs(cm, top=2)
    assert [(p["truth"], p["predicted"]) for p in pairs] == [("Dry Grass", "Dry Bushes"), ("Sky", "Landscape")]
    assert pairs[0]["share_of_truth"] == pytest.approx(0.4) and pairs[0]["pixels"] == 40


def test_per_image_scores():
    target = np.array([[0, 0], [1, 1]])
    assert evaluate.per_image_scores([target, np.zeros((2, 2), int)], [target, target]) == pytest.approx([1.0, 0.25])


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
    assert evaluate.read_metrics(tmp_path / "metrics.json") == content
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
