import numpy as np
from PIL import Image

from offroadseg import plots
from offroadseg.classes import IGNORE_INDEX, PALETTE


def test_overlay_blends_labelled_pixels_only():
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[9, IGNORE_INDEX], [0, 0]], np.uint8)
    out = plots.overlay(image, mask, alpha=0.5)
    assert out[0, 1].tolist() == [100, 100, 100]
    assert out[0, 0].tolist() == ((100 + PALETTE[9].astype(int)) // 2).tolist()


def test_the_default_blend_is_the_float_blend_truncated_for_every_pair_of_values():
    """alpha 0.5 runs in uint8 ((a & b) + ((a ^ b) >> 1)); it must equal floor((a + b) / 2) everywhere."""
    values = np.arange(256, dtype=np.uint8)
    image = np.repeat(values[:, None], 10, axis=1)[..., None].repeat(3, axis=2)  # every grey level x every class
    mask = np.tile(np.arange(10, dtype=np.uint8), (256, 1))
    expected = ((image.astype(np.int64) + PALETTE[mask].astype(np.int64)) // 2).astype(np.uint8)
    assert np.array_equal(plots.overlay(image, mask), expected)
    mask[::7, ::3] = IGNORE_INDEX
    out = plots.overlay(image, mask)
    assert np.array_equal(out[mask == IGNORE_INDEX], image[mask == IGNORE_INDEX])
    assert np.array_equal(out[mask != IGNORE_INDEX], expected[mask != IGNORE_INDEX])


def test_figures_save_atomically_as_png(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_miou": 0.1 * e,
                "per_class_iou": [0.1 * e] * 9 + [None]} for e in (1, 2, 3)]
    figures = {
        "curves.png": plots.training_curves(history, "demo"),
        "classes.png": plots.per_class_iou_curves(history),
        "grid.png": plots.prediction_grid([(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8),
                                            np.ones((8, 8), np.uint8), "a")]),
        "overlays.png": plots.overlay_grid([(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), "a")]),
    }
    for name, fig in figures.items():
        plots.save(fig, tmp_path / "figures" / name)
        assert Image.open(tmp_path / "figures" / name).format == "PNG"
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(figures)  # no temp files left


def test_iou_table_marks_undefined():
    table = plots.iou_table([0.5] + [float("nan")] * 8 + [None])
    assert "0.50" in table and table.count(" -") == 9
