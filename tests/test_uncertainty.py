"""Ranking images by prediction uncertainty: measures, order, CSV, figure."""

from __future__ import annotations

import csv
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers import split_dir, stripes_mask
from PIL import Image
from torch import nn

from offroadseg import plots
from offroadseg.augment import eval_transform
from offroadseg.classes import CLASS_NAMES
from offroadseg.dataset import SegmentationDataset
from offroadseg.uncertainty import (
    SHARE_PREFIX,
    pixel_entropy,
    pixel_margin,
    rank_by_uncertainty,
    uncertainty_figure,
    write_ranking_csv,
)

SIZE = (8, 12)
UNIFORM = [0.0] * 10
ONE_HOT = [60.0] + [0.0] * 9  # softmax ~ (1, e^-60, ...)
LEANING = [2.0] + [0.0] * 9
TWO_WAY_TIE = [8.0, 8.0] + [-8.0] * 8  # entropy ~ log 2, margin ~ 1
SPREAD = [1.0] + [0.0] * 9  # entropy near log 10, margin ~ 0.85


class FixedLogits(nn.Module):
    """Stand-in model: every pixel of image k gets logits `table[k]`, k read from the image's first value."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32))

    def forward(self, x):
        ids = x[:, 0, 0, 0].round().long()
        return self.table[ids][:, :, None, None].expand(-1, -1, *x.shape[-2:])


def images_numbered(count: int):
    """A plain in-memory dataset: (image filled with its own index, all-ignore mask)."""
    return [(torch.full((3, *SIZE), float(k)), torch.full(SIZE, 255)) for k in range(count)]


def test_entropy_of_uniform_and_one_hot_predictions():
    logits = torch.tensor([UNIFORM, ONE_HOT])[:, :, None, None]
    entropy = pixel_entropy(logits)
    assert entropy.shape == (2, 1, 1)
    assert entropy[0].item() == pytest.approx(math.log(10), abs=1e-6)
    assert 0 <= entropy[1].item() < 1e-6
    margin = pixel_margin(logits)
    assert margin[0].item() == pytest.approx(1.0) and margin[1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_ranking_puts_the_most_uncertain_image_first():
    table = [LEANING, ONE_HOT, UNIFORM]
    rows = rank_by_uncertainty(FixedLogits(table), images_numbered(3), batch_size=2)
    assert [row["index"] for row in rows] == [2, 0, 1]  # uniform, leaning, one-hot
    assert [row["rank"] for row in rows] == [1, 2, 3]
    assert [row["stem"] for row in rows] == ["2", "0", "1"] and rows[0]["image"] is None
    assert rows[0]["score"] == pytest.approx(math.log(10), abs=1e-6)
    assert rows[-1]["score"] < 1e-6
    p = torch.softmax(torch.tensor(LEANING), 0)
    assert rows[1]["score"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert all(row["measure"] == "entropy" for row in rows)
    # Each image predicts class 0 everywhere (the uniform one by argmax's first-index rule).
    assert rows[1]["class_share"] == {name: float(name == "Trees") for name in CLASS_NAMES}
    assert rows[1]["uncertain_class"] == "Trees"


def test_margin_ranks_a_two_way_tie_above_a_spread_out_prediction_unlike_entropy():
    table = [SPREAD, TWO_WAY_TIE]
    by_entropy = rank_by_uncertainty(FixedLogits(table), images_numbered(2), measure="entropy")
    by_margin = rank_by_uncertainty(FixedLogits(table), images_numbered(2), measure="margin")
    assert [row["index"] for row in by_entropy] == [0, 1]
    assert [row["index"] for row in by_margin] == [1, 0]
    assert by_margin[0]["score"] == pytest.approx(1.0, abs=1e-6)
    p = torch.softmax(torch.tensor(SPREAD), 0)
    assert by_margin[1]["score"] == pytest.approx(float(1 - (p[0] - p[1])), rel=1e-5)
    assert by_margin[0]["measure"] == "margin"
    with pytest.raises(ValueError, match="measure"):
        rank_by_uncertainty(FixedLogits(table), images_numbered(2), measure="variance")


class HalfSure(nn.Module):
    """Left half: confident Sky; right half: a doubtful Flowers (a slight lead over Logs)."""

    def forward(self, x):
        n, _, h, w = x.shape
        logits = torch.zeros(n, 10, h, w)
        logits[:, 9, :, : w // 2] = 50.0
        logits[:, 5, :, w // 2 :] = 0.5
        logits[:, 6, :, w // 2 :] = 0.3
        return logits


def test_class_shares_and_the_class_holding_the_doubt():
    (row,) = rank_by_uncertainty(HalfSure(), images_numbered(1))
    assert row["class_share"]["Sky"] == 0.5 and row["class_share"]["Flowers"] == 0.5
    assert sum(row["class_share"].values()) == pytest.approx(1.0)
    assert row["uncertain_class"] == "Flowers"


def test_model_mode_is_restored():
    model = FixedLogits([UNIFORM]).train()
    rank_by_uncertainty(model, images_numbered(1))
    assert model.training


def write_constant_image_dataset(root, greys):
    """Duality-layout val split whose images are flat greys; returns the SegmentationDataset."""
    folder = split_dir(root, "val")
    (folder / "Color_Images").mkdir(parents=True)
    (folder / "Segmentation").mkdir(parents=True)
    pairs = []
    for k, grey in enumerate(greys):
        image, mask = folder / "Color_Images" / f"img{k}.png", folder / "Segmentation" / f"img{k}.png"
        Image.fromarray(np.full((*SIZE, 3), grey, dtype=np.uint8)).save(image)
        Image.fromarray(stripes_mask(*SIZE)).save(mask)
        pairs.append((image, mask))
    return SegmentationDataset(pairs, eval_transform(SIZE))


class BrightnessSure(nn.Module):
    """Stand-in model: the brighter the image, the surer it is of Rocks."""

    def forward(self, x):
        sharpness = 4.0 * (x[:, 0].mean(dim=(1, 2)) + 2.2)  # normalised red spans about -2.1 .. 2.3
        logits = torch.zeros(x.shape[0], 10, *x.shape[-2:])
        logits[:, 7] = sharpness[:, None, None]
        return logits


@pytest.fixture
def grey_dataset(tmp_path):
    return write_constant_image_dataset(tmp_path, greys=[200, 10, 120, 60])


def test_ranking_of_a_real_dataset_names_stems_and_paths(grey_dataset):
    rows = rank_by_uncertainty(BrightnessSure(), grey_dataset, batch_size=3)
    assert [row["stem"] for row in rows] == ["img1", "img3", "img2", "img0"]  # darkest first
    assert rows[0]["image"] == str(grey_dataset.pairs[1][0])
    assert all(row["uncertain_class"] == "Rocks" for row in rows)


def read_ranking_csv(path) -> list[dict]:
    """The rows `rank_by_uncertainty` returned, back from the CSV `write_ranking_csv` wrote (as a user
    would read it: csv.DictReader, numbers from their text)."""
    with open(path, encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    return [{"rank": int(record["rank"]), "index": int(record["index"]), "stem": record["stem"],
             "image": record["image"] or None, "measure": record["measure"], "score": float(record["score"]),
             "uncertain_class": record["uncertain_class"],
             "class_share": {key[len(SHARE_PREFIX):]: float(value) for key, value in record.items()
                             if key.startswith(SHARE_PREFIX)}}
            for record in records]


def test_csv_round_trip(grey_dataset, tmp_path):
    rows = rank_by_uncertainty(BrightnessSure(), grey_dataset, measure="margin")
    path = tmp_path / "out" / "uncertainty.csv"
    write_ranking_csv(rows, path)
    assert read_ranking_csv(path) == rows
    header = path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[:3] == ["rank", "stem", "score"] and header[-1] == "share:Sky"
    assert [p.name for p in path.parent.iterdir()] == ["uncertainty.csv"]  # no temporary file left
    plain = rank_by_uncertainty(FixedLogits([UNIFORM, ONE_HOT]), images_numbered(2))
    write_ranking_csv(plain, path)
    assert read_ranking_csv(path) == plain  # image None survives the trip


def test_figure_of_the_most_uncertain_images(grey_dataset, tmp_path):
    rows = rank_by_uncertainty(BrightnessSure(), grey_dataset)
    fig = uncertainty_figure(rows, grey_dataset, BrightnessSure(), top=2)
    try:
        image_axes = [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]
        assert len(image_axes) == 6  # 2 rows of image, prediction, uncertainty map
        assert "img1" in image_axes[0].get_title()
        heat = image_axes[2].get_images()[0]
        assert heat.get_clim() == pytest.approx((0.0, math.log(10)))
        assert np.asarray(heat.get_array()).mean() == pytest.approx(rows[0]["score"], rel=1e-4)
        plots.save(fig, tmp_path / "uncertainty.png")
        assert (tmp_path / "uncertainty.png").stat().st_size > 0
    finally:
        plt.close(fig)
    with pytest.raises(ValueError):
        uncertainty_figure([], grey_dataset, BrightnessSure())
