"""Notebooks 02 and 03's chapter (offroadseg.chapters.teachers): the teacher's cells, trained, plotted and checked."""

import pytest
from chapter_helpers import SIZE, TINY, start, tiny_checkpoint

from offroadseg.chapters import context, teachers
from offroadseg.files import write_json
from offroadseg.models import build_model, count_parameters
from offroadseg.profiles import DEMO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_teacher_chapter_runs_the_cells_of_02_and_03(project, monkeypatch, capsys):
    ctx = start(project, "03_train_deeplab")
    chapter = teachers.teacher_chapter(ctx, "deeplab", "DeepLabV3+", epochs=2, batch_size=2, options=TINY["options"])
    assert chapter.plan.epochs == 2 and chapter.config.batch_size == 2 and chapter.plan.options == TINY["options"]
    assert chapter.describe() == (f"model: {DEMO.deeplab.name} {TINY['options']}, pretrained: None\n"
                                  f"input: {SIZE[0]}x{SIZE[1]}, epochs: 2, batch: 2")
    with pytest.raises(RuntimeError, match="run the training cell"):
        chapter.training_summary()

    def train_teacher(ctx, role, scan, plan, config, track=None):  # what engine.fit leaves in models/<role>/, in no time
        seen["track"] = track
        rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_miou": miou, "seconds": 1.5,
                 "images_per_s": 4.0 + e, "per_class_iou": [miou] * 9 + [None]} for e, miou in ((1, 0.3), (2, 0.5))]
        write_json(ctx.run.model_dir(role) / "history.json", rows)
        tiny_checkpoint(ctx.run.model_dir(role) / "best.pt")
        (ctx.run.model_dir(role) / "last.pt").write_bytes(b"")
        return rows

    seen = {}
    monkeypatch.setattr(teachers, "train_teacher", train_teacher)
    history = chapter.train(track="tensorboard")
    assert seen["track"] == "tensorboard"  # the notebook's `track`, handed to fit
    assert [row["epoch"] for row in history] == [1, 2] and chapter.best["epoch"] == 2
    assert chapter.training_summary() == "best val mIoU 0.500 at epoch 2; 3 s, 6.0 train images/s"
    chapter.plot_curves()
    chapter.plot_per_class_curves()
    table = chapter.iou_table().splitlines()
    assert table[1].split() == ["Trees", "0.50"] and table[-1].split() == ["Sky", "-"]
    chapter.plot_val_predictions(count=2)
    assert sorted(path.name for path in ctx.run.figures.iterdir()) == [
        "03_curves.png", "03_per_class_iou.png", "03_val_predictions.png"]
    chapter.finish(min_demo_miou=0.45)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"parameters: {count_parameters(build_model(TINY['name'], **TINY['options'])) / 1e6:.2f} M"
    assert out[1:] == ["best val mIoU >= 0.45: True", "checkpoints: ['best.pt', 'last.pt']"]
    entry = ctx.run.read_manifest()["steps"]["03_train_deeplab"]
    assert entry["best_val_miou"] == 0.5 and entry["best_epoch"] == 2 and "finished" in entry


def test_the_teacher_chapter_needs_the_scan_of_notebook_01(project):
    ctx = context.start("02_train_segformer", run="r", profile="demo", data=project / "data")
    with pytest.raises(FileNotFoundError, match="notebook 01_data_scan"):
        teachers.teacher_chapter(ctx, "segformer", "SegFormer")
