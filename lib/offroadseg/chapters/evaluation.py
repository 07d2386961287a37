"""Notebook 06: every model of the run compared on val, the test split, the exported student, metrics.json.

Each function is one notebook cell's work, so the cell holds a call and its prints:

    rows, results = evaluation.compare_models(models, val_loader, latency_input, device=device)
    test = evaluation.test_split(ctx, scan, models["student_tta"], device=device, batch_size=4)
    adapted = evaluation.adaptation_rows(ctx, scan, rows, student, device=device, batch_size=4)
    exports = evaluation.export_student(ctx, scan, student, flips, batch_size=4)
    metrics = evaluation.write_run_metrics(ctx, rows + adapted["rows"], results, test["result"], exports["record"])
"""

from __future__ import annotations

from pathlib import Path

from .. import benchmark, evaluate, modelinfo, quantize
from .. import export as onnx_export
from ..checkpoints import load_model
from ..dataset import eval_loader
from ..device import default_device
from ..ensemble import SlidingWindow
from ..models import count_parameters
from ..runs import ADAPTED_STUDENT
from ..scan import usable_pairs
from .assembly import datasets, score_pairs, val_dataset
from .new_desert import per_class_lines, read_adaptation_record


def test_split(ctx, scan: dict, predictor, device=None, batch_size: int = 4) -> dict:
    """Predict the test split into predictions/test/ (raw IDs and colour) and score it where it has masks.

    Returns {"pairs": the usable test pairs, "written": the raw prediction files, "valid": every file
    reopens to valid classes, "result": `evaluate.evaluate_model`'s scores on the test split, or None
    when it has no masks (the challenge's test images) or no images at all}.
    """
    pairs = usable_pairs(scan, "test") if scan["splits"]["test"]["present"] else []
    written = evaluate.write_predictions(predictor, pairs, ctx.run.test_predictions, ctx.profile.image_size,
                                         device=device)
    result = None
    if pairs and pairs[0][1] is not None:
        test_set = val_dataset(scan, ctx.profile.image_size, native_masks=True, split="test")
        result = evaluate.evaluate_model(predictor, eval_loader(test_set, batch_size), device=device)
    return {"pairs": pairs, "written": written, "valid": all(evaluate.prediction_is_valid(p) for p in written),
            "result": result}


def adaptation_rows(ctx, scan: dict, rows: list[dict], student=None, device=None, batch_size: int = 4) -> dict:
    """metrics.json rows of the student with and without adaptation (notebook 05's `adapt`), where the run has both.

    Rows: "student_adapted" on val, and "student" and "student_adapted" on the test split where it has
    masks, both scored on the same test images: those the adapted student learnt from or chose its
    epoch on (by file name, from its adaptation.json: "images" and "holdout") are left out, since
    scoring on them would be transductive or favour it. The adapted student has the student's
    architecture: its rows carry the student's parameter count and timings (`rows`' "student" val
    row). `student`: the plain student the notebook holds (None: loaded from models/student/best.pt).
    Returns {"rows", "record" (adaptation.json, None: adaptation was off), "left_out" (test images left
    out), "test_images" (scored), "summary" (what the notebook prints)}.
    """
    record = read_adaptation_record(ctx.run)
    if record is None:
        return {"rows": [], "record": None, "left_out": 0, "test_images": 0,
                "summary": "adaptation off in this run (notebook 05 ran without adaptation images): no "
                           "student_adapted rows"}
    student_row = next(row for row in rows if row["model"] == "student" and row["split"] == "val")
    adapted = load_model(ctx.run.require(ctx.run.checkpoint(ADAPTED_STUDENT)))
    val = score_pairs({"adapted": adapted}, usable_pairs(scan, "val"), ctx.profile.image_size, batch_size,
                               device)["adapted"]
    out = [{**evaluate.split_row(student_row, val, "val"), "model": ADAPTED_STUDENT}]
    lines = [f"student_adapted on val (the training desert): mIoU {val['miou']:.3f} "
             f"(student {student_row['miou']:.3f})"]
    seen = {Path(image).stem for image in [*record["images"], *record.get("holdout", [])]}
    test_pairs = usable_pairs(scan, "test") if scan["splits"]["test"]["present"] else []
    held_out = [pair for pair in test_pairs if pair[0].stem not in seen]
    if held_out and held_out[0][1] is not None:
        if student is None:
            student = load_model(ctx.run.require(ctx.run.checkpoint("student")))
        scores = score_pairs({"student": student, ADAPTED_STUDENT: adapted}, held_out,
                                      ctx.profile.image_size, batch_size, device)
        for name, result in scores.items():
            out.append({**evaluate.split_row(student_row, result, "test"), "model": name})
        lines.append(f"on {len(held_out)} test images (novel desert; {len(test_pairs) - len(held_out)} adapted on or "
                     f"held out, left out): student mIoU {scores['student']['miou']:.3f}, student_adapted "
                     f"{scores[ADAPTED_STUDENT]['miou']:.3f}")
        lines.append(f"{'per class IoU':<16}{'student':>9}{'adapted':>9}")
        lines.append(per_class_lines(scores))
    else:
        lines.append("the test split has no masks (or every test image was adapted on or held out): no test rows")
    return {"rows": out, "record": record, "left_out": len(test_pairs) - len(held_out), "test_images": len(held_out),
            "summary": "\n".join(lines)}


def export_student(ctx, scan: dict, student, flips, batch_size: int = 4) -> dict:
    """The student as exports/student.onnx (with its inference record), its parity with PyTorch on val,
    and its INT8 version (calibrated on train images, scored on val).

    The record is the checkpoint's own (`modelinfo`); a checkpoint from before that record gets one
    from this run's profile and ensemble.json's `flips`. Returns {"parity", "int8" (quantize's report),
    "record": what metrics.json's `exports` holds (paths relative to the run folder)}.
    """
    record = (modelinfo.read_inference_info(ctx.run.require(ctx.run.checkpoint("student")))
              or modelinfo.inference_info(ctx.profile.image_size, tta_flips=flips))
    export_dir = ctx.run.exports
    onnx_path = onnx_export.export_onnx(student, export_dir / "student.onnx", input_size=ctx.profile.image_size,
                                        inference=record)
    val_small = eval_loader(val_dataset(scan, ctx.profile.image_size), batch_size)
    parity = onnx_export.onnx_parity(student, onnx_path, val_small)
    train_small = eval_loader(datasets(scan, ctx.profile.image_size, augmentation=False)[0], batch_size)
    int8 = quantize.quantize_int8(onnx_path, export_dir / "student_int8.onnx", train_small, eval_batches=val_small)
    summary = {"onnx": str(onnx_path.relative_to(ctx.run.dir)), "parity": parity,
               "int8": {key: (str(value) if key == "path" else value) for key, value in int8.items()}}
    return {"parity": parity, "int8": int8, "record": summary}


def write_run_metrics(ctx, rows: list[dict], results: dict, test_result: dict | None, exports: dict,
                      scored: str = "student_tta") -> dict:
    """Write the run's metrics.json: the val rows of `compare_models`, a `split: "test"` row for
    `scored` where the test split was scored, the exports, and `scored`'s most confused class pairs on val.
    Returns what was written."""
    rows = list(rows)
    if test_result is not None:
        rows.append(evaluate.split_row(next(row for row in rows if row["model"] == scored), test_result, "test"))
    manifest = ctx.run.read_manifest()
    return evaluate.write_metrics(ctx.run.metrics, rows, run=ctx.run.name, profile=ctx.profile.name,
                                  data_root=str(ctx.data_root), code_revision=manifest.get("code_revision"),
                                  model_input_size=list(ctx.profile.image_size), exports=exports,
                                  most_confused=evaluate.most_confused_pairs(results[scored]["confusion_matrix"]))


def slide_model(ctx, student, overlap: float | None) -> dict:
    """{"student_slide": the student in slide inference (`ensemble.SlidingWindow`: windows of the model
    input overlapping by `overlap`, frames at their own resolution)}, or {} when `overlap` is None."""
    if overlap is None:
        return {}
    return {"student_slide": SlidingWindow(student, ctx.profile.image_size, overlap)}


def compare_models(models: dict, loader, latency_input, device=None, batch_sizes=None, runs: int | None = None,
                   native_loader=None):
    """Notebook 06's comparison: each model's scores over `loader` and its latency (batch 1) and
    throughput on a (height, width) `latency_input`, as metrics.json rows (`evaluate.metrics_row`,
    split val), and the full scores by name (confusion matrices for the figures). A `SlidingWindow`
    (`slide_model`) is scored over `native_loader`, the same images at their own resolution.

    `batch_sizes` of the throughput, None: batch 1 alone on a CPU (the latency: on two cores a
    larger batch gains nothing, and timing it cost the demo a quarter of notebook 06), (1, 2, 4,
    8, 16, 32) on a GPU; `runs` (timed runs per batch size), None: 2 on a CPU, 10 on a GPU.
    """
    device = default_device(device)
    on_cpu = device.type == "cpu"
    batch_sizes = tuple(batch_sizes) if batch_sizes else ((1,) if on_cpu else (1, 2, 4, 8, 16, 32))
    runs = runs or (2 if on_cpu else 10)
    rows, results = [], {}
    for name, model in models.items():
        sliding = isinstance(model, SlidingWindow)
        if sliding and native_loader is None:
            raise ValueError(f"{name} slides over frames at their own resolution: give compare_models a native_loader")
        result = evaluate.evaluate_model(model, native_loader if sliding else loader, device=device)
        timing = benchmark.latency(model, input_size=tuple(latency_input), device=device)
        speed = benchmark.throughput(model, input_size=tuple(latency_input), batch_sizes=batch_sizes, device=device,
                                     warmup=1, runs=runs, measured={1: timing})  # batch 1 is the latency's
        results[name] = result
        rows.append(evaluate.metrics_row(name, result, count_parameters(model), timing, speed, split="val",
                                device=timing["device"], input_size=latency_input))
    return rows, results
