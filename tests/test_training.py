"""The notebooks' glue in offroadseg.training: the teachers' chapter of 02/03, the run's models and
their ensemble as 04-06 load them, and the scoring and comparison cells of 04-06."""

import pytest
import torch

from offroadseg import adaptation, augment, benchmark, pipeline, runs, training
from offroadseg.checkpoints import load_model, save_checkpoint
from offroadseg.data import DataError
from offroadseg.dataset import SegmentationDataset
from offroadseg.ensemble import Ensemble, TestTimeAugmentation
from offroadseg.evaluate import evaluate_model
from offroadseg.files import read_json, write_json
from offroadseg.models import build_model, count_parameters
from offroadseg.profiles import DEMO, FULL
from offroadseg.scan import scan_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (16, 24)  # the model input of these runs
TINY = {"name": "deeplabv3plus-resnet18", "options": {"output_stride": 32, "aspp_channels": 8, "decoder_channels": 8}}


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


def test_student_init_none_starts_the_student_afresh():
    assert DEMO.student.init_from == "deeplab"  # the demo student starts from the DeepLab teacher
    assert training.model_plan(DEMO, "student", init_from=None).init_from == "deeplab"  # None: the profile's
    assert training.model_plan(DEMO, "student", init_from="segformer").init_from == "segformer"
    assert training.model_plan(DEMO, "student", init_from="none").init_from is None


def test_evaluation_models_are_the_runs_models_fused_as_notebook_04_chose(project):
    ctx = start(project, "06_evaluate")
    with pytest.raises(FileNotFoundError, match="04_ensemble"):
        training.evaluation_models(ctx)
    trained_run(ctx)
    models = training.evaluation_models(ctx)
    assert list(models) == ["segformer", "deeplab", "ensemble", "ensemble_tta", "student", "student_tta"]
    ensemble, ensemble_tta = models["ensemble"], models["ensemble_tta"]
    assert isinstance(ensemble, Ensemble) and ensemble.weights == pytest.approx([0.25, 0.75])
    assert list(ensemble.members) == [models["segformer"], models["deeplab"]]
    assert isinstance(ensemble_tta, TestTimeAugmentation) and ensemble_tta.model is ensemble
    assert ensemble_tta.flips == ("h",) and ensemble_tta.scales is None
    assert models["student_tta"].model is models["student"] and models["student_tta"].flips == ("h",)
    assert not models["student"].training  # checkpoints load in eval mode
    (ctx.run.model_dir("student") / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="05_distill"):
        training.evaluation_models(ctx)


def test_distillation_weighs_the_teachers_as_ensemble_json_says(project):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    plan = training.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"])  # from the deeplab teacher
    model, distiller = training.distillation_setup(ctx, scan, plan, beta=0.0)
    assert distiller.teachers.weights == pytest.approx([0.25, 0.75])
    assert [m.spec for m in distiller.teachers.members] == [m.spec for m in training.load_teachers(ctx).values()]
    assert model.student.spec["name"] == TINY["name"]


def loader_of(ctx, native: bool = False):
    scan = read_json(ctx.run.scan)
    return training.loader(training.val_dataset(scan, SIZE, native_masks=native), batch_size=2)


def test_val_scores_are_the_val_part_of_ensemble_json(project, capsys):
    ctx = start(project, "04_ensemble")
    trained_run(ctx, with_ensemble=False)
    teachers = training.load_teachers(ctx)
    loader = loader_of(ctx)
    results = training.val_scores({"deeplab": teachers["deeplab"], "ensemble": Ensemble(list(teachers.values()))},
                                  loader, SIZE)
    assert list(results) == ["deeplab", "ensemble"]
    deeplab = results["deeplab"]
    assert set(deeplab) == {"miou", "pixel_acc", "per_class_iou", "ms_per_image", "params"}
    assert deeplab["miou"] == evaluate_model(teachers["deeplab"], loader)["miou"] and deeplab["ms_per_image"] > 0
    assert results["ensemble"]["params"] == 2 * deeplab["params"]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["deeplab", "ensemble"] and "ms/img" in lines[0]


def test_compare_models_makes_the_metrics_rows_of_notebook_06(project, monkeypatch):
    ctx = start(project, "06_evaluate")
    trained_run(ctx)
    models = training.evaluation_models(ctx)
    models = {name: models[name] for name in ("deeplab", "student_tta")}
    loader = loader_of(ctx, native=True)
    timed = []
    throughput = benchmark.throughput

    def spy(model, **kwargs):
        timed.append((kwargs["batch_sizes"], kwargs["runs"]))
        return throughput(model, **kwargs)

    monkeypatch.setattr(benchmark, "throughput", spy)
    rows, results = training.compare_models(models, loader, [20, 30], device="cpu")
    assert timed == [((1, 2), 2)] * 2  # the CPU's defaults (the demo's budget)
    assert [row["model"] for row in rows] == ["deeplab", "student_tta"] and set(results) == set(models)
    row = rows[0]
    assert row["split"] == "val" and row["latency_ms"]["input_size"] == [20, 30] and row["latency_ms"]["device"] == "cpu"
    assert row["miou"] == results["deeplab"]["miou"] == evaluate_model(models["deeplab"], loader)["miou"]
    assert row["best_batch"] in (1, 2) and row["params"] == rows[1]["params"]
    assert "confusion_matrix" in results["student_tta"]
    timed.clear()
    training.compare_models({"deeplab": models["deeplab"]}, loader, [20, 30], device="cpu", batch_sizes=[1], runs=1)
    assert timed == [((1,), 1)]


def test_the_student_is_judged_against_the_ensemble_of_notebook_04(project, monkeypatch):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    monkeypatch.setattr(benchmark, "latency", lambda model, input_size: {"median_ms": 12.0, "input_size": input_size})
    student = build_model(TINY["name"], **TINY["options"])
    outcome = training.student_against_ensemble(ctx, student, {"val_miou": 0.45})
    assert outcome["retained"] == pytest.approx(0.9) and outcome["speedup"] == pytest.approx(2.5)
    assert outcome["ensemble"]["miou"] == 0.5 and outcome["student"]["ms_per_image"] == 12.0
    assert outcome["student"]["params"] == sum(p.numel() for p in student.parameters())


# ------------------------------------------------------------- domain adaptation (notebook 05)


def unlabelled_folder(root, count: int = 3):
    """A plain folder of images without masks, as a user gives `adapt`."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    for index in range(count):
        image = np.random.default_rng(index).integers(0, 255, (12, 20, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"new{index:03d}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_adaptation_images_come_from_a_folder_or_the_demo_desert_only(project, tmp_path, monkeypatch):
    ctx = start(project, "05_distill")
    assert adaptation.adaptation_images(ctx, None) == []
    # "auto" (notebook 05's default) is the demo desert's adapt split there and off on any other data.
    assert adaptation.resolve_adapt(ctx, "auto") is None and adaptation.adaptation_images(ctx, "auto") == []
    assert adaptation.resolve_adapt(ctx, "none") is None and adaptation.resolve_adapt(ctx, "demo") == "demo"
    with monkeypatch.context() as patch:
        patch.setattr(adaptation.synth, "is_demo_desert", lambda root: True)
        assert adaptation.resolve_adapt(ctx, "auto") == "demo"
    folder = unlabelled_folder(tmp_path / "new_desert")
    assert [path.name for path in adaptation.adaptation_images(ctx, str(folder))] == ["new000.png", "new001.png",
                                                                                   "new002.png"]
    with pytest.raises(DataError, match="not the generated demo desert"):
        adaptation.adaptation_images(ctx, "demo")
    with pytest.raises(DataError, match="no such folder"):
        adaptation.adaptation_images(ctx, str(tmp_path / "missing"))
    # Held-out images to decide on must have masks; without a holdout (and off the demo) there are none.
    assert adaptation.adaptation_holdout(ctx, str(folder)) == []
    with pytest.raises(DataError, match="masks"):
        adaptation.adaptation_holdout(ctx, str(folder), holdout=str(folder))
    labelled = adaptation.adaptation_holdout(ctx, None, holdout=str(project / "data" / "Offroad_Segmentation_testImages"))
    assert [(image.name, mask.name) for image, mask in labelled] == [("test000.png", "test000.png")]


def test_the_adapted_plan_fine_tunes_the_distilled_student_for_a_share_of_its_epochs(project):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    plan = training.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"])
    adapted = adaptation.adapted_plan(plan)
    assert (adapted.init_from, adapted.epochs, adapted.lr) == ("student", 1, plan.lr)  # the demo's 3 epochs give 1
    full = training.model_plan(FULL, "student")
    assert adaptation.adapted_plan(full).epochs == 5 and adaptation.adapted_plan(plan, epochs=2).epochs == 2
    config = adaptation.adapted_config(training.train_config(DEMO, plan), adapted)
    assert config.epochs == 1 and config.warmup_epochs == adaptation.ADAPT_WARMUP_EPOCHS
    # It starts from the distilled student's weights, not from the teacher the student started from.
    start_weights = training.initial_student(ctx, adapted).state_dict()
    student = torch.load(ctx.run.model_dir("student") / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(start_weights[key], value) for key, value in student.items())


@pytest.mark.slow  # a real (tiny) training: ~5-9 s on 2 shared cores
def test_the_adapted_student_trains_on_train_plus_the_unlabelled_images(project, tmp_path):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    images = adaptation.adaptation_images(ctx, str(unlabelled_folder(tmp_path / "new_desert")))
    plan = training.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"], epochs=1, batch_size=2)
    config = training.train_config(DEMO, plan, precision="fp32")
    with pytest.raises(ValueError, match="confidence_threshold"):
        training.train_student(ctx, scan, plan, config, beta=0.0, progress=False, adapt_images=images)
    rule = adaptation.confidence_rule(ctx, scan, min_accuracy=0.0)
    assert [row["threshold"] for row in rule["table"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    # Untrained teachers: near-uniform over ten classes, never 50% sure: no level keeps a pixel, none is chosen.
    assert all(row["kept"] == 0 and row["accuracy"] is None for row in rule["table"]) and rule["threshold"] is None
    rule["threshold"] = 0.05  # every pixel then counts
    holdout = adaptation.adaptation_holdout(ctx, None, holdout=str(project / "data" / "Offroad_Segmentation_testImages"))
    history = adaptation.train_adapted_student(ctx, scan, plan, config, 0.5, 2.0, 0.0, images, rule["threshold"],
                                               holdout)
    assert len(history) == 1 and history[0]["skipped_steps"] == 0
    checkpoint = torch.load(ctx.run.model_dir("student_adapted") / "best.pt", weights_only=False)
    assert checkpoint["setup"]["train_samples"] == 4 + 3  # the train pairs and the unlabelled images
    assert not (ctx.run.model_dir("student") / "last.pt").exists()  # the plain student is left alone
    # Its epochs are scored (and the best chosen) on the held-out images, not on val.
    adapted = load_model(ctx.run.model_dir("student_adapted") / "best.pt")
    loss = training.segmentation_loss(scan)
    on = {name: evaluate_model(adapted, training.loader(dataset, 2), device="cpu", loss_fn=loss)["loss"]
          for name, dataset in (("holdout", SegmentationDataset(holdout, augment.eval_transform(SIZE))),
                                ("val", training.val_dataset(scan, SIZE)))}
    assert on["holdout"] != pytest.approx(on["val"]) and history[0]["val_loss"] == pytest.approx(on["holdout"], rel=1e-4)
    assert adaptation.read_adaptation_record(ctx.run) is None  # no record written yet
    write_json(ctx.run.model_dir("student") / "history.json", [{"epoch": 1, "val_miou": 0.1}, {"epoch": 2, "val_miou": 0.6}])
    record = adaptation.adaptation_setup("new_desert", images, holdout, rule, plan, adaptation.student_start(ctx))
    adaptation.write_adaptation_record(ctx, record)
    record = adaptation.read_adaptation_record(ctx.run)
    assert record["images"] == [str(path) for path in images] and record["threshold"] == 0.05
    assert record["holdout"] == [str(holdout[0][0])] and record["selected_on"] == "holdout"
    assert record["start"] == {"checkpoint": "models/student/best.pt", "epoch": 2, "val_miou": 0.6}


@pytest.mark.slow  # a real (tiny) training: ~5-9 s on 2 shared cores
def test_the_adaptation_cell_trains_records_and_refuses_other_images_over_its_student(project, tmp_path, capsys):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    write_json(ctx.run.model_dir("student") / "history.json", [{"epoch": 1, "val_miou": 0.3}])
    scan = read_json(ctx.run.scan)
    plan = training.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"], epochs=3, batch_size=2)
    config = training.train_config(DEMO, plan, precision="fp32")
    folder = str(unlabelled_folder(tmp_path / "new_desert"))
    record = adaptation.adapt_student(ctx, scan, plan, config, 0.5, 2.0, 0.0, folder, threshold=0.05)
    out = capsys.readouterr().out
    assert "3 unlabelled images" in out and "for 1 epoch(s)" in out and "on val (no held-out images" in out
    assert record["epochs"] == 1 and record["selected_on"] == "val" and record["holdout"] == []
    assert len(read_json(ctx.run.model_dir("student_adapted") / "history.json")) == 1
    # The same images again: the finished student is reused; other images over it are refused, not mixed.
    assert adaptation.adapt_student(ctx, scan, plan, config, 0.5, 2.0, 0.0, folder, threshold=0.05) == record
    other = str(unlabelled_folder(tmp_path / "other_desert", count=2))
    with pytest.raises(DataError, match="other images"):
        adaptation.adapt_student(ctx, scan, plan, config, 0.5, 2.0, 0.0, other, threshold=0.05)


def test_the_adaptation_cell_is_off_without_adapt_and_skips_when_no_level_is_accurate_enough(project, tmp_path,
                                                                                             capsys):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    plan = training.model_plan(DEMO, "student", name=TINY["name"], options=TINY["options"], epochs=1, batch_size=2)
    config = training.train_config(DEMO, plan, precision="fp32")
    assert adaptation.adapt_student(ctx, scan, plan, config, 0.5, 2.0, 0.0, None) is None
    assert "adaptation: off" in capsys.readouterr().out
    assert adaptation.adapt_student(ctx, scan, plan, config, 0.5, 2.0, 0.0, "auto") is None  # not the demo desert
    assert "adaptation: off" in capsys.readouterr().out
    folder = str(unlabelled_folder(tmp_path / "new_desert"))
    # Untrained teachers are never 50% sure: no level qualifies, nothing is trained or recorded.
    assert adaptation.adapt_student(ctx, scan, plan, config, 0.5, 2.0, 0.0, folder, min_accuracy=0.5) is None
    out = capsys.readouterr().out
    assert "confidence >=" in out and "adaptation skipped" in out
    assert not ctx.run.model_dir("student_adapted").exists()
    # An adapted student of an earlier run with adapt set is named when adaptation is now off (06 reports it).
    ctx.run.model_dir("student_adapted").mkdir(parents=True)
    tiny_checkpoint(ctx.run.model_dir("student_adapted") / "best.pt")
    adaptation.write_adaptation_record(ctx, {"adapt": folder, "images": [], "threshold": 0.5})
    assert adaptation.adapt_student(ctx, scan, plan, config, 0.5, 2.0, 0.0, None) is None
    assert "from an earlier run of this notebook with adapt set stays" in capsys.readouterr().out


def test_the_adaptation_verdict_compares_both_students_on_val_and_the_held_out_images(project):
    ctx = start(project, "05_distill")
    trained_run(ctx)
    scan = read_json(ctx.run.scan)
    ctx.run.model_dir("student_adapted").mkdir(parents=True)
    tiny_checkpoint(ctx.run.model_dir("student_adapted") / "best.pt", seed=5)
    holdout = adaptation.adaptation_holdout(ctx, None, holdout=str(project / "data" / "Offroad_Segmentation_testImages"))
    comparison = adaptation.adaptation_comparison(ctx, scan, holdout)
    val_native = training.loader(training.val_dataset(scan, SIZE, native_masks=True), 2)
    adapted = load_model(ctx.run.model_dir("student_adapted") / "best.pt")
    assert comparison["val"]["student_adapted"]["miou"] == pytest.approx(
        evaluate_model(adapted, val_native, device="cpu")["miou"])  # scored now, at the masks' native size
    scored = {name: comparison["holdout"][name]["miou"] for name in ("student", "student_adapted")}
    assert comparison["gain"] == pytest.approx(scored["student_adapted"] - scored["student"])
    assert comparison["helps"] == (comparison["gain"] > 0)
    text = adaptation.adaptation_lines(comparison)
    assert "held-out mIoU" in text and "Sky" in text
    assert ("adapting helps" if comparison["helps"] else "adapting does not help") in text
    without = adaptation.adaptation_comparison(ctx, scan, [])
    assert without["holdout"] is None and without["gain"] is None and without["helps"] is None
    assert "give adapt_holdout" in adaptation.adaptation_lines(without)
