"""The notebooks' glue in offroadseg.training: the teachers' chapter of 02/03, and the run's models
and their ensemble as 05 loads them."""

import pytest
import torch
from helpers import make_small_dataset

from offroadseg import pipeline, runs, training
from offroadseg.engine import save_checkpoint
from offroadseg.files import read_json, write_json
from offroadseg.models import build_model, count_parameters
from offroadseg.profiles import DEMO
from offroadseg.scan import scan_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (16, 24)  # the model input of these runs
TINY = {"name": "deeplabv3plus-resnet18", "options": {"output_stride": 32, "aspp_channels": 8, "decoder_channels": 8}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFROADSEG_ROOT", str(tmp_path))
    monkeypatch.delenv("OFFROADSEG_RUN", raising=False)
    make_small_dataset(tmp_path / "data", 4, 2, 1)
    return tmp_path


def start(project, step: str):
    """The notebook's pipeline.start with the small input, and the run's scan.json as notebook 01 writes it."""
    ctx = pipeline.start(step, run="r", profile="demo", data=project / "data", image_size=list(SIZE))
    if not ctx.run.scan.exists():
        write_json(ctx.run.scan, scan_dataset(project / "data", workers=1, progress=False))
    return ctx


def tiny_checkpoint(path, seed: int = 0) -> None:
    """best.pt of a tiny untrained model, as engine.fit writes it (spec and weights) for load_model."""
    torch.manual_seed(seed)
    model = build_model(TINY["name"], **TINY["options"])
    save_checkpoint({"spec": model.spec, "model": model.state_dict()}, path)


def trained_run(ctx, with_ensemble: bool = True) -> None:
    """Checkpoints of both teachers and the student, and ensemble.json, as notebooks 02-05 leave a run."""
    for seed, role in enumerate(("segformer", "deeplab", "student")):
        (ctx.run.model_dir(role)).mkdir(parents=True)
        tiny_checkpoint(ctx.run.model_dir(role) / "best.pt", seed)
    if with_ensemble:
        val = {"ensemble": {"miou": 0.5, "pixel_acc": 0.8, "per_class_iou": {}, "ms_per_image": 30.0, "params": 10}}
        runs.write_ensemble(ctx.run, 0.25, [], flips=["h"], scales=None, flip_candidates=[], input_size=SIZE, val=val)


def test_the_teacher_chapter_runs_the_cells_of_02_and_03(project, monkeypatch, capsys):
    ctx = start(project, "03_train_deeplab")
    chapter = training.teacher_chapter(ctx, "deeplab", "DeepLabV3+", epochs=2, batch_size=2, options=TINY["options"])
    assert chapter.plan.epochs == 2 and chapter.config.batch_size == 2 and chapter.plan.options == TINY["options"]
    assert chapter.describe() == (f"model: {DEMO.deeplab.name} {TINY['options']}, pretrained: None\n"
                                  f"input: {SIZE[0]}x{SIZE[1]}, epochs: 2, batch: 2")
    with pytest.raises(RuntimeError, match="run the training cell"):
        chapter.training_summary()

    def train_teacher(ctx, role, scan, plan, config):  # what engine.fit leaves in models/<role>/, in no time
        rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_miou": miou, "seconds": 1.5,
                 "images_per_s": 4.0 + e, "per_class_iou": [miou] * 9 + [None]} for e, miou in ((1, 0.3), (2, 0.5))]
        write_json(ctx.run.model_dir(role) / "history.json", rows)
        tiny_checkpoint(ctx.run.model_dir(role) / "best.pt")
        (ctx.run.model_dir(role) / "last.pt").write_bytes(b"")
        return rows

    monkeypatch.setattr(training, "train_teacher", train_teacher)
    history = chapter.train()
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
    ctx = pipeline.start("02_train_segformer", run="r", profile="demo", data=project / "data")
    with pytest.raises(FileNotFoundError, match="notebook 01_data_scan"):
        training.teacher_chapter(ctx, "segformer", "SegFormer")


def test_distillation_weighs_the_teachers_as_ensemble_json_says(project):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    plan = training.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"])  # from the deeplab teacher
    model, distiller = training.distillation_setup(ctx, scan, plan, beta=0.0)
    assert distiller.teachers.weights == pytest.approx([0.25, 0.75])
    assert [m.spec for m in distiller.teachers.members] == [m.spec for m in training.load_teachers(ctx).values()]
    assert model.student.spec["name"] == TINY["name"]
