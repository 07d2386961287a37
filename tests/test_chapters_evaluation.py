"""Notebook 06's chapter (offroadseg.chapters.evaluation): the comparison, the test split, the exported student, metrics.json."""

import pytest
import torch
from chapter_helpers import SIZE, loader_of, start, tiny_checkpoint, trained_run

from offroadseg import benchmark, evaluate, modelinfo
from offroadseg.chapters import assembly, evaluation
from offroadseg.checkpoints import load_model
from offroadseg.classes import CLASS_NAMES
from offroadseg.data import read_mask
from offroadseg.dataset import eval_loader
from offroadseg.evaluate import evaluate_model
from offroadseg.files import read_json, write_json
from offroadseg.metrics import confusion_matrix, scores

pytestmark = pytest.mark.usefixtures("one_thread")


def student_of(ctx):
    ctx.run.model_dir("student").mkdir(parents=True)
    tiny_checkpoint(ctx.run.model_dir("student") / "best.pt")
    return load_model(ctx.run.model_dir("student") / "best.pt")


def test_test_split_writes_predictions_and_scores_the_split_that_has_masks(project):
    ctx = start(project, "06_evaluate")
    scan = read_json(ctx.run.scan)
    student = student_of(ctx)
    test = evaluation.test_split(ctx, scan, student, device="cpu", batch_size=2)
    assert [pair[0].name for pair in test["pairs"]] == ["test000.png"]
    assert [path.name for path in test["written"]] == ["test000.png"] and test["valid"]
    assert test["written"][0].parent == ctx.run.dir / "predictions" / "test" / "raw"
    # the score is the predictions' own: the written labels against the mask
    truth = torch.as_tensor(read_mask(test["pairs"][0][1])).long()
    labels = torch.as_tensor(read_mask(test["written"][0])).long()
    assert test["result"]["miou"] == pytest.approx(scores(confusion_matrix(labels, truth))["miou"], abs=0.02)

    scan["splits"]["test"]["present"] = False  # no test split: nothing written, nothing scored
    empty = evaluation.test_split(ctx, scan, student, device="cpu")
    assert empty["pairs"] == [] and empty["written"] == [] and empty["valid"] and empty["result"] is None


@pytest.mark.slow
def test_export_student_writes_onnx_and_int8_with_the_checkpoints_record(project):
    ctx = start(project, "06_evaluate")
    scan = read_json(ctx.run.scan)
    exported = evaluation.export_student(ctx, scan, student_of(ctx), flips=("h",), batch_size=2)
    record = exported["record"]
    assert record["onnx"] == "exports/student.onnx" and (ctx.run.dir / record["onnx"]).is_file()
    assert (ctx.run.dir / "exports" / "student_int8.onnx").is_file()
    assert exported["parity"]["max_abs_logit_diff"] < 1e-3 and record["parity"] == exported["parity"]
    assert isinstance(record["int8"]["path"], str) and exported["int8"]["mode"] in ("static", "dynamic")
    # the checkpoint carries no inference record: the export gets one from the profile and the flips
    info = modelinfo.read_inference_info(ctx.run.dir / record["onnx"])
    assert info["input_size"] == list(SIZE) and info["tta_flips"] == ["h"]


def test_write_run_metrics_adds_the_test_row_of_the_scored_model(project):
    ctx = start(project, "06_evaluate")
    cm = [[3, 1] + [0] * 8, [0, 4] + [0] * 8] + [[0] * 10 for _ in range(8)]
    val = {"miou": 0.7, "pixel_acc": 0.9, "iou": [0.75, 0.8] + [None] * 8, "confusion_matrix": cm}
    rows = [evaluate.metrics_row(name, val, 10, None, None, "val", "cpu", SIZE) for name in ("student", "student_tta")]
    test = {"miou": 0.5, "pixel_acc": 0.6, "iou": [0.5, 0.5] + [None] * 8, "confusion_matrix": cm}
    metrics = evaluation.write_run_metrics(ctx, rows, {"student_tta": val}, test, {"onnx": "exports/student.onnx"})
    assert [(row["model"], row["split"]) for row in metrics["models"]] == [
        ("student", "val"), ("student_tta", "val"), ("student_tta", "test")]
    assert metrics["models"][-1]["miou"] == 0.5 and len(rows) == 2  # the caller's rows are left alone
    assert read_json(ctx.run.dir / "metrics.json") == metrics
    assert metrics["exports"] == {"onnx": "exports/student.onnx"} and metrics["most_confused"][0]["truth"]
    assert [r["split"] for r in evaluation.write_run_metrics(ctx, rows, {"student_tta": val}, None, {})["models"]] == ["val", "val"]


def test_adaptation_rows_score_both_students_on_the_test_images_not_adapted_on(project):
    ctx = start(project, "06_evaluate")
    scan = read_json(ctx.run.scan)
    student = student_of(ctx)
    val = {"miou": 0.7, "pixel_acc": 0.9, "iou": [0.75, 0.8] + [None] * 8}
    rows = [evaluate.metrics_row("student", val, 10, None, None, "val", "cpu", SIZE)]
    ctx.run.model_dir("student_adapted").mkdir(parents=True)
    tiny_checkpoint(ctx.run.model_dir("student_adapted") / "best.pt", seed=1)
    off = evaluation.adaptation_rows(ctx, scan, rows, device="cpu")  # no adaptation.json: adaptation was off
    assert off["rows"] == [] and off["record"] is None and "adaptation off" in off["summary"]

    write_json(ctx.run.model_dir("student_adapted") / "adaptation.json", {"adapt": "elsewhere", "images": ["/x/new.png"]})
    on = evaluation.adaptation_rows(ctx, scan, rows, device="cpu")
    assert "per class IoU" in on["summary"] and "Sky" in on["summary"]
    assert [(row["model"], row["split"]) for row in on["rows"]] == [
        ("student_adapted", "val"), ("student", "test"), ("student_adapted", "test")]
    assert on["test_images"] == 1 and on["left_out"] == 0
    test_loader = eval_loader(assembly.val_dataset(scan, SIZE, native_masks=True, split="test"), 2)
    assert on["rows"][1]["miou"] == pytest.approx(evaluate.evaluate_model(student, test_loader, device="cpu")["miou"])
    assert on["rows"][0]["params"] == 10 and set(on["rows"][2]["per_class_iou"]) == set(CLASS_NAMES)

    # The test image the adapted student learnt from is never scored: here the only one, so no test rows.
    write_json(ctx.run.model_dir("student_adapted") / "adaptation.json",
               {"adapt": "test images", "images": [str(scan["splits"]["test"]["folder"]) + "/Color_Images/test000.png"]})
    transductive = evaluation.adaptation_rows(ctx, scan, rows, device="cpu")
    assert [row["split"] for row in transductive["rows"]] == ["val"] and transductive["left_out"] == 1
    assert "no test rows" in transductive["summary"]
    # Nor the held-out images it chose its epoch on (on the real data, a labelled part of the test images).
    write_json(ctx.run.model_dir("student_adapted") / "adaptation.json",
               {"adapt": "elsewhere", "images": ["/x/new.png"],
                "holdout": [str(scan["splits"]["test"]["folder"]) + "/Color_Images/test000.png"]})
    chosen_on = evaluation.adaptation_rows(ctx, scan, rows, student, device="cpu")
    assert [row["split"] for row in chosen_on["rows"]] == ["val"] and chosen_on["left_out"] == 1


def test_compare_models_makes_the_metrics_rows_of_notebook_06(project, monkeypatch):
    ctx = start(project, "06_evaluate")
    trained_run(ctx)
    models = assembly.evaluation_models(ctx)
    models = {name: models[name] for name in ("deeplab", "student_tta")}
    loader = loader_of(ctx, native=True)
    timed = []
    throughput = benchmark.throughput

    def spy(model, **kwargs):
        timed.append((kwargs["batch_sizes"], kwargs["runs"]))
        return throughput(model, **kwargs)

    monkeypatch.setattr(benchmark, "throughput", spy)
    rows, results = evaluation.compare_models(models, loader, [20, 30], device="cpu")
    assert timed == [((1,), 2)] * 2  # the CPU's defaults: batch 1 alone, the latency measured already
    assert [row["model"] for row in rows] == ["deeplab", "student_tta"] and set(results) == set(models)
    row = rows[0]
    assert row["split"] == "val" and row["latency_ms"]["input_size"] == [20, 30] and row["latency_ms"]["device"] == "cpu"
    assert row["miou"] == results["deeplab"]["miou"] == evaluate_model(models["deeplab"], loader)["miou"]
    assert row["best_batch"] == 1 and row["params"] == rows[1]["params"]
    assert "confusion_matrix" in results["student_tta"]
    timed.clear()
    evaluation.compare_models({"deeplab": models["deeplab"]}, loader, [20, 30], device="cpu", batch_sizes=[1], runs=1)
    assert timed == [((1,), 1)]


def test_a_slide_row_is_scored_on_frames_at_their_own_resolution_with_its_latency(project):
    ctx = start(project, "06_evaluate")
    trained_run(ctx)
    student = assembly.evaluation_models(ctx)["student"]
    assert evaluation.slide_model(ctx, student, None) == {}
    slide = evaluation.slide_model(ctx, student, 0.25)
    scan = read_json(ctx.run.scan)
    native = eval_loader(assembly.val_dataset(scan, None, native_masks=True), 2)
    with pytest.raises(ValueError, match="native_loader"):
        evaluation.compare_models(slide, loader_of(ctx, native=True), [20, 30], device="cpu")
    rows, results = evaluation.compare_models({"student": student, **slide}, loader_of(ctx, native=True), [20, 30],
                                              device="cpu", native_loader=native)
    assert [row["model"] for row in rows] == ["student", "student_slide"]
    assert rows[1]["latency_ms"]["median"] > 0  # its cost in the metrics table
    assert results["student_slide"]["miou"] == evaluate_model(slide["student_slide"], native)["miou"]
