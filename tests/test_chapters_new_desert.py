"""Notebook 05's adaptation to a new desert (offroadseg.chapters.new_desert): images, rule, record, training, verdict."""

import pytest
import torch
from chapter_helpers import SIZE, TINY, start, tiny_checkpoint, trained_run, unlabelled_folder

from offroadseg import augment
from offroadseg.chapters import assembly, distillation, new_desert
from offroadseg.checkpoints import load_model
from offroadseg.data import DataError
from offroadseg.dataset import SegmentationDataset, eval_loader
from offroadseg.evaluate import evaluate_model
from offroadseg.files import read_json, write_json
from offroadseg.profiles import DEMO, FULL, AdaptConfig, DistillConfig
from offroadseg.scan import usable_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

NO_FEATURES = DistillConfig(beta=0.0)  # the tiny models' distillation: no feature matching


def adapting(images, **settings) -> AdaptConfig:
    """The demo profile's AdaptConfig with notebook 05's `adapt` and `adapt_*` parameters given."""
    return new_desert.adapt_config(DEMO, images=images, **settings)


def test_adaptation_images_come_from_a_folder_or_the_demo_desert_only(project, tmp_path, monkeypatch):
    ctx = start(project, "05_distill")
    assert new_desert.adaptation_images(ctx, None) == []
    # "auto" (notebook 05's default) is the demo desert's adapt split there and off on any other data.
    assert new_desert.resolve_adapt(ctx, "auto") is None and new_desert.adaptation_images(ctx, "auto") == []
    assert new_desert.resolve_adapt(ctx, "none") is None and new_desert.resolve_adapt(ctx, "demo") == "demo"
    with monkeypatch.context() as patch:
        patch.setattr(new_desert.synth, "is_demo_desert", lambda root: True)
        assert new_desert.resolve_adapt(ctx, "auto") == "demo"
    folder = unlabelled_folder(tmp_path / "new_desert")
    assert [path.name for path in new_desert.adaptation_images(ctx, str(folder))] == ["new000.png", "new001.png",
                                                                                   "new002.png"]
    with pytest.raises(DataError, match="not the generated demo desert"):
        new_desert.adaptation_images(ctx, "demo")
    with pytest.raises(DataError, match="no such folder"):
        new_desert.adaptation_images(ctx, str(tmp_path / "missing"))
    # Held-out images to decide on must have masks; without a holdout (and off the demo) there are none.
    assert new_desert.adaptation_holdout(ctx, str(folder)) == []
    with pytest.raises(DataError, match="masks"):
        new_desert.adaptation_holdout(ctx, str(folder), holdout=str(folder))
    labelled = new_desert.adaptation_holdout(ctx, None, holdout=str(project / "data" / "Offroad_Segmentation_testImages"))
    assert [(image.name, mask.name) for image, mask in labelled] == [("test000.png", "test000.png")]


def test_the_adapted_plan_fine_tunes_the_distilled_student_for_a_share_of_its_epochs(project):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    plan = assembly.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"])
    adapted = new_desert.adapted_plan(plan, DEMO.adapt)
    assert (adapted.init_from, adapted.epochs, adapted.lr) == ("student", 1, plan.lr)  # the demo's 3 epochs give 1
    full = assembly.model_plan(FULL, "student")
    assert new_desert.adapted_plan(full, FULL.adapt).epochs == 5
    assert new_desert.adapted_plan(plan, new_desert.adapt_config(DEMO, epochs=2)).epochs == 2
    config = new_desert.adapted_config(assembly.train_config(DEMO, plan), adapted, DEMO.adapt)
    assert config.epochs == 1 and config.warmup_epochs == DEMO.adapt.warmup_epochs
    # It starts from the distilled student's weights, not from the teacher the student started from.
    start_weights = assembly.initial_student(ctx, adapted).state_dict()
    student = torch.load(ctx.run.model_dir("student") / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(start_weights[key], value) for key, value in student.items())


@pytest.mark.slow  # a real (tiny) training: ~5-9 s on 2 shared cores
def test_the_adapted_student_trains_on_train_plus_the_unlabelled_images(project, tmp_path):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    images = new_desert.adaptation_images(ctx, str(unlabelled_folder(tmp_path / "new_desert")))
    plan = assembly.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"], epochs=1, batch_size=2)
    config = assembly.train_config(DEMO, plan, precision="fp32")
    with pytest.raises(ValueError, match="confidence_threshold"):
        distillation.train_student(ctx, scan, plan, config, NO_FEATURES, progress=False, adapt_images=images)
    rule = new_desert.confidence_rule(ctx, scan, min_accuracy=0.0)
    assert [row["threshold"] for row in rule["table"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    # Untrained teachers: near-uniform over ten classes, never 50% sure: no level keeps a pixel, none is chosen.
    assert all(row["kept"] == 0 and row["accuracy"] is None for row in rule["table"]) and rule["threshold"] is None
    rule["threshold"] = 0.05  # every pixel then counts
    holdout = new_desert.adaptation_holdout(ctx, None, holdout=str(project / "data" / "Offroad_Segmentation_testImages"))
    history = new_desert.train_adapted_student(ctx, scan, plan, config, NO_FEATURES, images, rule["threshold"],
                                               holdout)
    assert len(history) == 1 and history[0]["skipped_steps"] == 0
    checkpoint = torch.load(ctx.run.model_dir("student_adapted") / "best.pt", weights_only=False)
    assert checkpoint["setup"]["train_samples"] == 4 + 3  # the train pairs and the unlabelled images
    assert not (ctx.run.model_dir("student") / "last.pt").exists()  # the plain student is left alone
    # Its epochs are scored (and the best chosen) on the held-out images, not on val.
    adapted = load_model(ctx.run.model_dir("student_adapted") / "best.pt")
    loss = assembly.segmentation_loss(scan)
    on = {name: evaluate_model(adapted, eval_loader(dataset, 2), device="cpu", loss_fn=loss)["loss"]
          for name, dataset in (("holdout", SegmentationDataset(holdout, augment.eval_transform(SIZE))),
                                ("val", assembly.val_dataset(scan, SIZE)))}
    assert on["holdout"] != pytest.approx(on["val"]) and history[0]["val_loss"] == pytest.approx(on["holdout"], rel=1e-4)
    assert new_desert.read_adaptation_record(ctx.run) is None  # no record written yet
    write_json(ctx.run.model_dir("student") / "history.json", [{"epoch": 1, "val_miou": 0.1}, {"epoch": 2, "val_miou": 0.6}])
    record = new_desert.adaptation_setup("new_desert", images, holdout, rule, plan, new_desert.student_start(ctx))
    new_desert.write_adaptation_record(ctx, record)
    record = new_desert.read_adaptation_record(ctx.run)
    assert record["images"] == [str(path) for path in images] and record["threshold"] == 0.05
    assert record["holdout"] == [str(holdout[0][0])] and record["selected_on"] == "holdout"
    assert record["start"] == {"checkpoint": "models/student/best.pt", "epoch": 2, "val_miou": 0.6}


@pytest.mark.slow  # a real (tiny) training: ~5-9 s on 2 shared cores
def test_the_adaptation_cell_trains_records_and_refuses_other_images_over_its_student(project, tmp_path, capsys):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    write_json(ctx.run.model_dir("student") / "history.json", [{"epoch": 1, "val_miou": 0.3}])
    scan = read_json(ctx.run.scan)
    plan = assembly.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"], epochs=3, batch_size=2)
    config = assembly.train_config(DEMO, plan, precision="fp32")
    folder = str(unlabelled_folder(tmp_path / "new_desert"))
    record = new_desert.adapt_student(ctx, scan, plan, config, NO_FEATURES, adapting(folder, threshold=0.05))
    out = capsys.readouterr().out
    assert "3 unlabelled images" in out and "for 1 epoch(s)" in out and "on val (no held-out images" in out
    assert record["epochs"] == 1 and record["selected_on"] == "val" and record["holdout"] == []
    assert len(read_json(ctx.run.model_dir("student_adapted") / "history.json")) == 1
    # The same images again: the finished student is reused; other images over it are refused, not mixed.
    assert new_desert.adapt_student(ctx, scan, plan, config, NO_FEATURES, adapting(folder, threshold=0.05)) == record
    other = str(unlabelled_folder(tmp_path / "other_desert", count=2))
    with pytest.raises(DataError, match="other images"):
        new_desert.adapt_student(ctx, scan, plan, config, NO_FEATURES, adapting(other, threshold=0.05))


def test_the_adaptation_cell_is_off_without_adapt_and_skips_when_no_level_is_accurate_enough(project, tmp_path,
                                                                                             capsys):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    plan = assembly.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"], epochs=1, batch_size=2)
    config = assembly.train_config(DEMO, plan, precision="fp32")
    assert new_desert.adapt_student(ctx, scan, plan, config, NO_FEATURES, adapting("none")) is None
    assert "adaptation: off" in capsys.readouterr().out
    assert new_desert.adapt_student(ctx, scan, plan, config, NO_FEATURES, adapting("auto")) is None  # not the demo desert
    assert "adaptation: off" in capsys.readouterr().out
    folder = str(unlabelled_folder(tmp_path / "new_desert"))
    # Untrained teachers are never 50% sure: no level qualifies, nothing is trained or recorded.
    assert new_desert.adapt_student(ctx, scan, plan, config, NO_FEATURES, adapting(folder, min_accuracy=0.5)) is None
    out = capsys.readouterr().out
    assert "confidence >=" in out and "adaptation skipped" in out
    assert not ctx.run.model_dir("student_adapted").exists()
    # An adapted student of an earlier run with adapt set is named when adaptation is now off (06 reports it).
    ctx.run.model_dir("student_adapted").mkdir(parents=True)
    tiny_checkpoint(ctx.run.model_dir("student_adapted") / "best.pt")
    new_desert.write_adaptation_record(ctx, {"adapt": folder, "images": [], "threshold": 0.5})
    assert new_desert.adapt_student(ctx, scan, plan, config, NO_FEATURES, adapting("none")) is None
    assert "from an earlier run of this notebook with adapt set stays" in capsys.readouterr().out


@pytest.mark.slow
def test_the_adaptation_verdict_compares_both_students_on_val_and_the_held_out_images(project):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    ctx.run.model_dir("student_adapted").mkdir(parents=True)
    tiny_checkpoint(ctx.run.model_dir("student_adapted") / "best.pt", seed=5)
    holdout = new_desert.adaptation_holdout(ctx, None, holdout=str(project / "data" / "Offroad_Segmentation_testImages"))
    comparison = new_desert.adaptation_comparison(ctx, scan, holdout)
    val_native = eval_loader(assembly.val_dataset(scan, SIZE, native_masks=True), 2)
    adapted = load_model(ctx.run.model_dir("student_adapted") / "best.pt")
    assert comparison["val"]["student_adapted"]["miou"] == pytest.approx(
        evaluate_model(adapted, val_native, device="cpu")["miou"])  # scored now, at the masks' native size
    scored = {name: comparison["holdout"][name]["miou"] for name in ("student", "student_adapted")}
    assert comparison["gain"] == pytest.approx(scored["student_adapted"] - scored["student"])
    assert comparison["helps"] == (comparison["gain"] > 0)
    text = new_desert.adaptation_lines(comparison)
    assert "held-out mIoU" in text and "Sky" in text
    assert ("adapting helps" if comparison["helps"] else "adapting does not help") in text
    without = new_desert.adaptation_comparison(ctx, scan, [])
    assert without["holdout"] is None and without["gain"] is None and without["helps"] is None
    assert "give adapt_holdout" in new_desert.adaptation_lines(without)


def test_batchnorm_statistics_come_from_the_new_desert_both_deserts_or_nowhere(project, tmp_path):
    ctx = start(project, "05_distill")
    scan = read_json(ctx.run.scan)
    new = sorted((unlabelled_folder(tmp_path / "new_desert", count=2)).glob("*.png"))
    assert new_desert.batchnorm_images(scan, new, "new") == new
    both = new_desert.batchnorm_images(scan, new, "both", seed=3)
    assert both[:2] == new and len(both) == 4 and both == new_desert.batchnorm_images(scan, new, "both", seed=3)
    assert {str(image) for image in both[2:]} <= {str(image) for image, _ in usable_pairs(scan, "train")}
    assert new_desert.batchnorm_images(scan, new, "none") == []
    with pytest.raises(ValueError, match="adapt_batchnorm='old'"):
        new_desert.batchnorm_images(scan, new, "old")
